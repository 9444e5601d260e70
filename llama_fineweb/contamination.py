"""Benchmark contamination: which evaluation examples' 13-grams occur in the training shards.

GPT-3's method (Brown et al. 2020, appendix C): text is lower-cased, punctuation is stripped and the
rest split on whitespace into words; an example is contaminated when any of its 13-word n-grams
occurs in the training data (an example shorter than 13 words: when all of it occurs). Words, not
tokens: a tokenization splits the same text differently after a space or a capital, words do not.

The shards are token files, so each document (the tokens from one <|endoftext|> to the next; a
document may run on into the next shard) is decoded back to text with the tokenizer and split into
words the same way. One streaming pass holds only the evaluation n-grams in memory (a dict keyed
by word tuples: exact, no hash collisions) and intersects each document's n-grams with them.

A HellaSwag example's text is its context followed by its correct ending: the source sentence the
web may quote. The three wrong endings are machine-written, not quoted from anywhere. Any other task
is an lm-eval task (a local YAML under an include path, or one whose dataset is in the local cache):
each evaluation document's prompt (doc_to_text), the task's target delimiter, then its correct
answer (the target choice of a multiple-choice task, else doc_to_target), identified as eval_suite.py's
per-sample scores identify it (the document's `ind` if it has one, else its index).
"""

from __future__ import annotations

import bisect
import functools
import itertools
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .dataloader import open_shard, shard_paths
from .hellaswag import load_examples
from .tokenizer import EOT, get_encoding
from .utils import UserError

N = 13
PUNCTUATION = re.compile(r"[^\w\s]|_")
MAX_PLACES = 5  # occurrences listed per example in the report (all are counted)
TASKS = ("hellaswag",)  # built in (hellaswag.py's files); any other name is an lm-eval task


def words(text: str) -> list[str]:
    """Lower-cased words with punctuation stripped."""
    return PUNCTUATION.sub("", text.lower()).split()


def words_at(text: str) -> list[tuple[int, str]]:
    """words(text), each with the character offset where it starts in text."""
    found = []
    for m in re.finditer(r"\S+", text):
        w = PUNCTUATION.sub("", m.group().lower())
        found.extend((m.start(), part) for part in w.split())
    return found


def ngrams(ws: list[str], n: int) -> Iterator[tuple[str, ...]]:
    return zip(*(ws[i:] for i in range(n)))


def example_grams(text: str, n: int = N) -> set[tuple[str, ...]]:
    """An example's n-grams; a shorter example is one n-gram of all its words."""
    ws = words(text)
    return set(ngrams(ws, n)) if len(ws) >= n else ({tuple(ws)} if ws else set())


def hellaswag_items(path: str | None) -> list[tuple[str, str]]:
    """(id, text) of each HellaSwag example: its own `ind` and its context with the correct ending."""
    return [(str(ex.get("ind", i)), f"{ex['ctx']} {ex['endings'][ex['label']]}")
            for i, ex in enumerate(load_examples(path))]


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: str | None):
    """lm-eval's task index (seconds to build: it reads every task YAML), once per include path."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def lm_eval_items(task: str, include_path: str | None) -> list[tuple[str, str]]:
    """(id, text) of each evaluation document of an lm-eval task: its prompt, the target delimiter
    and its correct answer; the id is the document's `ind`, else its index among the task's
    evaluation documents (lm-eval's doc_id)."""
    from lm_eval.tasks import get_task_dict

    manager = _task_manager(include_path)
    if task not in manager.all_tasks:
        where = f" or under --include_path {include_path}" if include_path else " (--include_path adds local YAMLs)"
        raise UserError(f"--tasks: {task!r} is neither a built-in task ({', '.join(TASKS)}) nor an lm-eval task "
                        f"known to lm-eval{where}")
    try:
        loaded = get_task_dict([task], manager)
    except Exception as e:  # lm-eval raises what `datasets` raises: offline with no cache, a bad data file
        raise UserError(f"--tasks: lm-eval could not load {task!r} ({type(e).__name__}: {str(e)[:200]}): its data "
                        f"must be local (a YAML with data_files, or the dataset in the Hugging Face cache)") from None
    obj = loaded.get(task)
    if obj is None or isinstance(obj, dict) or not hasattr(obj, "eval_docs"):
        raise UserError(f"--tasks: {task!r} is an lm-eval group: name its tasks one by one")
    items = []
    for i, doc in enumerate(obj.eval_docs):
        prompt, target = obj.doc_to_text(doc), obj.doc_to_target(doc)
        if obj.OUTPUT_TYPE == "multiple_choice":
            choices = obj.doc_to_choice(doc)
            target = choices[target] if isinstance(target, int) else target
        if isinstance(target, list):
            target = target[0] if target else ""
        doc_id = doc.get("ind", i) if isinstance(doc, dict) else i
        items.append((str(doc_id), f"{prompt}{obj.config.target_delimiter}{target}"))
    return items


def task_items(task: str, data: dict[str, str | None]) -> list[tuple[str, str]]:
    """(id, text) of each example: HellaSwag from hellaswag.py's files (data["hellaswag"]), any other
    name from lm-eval (local YAMLs under data["include_path"])."""
    if task == "hellaswag":
        return hellaswag_items(data.get("hellaswag"))
    return lm_eval_items(task, data.get("include_path"))


@dataclass
class Index:
    """The evaluation n-grams in memory: {word tuple: [(task, example id), ...]}."""
    n: int = N
    grams: dict[tuple[str, ...], list[tuple[str, str]]] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)  # task -> its example ids, in order
    lengths: set[int] = field(default_factory=set)  # n, and those of examples shorter than n
    keys: set[tuple[str, ...]] = field(default_factory=set)  # grams' keys as a set: `&` walks the smaller side

    def add(self, task: str, items: list[tuple[str, str]]) -> None:
        self.examples[task] = [i for i, _ in items]
        for example_id, text in items:
            for gram in example_grams(text, self.n):
                self.grams.setdefault(gram, []).append((task, example_id))
                self.lengths.add(len(gram))
        self.keys = set(self.grams)

    def found_in(self, ws: list[str]) -> set[tuple[str, ...]]:
        """The indexed n-grams among the words' n-grams."""
        hits = set()
        for n in self.lengths:
            if len(ws) >= n:
                hits.update(set(ngrams(ws, n)) & self.keys)
        return hits


def build_index(tasks: list[str], data: dict[str, str | None], n: int = N) -> Index:
    index = Index(n=n)
    for task in tasks:
        index.add(task, task_items(task, data))
    return index


def contaminated_text(index: Index, text: str) -> bool:
    return bool(index.found_in(words(text)))


@dataclass
class Document:
    """A document of the stream: its tokens and where each piece of it lies (shard, offset, length)."""
    number: int
    tokens: list[np.ndarray]
    pieces: list[tuple[str, int, int]]

    def place(self, token: int) -> tuple[str, int]:
        """(shard, offset in it) of the document's token number `token`."""
        for shard, offset, length in self.pieces:
            if token < length:
                return shard, offset + token
            token -= length
        shard, offset, length = self.pieces[-1]
        return shard, offset + length - 1


def documents(paths: list[str]) -> Iterator[Document]:
    """The documents of the shards in order, each starting at an <|endoftext|>; one cut by a shard's
    end continues in the next."""
    current: Document | None = None
    number = 0
    for path in paths:
        tokens = np.asarray(open_shard(path))
        name = Path(path).name
        starts = np.flatnonzero(tokens == EOT).tolist()
        bounds = [0, *starts, len(tokens)] if not starts or starts[0] != 0 else [*starts, len(tokens)]
        for a, b in itertools.pairwise(bounds):
            if b <= a:
                continue
            if tokens[a] == EOT or current is None:
                if current is not None:
                    yield current
                current = Document(number, [], [])
                number += 1
            current.tokens.append(tokens[a:b])
            current.pieces.append((name, a, b - a))
    if current is not None:
        yield current


def locate(doc: Document, text: str, offsets: list[int], gram: tuple[str, ...]) -> tuple[str, int]:
    """(shard, token offset) where the n-gram starts in the document."""
    ws = words_at(text)
    plain = [w for _, w in ws]
    for i in range(len(plain) - len(gram) + 1):
        if tuple(plain[i:i + len(gram)]) == gram:
            token = max(0, bisect.bisect_right(offsets, ws[i][0]) - 1)
            return doc.place(token)
    return doc.place(0)


def scan(index: Index, paths: list[str], progress=None) -> dict:
    """The one streaming pass: for every example of the index, where its n-grams occur."""
    enc = get_encoding()
    places: dict[tuple[str, str], list[dict]] = {}
    counts: dict[tuple[str, str], int] = {}
    tokens_read = docs = 0
    t0 = time.perf_counter()
    for doc in documents(paths):
        ids = np.concatenate(doc.tokens).tolist()
        tokens_read += len(ids)
        docs += 1
        text = enc.decode(ids, errors="replace")
        hits = index.found_in(words(text))
        if hits:
            located, offsets = enc.decode_with_offsets(ids)
            for gram in sorted(hits):
                shard, offset = locate(doc, located, offsets, gram)
                for key in index.grams[gram]:
                    counts[key] = counts.get(key, 0) + 1
                    if len(places.setdefault(key, [])) < MAX_PLACES:
                        places[key].append({"ngram": " ".join(gram), "shard": shard, "token_offset": offset,
                                            "document": doc.number})
        if progress is not None:
            progress(len(ids))
    seconds = time.perf_counter() - t0
    tasks = {}
    for task, ids in index.examples.items():
        hit = [{"id": i, "overlaps": counts[(task, i)], "places": places[(task, i)]}
               for i in ids if (task, i) in counts]
        tasks[task] = {"examples": len(ids), "contaminated": len(hit),
                       "share": len(hit) / len(ids) if ids else 0.0, "contaminated_examples": hit}
    return {"n": index.n, "method": "lower-cased words, punctuation stripped (GPT-3)",
            "shards": [str(p) for p in paths], "tokens": tokens_read, "documents": docs,
            "seconds": round(seconds, 3), "tokens_per_s": tokens_read / seconds if seconds else None,
            "tasks": tasks}


def train_shards(data_dirs: list[str]) -> list[str]:
    return [p for d in data_dirs for p in shard_paths(d, "train")]


def read_report(path: str | Path) -> dict:
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the contamination report {path} ({type(e).__name__}): pass the JSON "
                        f"contamination.py --out wrote") from None
    if not isinstance(report, dict) or not isinstance(report.get("tasks"), dict):
        raise UserError(f"{path} is not a contamination report (no 'tasks'): pass the JSON contamination.py "
                        f"--out wrote")
    return report


def contaminated_ids(report: dict, task: str) -> set[str]:
    """The ids of a task's contaminated examples in a report (UserError if the report lacks the task)."""
    if task not in report["tasks"]:
        raise UserError(f"the contamination report covers {', '.join(report['tasks']) or 'no task'}, not "
                        f"{task}: rerun contamination.py with --tasks {task}")
    return {str(e["id"]) for e in report["tasks"][task]["contaminated_examples"]}


def table(report: dict) -> str:
    lines = [f"| task | examples | contaminated ({report['n']}-gram overlap) | share |", "|---|---|---|---|"]
    for task, r in report["tasks"].items():
        lines.append(f"| {task} | {r['examples']} | {r['contaminated']} | {r['share']:.1%} |")
    return "\n".join(lines)


def index_for(spec: str, hellaswag_data: str | None = None, include_path: str | None = None) -> tuple[Index, dict]:
    """The index that --decontaminate=REPORT_OR_TASKS names: a report's tasks and evaluation data
    (every n-gram of them, not only those the report found), or a comma-separated task list; and
    its description for a manifest."""
    if spec.endswith(".json"):
        report = read_report(spec)
        tasks, n = list(report["tasks"]), int(report.get("n", N))
        data = {**report.get("data", {}).get("eval", {}), "include_path": report.get("data", {}).get("include_path")}
    else:
        tasks, n, data = [t.strip() for t in spec.split(",") if t.strip()], N, {}
    if hellaswag_data:
        data["hellaswag"] = hellaswag_data
    if include_path:
        data["include_path"] = include_path
    index = build_index(tasks, data, n)
    described = {"tasks": tasks, "n": n, "eval": {t: data.get(t) for t in tasks}, "ngrams": len(index.grams)}
    if data.get("include_path"):  # only then: a build's identity from before lm-eval tasks stays the same
        described["include_path"] = data["include_path"]
    return index, described
