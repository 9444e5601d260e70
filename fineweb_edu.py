"""FineWeb-Edu (or local text files) -> GPT-2 token shards for pretraining.

    python fineweb_edu.py                                    # sample-10BT -> data/edu_fineweb10B
    python fineweb_edu.py --subset sample-100BT              # -> data/edu_fineweb100B
    python fineweb_edu.py --local 'dl/*.parquet' --out data/mine
    python fineweb_edu.py --local "$(python -c 'import os; print(os.path.dirname(os.__file__))')/*.py" \\
        --out data/stdlib --shard_size 1e5                   # offline: the stdlib's own source

Every document becomes [<|endoftext|>] + encode_ordinary(text), so special-token strings inside a
document are plain text. The token stream is cut into shards of exactly --shard_size tokens (the
last holds the remainder; a document may continue into the next shard) saved by np.save as uint16
under build-nanogpt's names: edufineweb_val_000000.npy (shard 0 is the validation split), then
edufineweb_train_000001.npy, ... (dataloader.py owns the names) so shards from build-nanogpt or
DMaS-LLaMa-Lite load in dataloader.py and ours load in theirs. manifest.json beside them records the
tokenizer, the source and options, and for each shard its documents, tokens, bytes, sha256, a
fingerprint sampled from the file (which the loader compares at each start, so a shard rewritten
in place is caught), largest token id (max_token, which lets the loader skip its id check) and where
in the source it ends.

Rerun with the same arguments after an interruption (Ctrl-C, kill -9), it keeps the shards that
match the manifest, skips the documents they hold and writes the rest; the result is byte-identical
to an uninterrupted run, whatever --workers is. A rerun never deletes complete shards unless told to:
a --max_tokens below what they hold is refused, or with --truncate cuts the build back to it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterator

import numpy as np
from tqdm import tqdm

from llama_fineweb import utils
from llama_fineweb.dataloader import MANIFEST, SHARD_PATTERN, fingerprint, shard_name
from llama_fineweb.text_sources import BuildError, describe_source, open_documents, resolve_local_files
from llama_fineweb import contamination
from llama_fineweb.tokenizer import EOT, get_encoding

HUB_DATASET = "HuggingFaceFW/fineweb-edu"
SUBSET_OUT = {
    "sample-10BT": "data/edu_fineweb10B",
    "sample-100BT": "data/edu_fineweb100B",
    "sample-350BT": "data/edu_fineweb350B",
}
SHARD_FILE_RE = re.compile(rf"^{SHARD_PATTERN}(\.tmp)?$")  # shards, and the partials a kill leaves
MAX_CHARS_PER_TASK = 4_000_000  # ...but no task so large that one thread works while others idle

Log = Callable[[str], None]


def _count(text: str) -> int:
    """argparse type for token counts: 100000000, 100_000_000 and 1e8 all work."""
    try:
        value = int(text.replace("_", "")) if text.replace("_", "").isdigit() else int(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (examples: 100000000, 1e8)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Tokenize FineWeb-Edu (from the Hugging Face hub) or local files into uint16 "
        "GPT-2 token shards: edufineweb_val_000000.npy, edufineweb_train_000001.npy, ... plus "
        "manifest.json. Rerun the same command to resume an interrupted build.",
    )
    parser.add_argument("--subset", default="sample-10BT", choices=sorted(SUBSET_OUT),
                        help="FineWeb-Edu sample to tokenize, about 10B, 100B or 350B GPT-2 tokens "
                        "(default: %(default)s)")
    parser.add_argument("--dataset", default=HUB_DATASET,
                        help="hub dataset to read --subset from (default: %(default)s)")
    parser.add_argument("--no_streaming", action="store_true",
                        help="download and prepare the whole hub split before tokenizing, instead of "
                        "streaming it (streaming starts at once and needs no extra disk)")
    parser.add_argument("--cache_dir", default=None,
                        help="cache directory for the datasets library (default: its own, "
                        "~/.cache/huggingface)")
    parser.add_argument("--local", nargs="+", action="extend", metavar="GLOB",
                        help="read local files instead of the hub; quote the globs ('**' recurses; a "
                        "directory means every file under it). *.parquet and *.jsonl/*.json[.gz] hold "
                        "one document per row in --text_column; any other file is one document of "
                        "UTF-8 text. Files are read in sorted order, glob by glob.")
    parser.add_argument("--text_column", default="text",
                        help="column (parquet) or key (jsonl) holding the text (default: %(default)s)")
    parser.add_argument("--out", default=None,
                        help="output directory (default: data/edu_fineweb10B, 100B or 350B for the "
                        "hub subsets; required with --local)")
    parser.add_argument("--shard_size", type=_count, default=100_000_000,
                        help="tokens per shard (default: 1e8, build-nanogpt's)")
    parser.add_argument("--max_tokens", type=_count, default=None,
                        help="stop after this many tokens in all (default: the whole source); below "
                        "what --out's complete shards already hold, the build refuses unless --truncate")
    parser.add_argument("--truncate", action="store_true",
                        help="with a --max_tokens below what --out's complete shards hold: delete the "
                        "shards beyond it and end the build at --max_tokens (without it nothing is deleted)")
    parser.add_argument("--decontaminate", metavar="REPORT_OR_TASKS",
                        help="drop every document holding a 13-gram of these benchmarks' examples: a "
                        "contamination.py report (its tasks and evaluation data) or tasks, e.g. hellaswag; "
                        "the manifest counts the documents dropped")
    parser.add_argument("--hellaswag_data", help="with --decontaminate: a local HellaSwag jsonl (default: "
                        "the report's, else hellaswag.py's cached validation split)")
    parser.add_argument("--include_path", help="with --decontaminate: a directory of lm-eval task YAMLs for "
                        "its lm-eval tasks (default: the report's)")
    parser.add_argument("--workers", type=int, default=_cpu_count(),
                        help="tokenizer threads (default: all cores); the shards do not depend on it")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.out is None:
        if args.local:
            parser.error("--local needs --out DIR")
        args.out = SUBSET_OUT[args.subset]
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    return args


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# ----------------------------------------------------------------------------- tokenizing

_EOT = np.array([EOT], dtype=np.uint32)


def encode_ordinary(text: str) -> np.ndarray:
    """tiktoken's encode_ordinary as a uint32 array: special-token strings are plain text."""
    # encode_to_numpy with no special token allowed or disallowed is encode_ordinary, but it hands
    # back one buffer instead of a list of Python ints, whose construction holds the GIL and would
    # serialize the worker threads.
    enc = get_encoding()
    try:
        return enc.encode_to_numpy(text, disallowed_special=())
    except UnicodeEncodeError:  # lone surrogates: the same repair encode_ordinary makes
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return enc.encode_to_numpy(text, disallowed_special=())


def encode_documents(texts: list[str], leave_out: contamination.Index | None = None) -> tuple[np.ndarray, np.ndarray]:
    """[EOT] + encode_ordinary(text) for each text, concatenated as uint16, and each one's length;
    a text holding one of `leave_out`'s n-grams is left out with length 0 (so that the source's document
    count, which a resumed build skips by, still counts it)."""
    parts = [_EOT]
    lengths = np.zeros(len(texts), dtype=np.int64)
    for i, text in enumerate(texts):
        if leave_out is not None and contamination.contaminated_text(leave_out, text):
            continue
        ids = encode_ordinary(text)
        lengths[i] = 1 + len(ids)
        parts += [ids, _EOT]
    if len(parts) == 1:
        return np.empty(0, dtype=np.uint16), lengths
    return np.concatenate(parts[:-1]).astype(np.uint16), lengths


# ----------------------------------------------------------------------------- writing shards

class _HashingFile:
    """Writes through to a file while hashing, so a shard's sha256 costs no second read."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        return self.f.write(data)


def _write_manifest(out_dir: str, manifest: dict) -> None:
    utils.write_atomic(os.path.join(out_dir, MANIFEST), json.dumps(manifest, indent=1) + "\n")


class ShardWriter:
    """Fills shards of exactly shard_size tokens and hands each full one to a writer thread, which
    saves it under a temporary name, renames it when complete, then records it in the manifest.

    Tracks where in the source the stream stands: document `document`, of which the first `offset`
    tokens ([EOT] included) are already written. Shards are written one at a time and in order, so
    the manifest on disk always lists exactly the shards that are complete.
    """

    def __init__(self, out_dir: str, shard_size: int, manifest: dict):
        self.out_dir, self.shard_size, self.manifest = out_dir, shard_size, manifest
        self.buffer = np.empty(shard_size, dtype=np.uint16)
        self.fill = 0
        self.document = manifest["next_document"]
        self.offset = manifest["next_document_offset"]
        self.io = ThreadPoolExecutor(1)
        self.writing: Future | None = None

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents self.document, self.document + 1, ...: `lengths` are their full token
        counts; `tokens` omits the first self.offset tokens of the first and may stop early."""
        ends = np.cumsum(lengths) - self.offset  # where each document ends within `tokens`
        done = 0
        while done < len(tokens):
            take = min(len(tokens) - done, self.shard_size - self.fill)
            self.buffer[self.fill:self.fill + take] = tokens[done:done + take]
            self.fill += take
            done += take
            if self.fill == self.shard_size:
                self._flush(*self._position(ends, done))
        self.document, self.offset = self._position(ends, done)

    def _position(self, ends: np.ndarray, done: int) -> tuple[int, int]:
        finished = int(np.searchsorted(ends, done, side="right"))  # documents complete after `done`
        if finished == 0:
            return self.document, self.offset + done
        return self.document + finished, done - int(ends[finished - 1])

    def _flush(self, next_document: int, next_offset: int) -> None:
        if self.writing is not None:
            self.writing.result()  # one shard in flight at most: bounds memory, surfaces errors
        tokens = self.buffer[:self.fill]
        self.writing = self.io.submit(self._write, tokens, next_document, next_offset)
        self.buffer = np.empty(self.shard_size, dtype=np.uint16)
        self.fill = 0

    def _write(self, tokens: np.ndarray, next_document: int, next_offset: int) -> None:
        shards = self.manifest["shards"]
        name = shard_name(len(shards))
        path = os.path.join(self.out_dir, name)
        with open(path + ".tmp", "wb") as f:
            hashing = _HashingFile(f)
            np.save(hashing, tokens)  # the reference's exact format: np.save of a 1-D uint16 array
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
        shards.append({
            "file": name, "split": "val" if len(shards) == 0 else "train",
            "tokens": len(tokens), "documents": int(np.count_nonzero(tokens == EOT)),
            "bytes": os.path.getsize(path), "sha256": hashing.sha.hexdigest(), "max_token": int(tokens.max()),
            # a few MiB sampled from the file, which the loader compares at every start (sha256 would
            # need a whole read): a shard rewritten in place at the same size is caught
            "fingerprint": fingerprint(path),
            "next_document": next_document, "next_document_offset": next_offset,
        })
        _update_totals(self.manifest)
        _write_manifest(self.out_dir, self.manifest)

    def finish(self) -> None:
        """Write the partial last shard, if any, and mark the build complete."""
        if self.fill:
            self._flush(self.document, self.offset)
        if self.writing is not None:
            self.writing.result()
        self.io.shutdown()
        self.manifest["complete"] = True
        _write_manifest(self.out_dir, self.manifest)

    def abandon(self) -> None:
        """On an interruption: let the shard being written finish, so it is kept."""
        self.io.shutdown(wait=True)


def _update_totals(manifest: dict) -> None:
    shards = manifest["shards"]
    manifest["tokens"] = sum(s["tokens"] for s in shards)
    manifest["documents"] = sum(s["documents"] for s in shards)
    # how far into the source the shards reach: all of documents [0, next_document), and the first
    # next_document_offset tokens of document next_document
    manifest["next_document"] = shards[-1]["next_document"] if shards else 0
    manifest["next_document_offset"] = shards[-1]["next_document_offset"] if shards else 0


# ----------------------------------------------------------------------------- resuming

def _shard_files(out_dir: str) -> list[str]:
    return sorted(n for n in os.listdir(out_dir) if SHARD_FILE_RE.match(n))


def _file_matches(out_dir: str, shard: dict) -> bool:
    path = os.path.join(out_dir, shard["file"])
    if not os.path.isfile(path) or os.path.getsize(path) != shard["bytes"]:
        return False
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            sha.update(chunk)
    return sha.hexdigest() == shard["sha256"]


def resume_state(out_dir: str, identity: dict, max_tokens: int | None, log: Log, truncate: bool = False) -> dict:
    """The manifest to continue from: the shards of an earlier run that still match their
    manifest entries and are full (a partial last shard is rebuilt), or a fresh one. Shards past
    max_tokens are deleted only with `truncate`, else a BuildError: finished work is not thrown away.
    """
    fresh = {**identity, "max_tokens": max_tokens, "complete": False, "documents": 0, "tokens": 0,
             "next_document": 0, "next_document_offset": 0, "shards": []}
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.exists(path):
        leftovers = [n for n in _shard_files(out_dir) if not n.endswith(".tmp")]
        if leftovers:
            raise BuildError(f"{out_dir} holds {len(leftovers)} shards but no {MANIFEST} to check them "
                             f"against: pass another --out or delete them")
        _remove_shards(out_dir, keep=set())
        return fresh
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError) as e:
        raise BuildError(f"cannot read {path} ({e}): pass another --out or delete {out_dir}") from None
    changed = [k for k in identity if old.get(k) != identity[k]]
    if changed:
        raise BuildError(f"{out_dir} was built with another {', '.join(changed)} than this command's: "
                         f"rerun with the original arguments, pass another --out, or delete {out_dir}")
    matching = []
    for shard in old["shards"]:
        if not _file_matches(out_dir, shard):
            log(f"{shard['file']} is missing or differs from {MANIFEST}: rebuilding from there")
            break
        matching.append(shard)
    if old["complete"] and old["max_tokens"] == max_tokens and len(matching) == len(old["shards"]):
        _remove_shards(out_dir, keep={s["file"] for s in matching})
        return old
    held = sum(s["tokens"] for s in matching)
    if max_tokens is not None and held > max_tokens and not truncate:
        raise BuildError(f"{out_dir} already holds {held:,} tokens in {len(matching)} shards, more than "
                         f"--max_tokens {max_tokens:,}: rerun with a larger --max_tokens (or none) to keep "
                         f"them, add --truncate to delete the shards beyond it, or pass another --out")
    kept: list[dict] = []
    for shard in matching:
        total = sum(s["tokens"] for s in kept) + shard["tokens"]
        if shard["tokens"] != identity["shard_size"] or (max_tokens is not None and total > max_tokens):
            break
        kept.append(shard)
    _remove_shards(out_dir, keep={s["file"] for s in kept})
    if max_tokens is not None and held > max_tokens:
        log(f"--truncate: deleted {len(matching) - len(kept)} shards to end at --max_tokens {max_tokens:,}")
    manifest = {**fresh, "shards": kept}
    _update_totals(manifest)
    _write_manifest(out_dir, manifest)
    if kept:
        log(f"resuming: kept {len(kept)} complete shards ({manifest['tokens']:,} tokens); skipping "
            f"the first {manifest['next_document']:,} documents of the source")
    return manifest


def _remove_shards(out_dir: str, keep: set[str]) -> None:
    for name in _shard_files(out_dir):
        if name not in keep:
            os.remove(os.path.join(out_dir, name))


# ----------------------------------------------------------------------------- the build

def _tasks(batches: Iterator[list[str]]) -> Iterator[list[str]]:
    """Re-cut batches so no task holds more than MAX_CHARS_PER_TASK characters (at least one text)."""
    for texts in batches:
        start, chars = 0, 0
        for i, text in enumerate(texts):
            if chars and chars + len(text) > MAX_CHARS_PER_TASK:
                yield texts[start:i]
                start, chars = i, 0
            chars += len(text)
        yield texts[start:]


def build(args: argparse.Namespace, log: Log = print) -> dict:
    """Tokenize the source named by `args` into shards in args.out; returns the final manifest."""
    started = time.perf_counter()
    check_out_dir(args.out)
    files = resolve_local_files(args.local) if args.local else None
    identity = {
        "format": "np.save of 1-D uint16 arrays; <|endoftext|> before each document; shard 0 is val",
        "tokenizer": "gpt2", "vocab_size": get_encoding().n_vocab, "eot": EOT,
        "source": describe_source(args, files), "text_column": args.text_column,
        "shard_size": args.shard_size,
    }
    leave_out = None
    if args.decontaminate:  # part of the identity: a resumed build must drop what the first part dropped
        leave_out, identity["decontaminate"] = contamination.index_for(
            args.decontaminate, args.hellaswag_data, args.include_path)
    manifest = resume_state(args.out, identity, args.max_tokens, log, args.truncate)
    if manifest["complete"]:
        log(f"{args.out} is already complete: {_summary(manifest, args.out)}")
        return manifest
    # --workers is not recorded: it does not change a byte of the output
    manifest["streaming"] = files is not None or not args.no_streaming
    where = f"{args.dataset} {args.subset}" if files is None else f"{len(files):,} local files"
    log(f"tokenizing {where} -> {args.out} with {args.workers} threads")

    batches = _tasks(open_documents(args, files, manifest["next_document"]))
    tokenizing_since = time.perf_counter()  # imports and opening the source are not throughput
    first_tokens, first_documents = manifest["tokens"], manifest["documents"]
    _tokenize(args, batches, manifest, leave_out)
    now = time.perf_counter()
    seconds, tokenizing = now - started, now - tokenizing_since
    tokens, documents = manifest["tokens"] - first_tokens, manifest["documents"] - first_documents
    log(f"done: {_summary(manifest, args.out)}; this run: {documents:,} documents, {tokens:,} tokens "
        f"in {seconds:.1f}s ({seconds - tokenizing:.1f}s of it starting up), {tokens / tokenizing:,.0f} "
        f"tokens/s and {documents / tokenizing:,.0f} documents/s while tokenizing")
    return manifest


def _tokenize(args: argparse.Namespace, batches: Iterator[list[str]], manifest: dict,
              leave_out: contamination.Index | None = None) -> None:
    """Encode the batches on args.workers threads and write the tokens, in source order, into
    shards after the ones `manifest` lists, up to --max_tokens; documents holding one of `leave_out`'s
    n-grams are left out and counted in the manifest's decontaminated_documents."""
    writer = ShardWriter(args.out, args.shard_size, manifest)
    tokens_left = None if args.max_tokens is None else args.max_tokens - manifest["tokens"]
    drop = manifest["next_document_offset"]  # tokens of the first document already in a kept shard
    documents_seen, since = 0, time.perf_counter()
    bar = tqdm(total=args.max_tokens, initial=manifest["tokens"], unit="tok", unit_scale=True,
               dynamic_ncols=True, desc="tokenizing")

    def write(future: Future) -> None:
        nonlocal tokens_left, drop, documents_seen
        tokens, lengths = future.result()
        tokens, drop = tokens[drop:], 0
        if tokens_left is not None:
            tokens = tokens[:tokens_left]
            tokens_left -= len(tokens)
        if leave_out is not None:
            manifest["decontaminated_documents"] = (manifest.get("decontaminated_documents", 0)
                                                    + int(np.count_nonzero(lengths == 0)))
        writer.add(tokens, lengths)
        documents_seen += len(lengths)
        bar.update(len(tokens))
        bar.set_postfix_str(f"{documents_seen / (time.perf_counter() - since):,.0f} docs/s", refresh=False)

    pool = ThreadPoolExecutor(args.workers)
    pending: deque[Future] = deque()
    try:
        for texts in batches:
            pending.append(pool.submit(encode_documents, texts, leave_out))
            # keep every thread busy; take results in submission order, so shards do not depend on
            # which thread finished first
            while pending and (len(pending) > 2 * args.workers or pending[0].done()):
                write(pending.popleft())
            if tokens_left == 0:
                break
        while pending and tokens_left != 0:
            write(pending.popleft())
        writer.finish()
    except BaseException:
        writer.abandon()
        raise
    finally:
        pool.shutdown(cancel_futures=True)
        bar.close()


def check_out_dir(out_dir: str) -> None:
    """Create out_dir if need be; a BuildError now, before any long work, if shards cannot be written there."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise BuildError(f"--out {out_dir} is a file, not a directory: pass another --out")
    try:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        raise BuildError(f"cannot write to --out {out_dir} ({e.strerror or utils.error_line(e)}): pass a writable "
                         f"directory as --out, or fix its permissions") from None


def _summary(manifest: dict, out_dir: str) -> str:
    shards = len(manifest["shards"])
    size = sum(s["bytes"] for s in manifest["shards"])
    size_text = f"{size / 1e9:,.1f} GB" if size >= 1e9 else f"{size / 1e6:,.1f} MB"
    return (f"{manifest['documents']:,} documents, {manifest['tokens']:,} tokens in {shards} shards "
            f"(1 val + {max(shards - 1, 0)} train, {size_text}) in {out_dir}"
            + (f"; {manifest['decontaminated_documents']:,} documents dropped by --decontaminate"
               if "decontaminated_documents" in manifest else ""))


def build_local_corpus(out_dir: str, max_tokens: int = 1_000_000, log: Log = print,
                       sources: str | None = None) -> str:
    """Build a small corpus offline from the Python standard library's own .py files, or the files
    the glob `sources` names (sorted, so deterministic): a val shard and nine train shards of
    max_tokens // 10 tokens, for the tiny config on a machine with no network. Returns out_dir at
    once if it is already complete."""
    manifest_path = os.path.join(out_dir, MANIFEST)
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
        if manifest.get("complete") and manifest.get("max_tokens") == max_tokens and all(
                os.path.isfile(os.path.join(out_dir, s["file"])) for s in manifest["shards"]):
            return out_dir
    sources = sources or os.path.join(os.path.dirname(os.__file__), "*.py")
    # streaming local files leaves nothing worth caching: keep datasets' lock files out of ~/.cache
    with tempfile.TemporaryDirectory() as cache_dir:
        argv = ["--local", sources, "--out", out_dir, "--cache_dir", cache_dir,
                "--shard_size", str(max(max_tokens // 10, 1)), "--max_tokens", str(max_tokens)]
        build(parse_args(argv), log)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    with utils.closed_output_survives():
        _main(parse_args(argv))


def _main(args: argparse.Namespace) -> None:
    try:
        with utils.cli_errors("fineweb_edu.py", expected=(BuildError,)):
            try:
                build(args)
            except OSError as e:  # a full disk, say: the complete shards are safe, and resuming keeps them
                reason = utils.disk_full_message(args.out, e) or utils.error_line(e)
                raise BuildError(f"{reason}; the complete shards in {args.out} are kept: fix this and "
                                 f"rerun the same command to resume") from None
    except KeyboardInterrupt:
        print(f"\ninterrupted: the complete shards in {args.out} are kept; rerun the same command to resume",
              file=sys.stderr, flush=True)
        sys.stdout.flush()
        # Our threads are done (the shard being written was finished, the manifest names it), but
        # the Arrow reader behind `datasets` may still own running C++ threads, and a normal exit
        # then aborts ("terminate called without an active exception", SIGABRT) about one time in
        # twenty: leave without running the C++ destructors.
        os._exit(130)


if __name__ == "__main__":
    main()
