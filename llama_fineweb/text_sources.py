"""Where fineweb_edu.py's documents come from: FineWeb-Edu on the Hugging Face hub, or local files
(parquet, jsonl/json[.gz] or plain text), read in a fixed order as batches of texts.

A failure to open or read a source is one BuildError line: an unreachable hub names the
--local route, a bad row names its file and line.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import gzip
import itertools
import json
import logging
import os
from typing import Iterator

from .utils import UserError, error_line

DOCS_PER_TASK = 128  # per tokenizer task: amortizes the hand-off to a thread, still balances load


class BuildError(UserError, RuntimeError):
    """A problem the user can fix; fineweb_edu.py's main() prints it as one line."""


def resolve_local_files(patterns: list[str]) -> list[str]:
    """The files the globs name, each glob's matches sorted, in glob order, without repeats."""
    files: list[str] = []
    seen = set()
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        if os.path.isdir(pattern):
            pattern = os.path.join(pattern, "**", "*")
        matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not matches:
            raise BuildError(f"--local {pattern!r} matches no files")
        for path in matches:
            if path not in seen:
                seen.add(path)
                files.append(path)
    return files


def file_format(path: str) -> str:
    """How a local file is read: parquet, json (lines, or one list of rows) or text (the whole file)."""
    name = path.lower().removesuffix(".gz")
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "json"
    return "text"


def describe_source(args: argparse.Namespace, files: list[str] | None) -> dict:
    """What the shards are made of, as the manifest records it; a resumed build must match."""
    if files is None:
        return {"type": "hub", "dataset": args.dataset, "subset": args.subset, "split": "train"}
    return {"type": "local", "files": [{"path": p, "bytes": os.path.getsize(p)} for p in files]}


def open_documents(args: argparse.Namespace, files: list[str] | None, skip: int) -> Iterator[list[str]]:
    """Batches of document texts in source order, after the first `skip` documents.

    The hub, parquet and plain text go through `datasets`: streaming for local files and, unless
    --no_streaming, for the hub too, so tokenizing starts without a full download first. The
    sources are opened here, so an unreachable hub fails before any progress bar appears. JSON
    files are read by _json_texts: datasets' json reader turns a chunk whose column mixes types
    into JSON-encoded strings ('"text"', '5') without a word, where we want the row named.
    """
    import datasets  # here, not at the top: --help and an already-complete build never need it

    if files is None:
        # A hub failure becomes one line below; the hub client's retry warnings would bury it.
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
        groups = [("hub", [args.dataset])]
    else:
        groups = [(fmt, list(group)) for fmt, group in itertools.groupby(files, key=file_format)]
    with _source_errors(args, files):
        opened = [(fmt, group, _load(datasets, args, fmt, group)) for fmt, group in groups]
    return _iter_texts(args, files, opened, skip)


def _load(datasets, args: argparse.Namespace, fmt: str, group: list[str]):
    column = "text" if fmt == "text" else args.text_column
    if fmt == "hub":
        return datasets.load_dataset(args.dataset, name=args.subset, split="train",
                                     streaming=not args.no_streaming, cache_dir=args.cache_dir,
                                     columns=[column])
    if fmt == "parquet":
        _check_parquet_column(group, column)
        return datasets.load_dataset("parquet", data_files=group, split="train", streaming=True,
                                     cache_dir=args.cache_dir, columns=[column])
    if fmt == "json":
        return None
    # one file = one document; a stray undecodable byte should not stop a long build
    return datasets.load_dataset("text", data_files=group, split="train", streaming=True,
                                 cache_dir=args.cache_dir, sample_by="document", encoding_errors="replace")


def _iter_texts(args: argparse.Namespace, files: list[str] | None, opened: list, skip: int) -> Iterator[list[str]]:
    with _source_errors(args, files):
        for fmt, group, ds in opened:
            for texts in _batches(args, fmt, group, ds):
                if skip:
                    dropped = min(skip, len(texts))
                    texts, skip = texts[dropped:], skip - dropped
                if texts:
                    # A null text is an empty document: keeping it keeps document indices = row indices.
                    yield [t if t is not None else "" for t in texts]


def _batches(args: argparse.Namespace, fmt: str, group: list[str], ds) -> Iterator[list[str | None]]:
    if fmt == "json":
        texts = itertools.chain.from_iterable(_json_texts(path, args.text_column) for path in group)
        while batch := list(itertools.islice(texts, DOCS_PER_TASK)):
            yield batch
        return
    column = "text" if fmt == "text" else args.text_column
    for batch in ds.iter(batch_size=DOCS_PER_TASK):
        if column not in batch:
            raise BuildError(f"no {column!r} in {fmt} rows (keys: {sorted(batch)}) of {group[0]}...: "
                             f"pass --text_column NAME")
        yield batch[column]


def _json_texts(path: str, column: str) -> Iterator[str | None]:
    """`column` of each row of a JSON-lines file (blank lines skipped) or of a JSON file holding one
    list of rows; a row without it, or whose text is not a string (null is an empty document), is a
    BuildError naming the file and the row."""
    try:
        with (gzip.open if path.lower().endswith(".gz") else open)(path, "rt", encoding="utf-8-sig") as f:
            one_list = f.read(64).lstrip().startswith("[")  # a JSON list of rows, not JSON lines
            f.seek(0)
            if one_list:
                rows = ((f"row {i} of {path}", row) for i, row in enumerate(json.load(f), 1))
            else:
                rows = ((f"line {i} of {path}", _json_line(line, i, path)) for i, line in enumerate(f, 1)
                        if line.strip())
            for where, row in rows:
                if not isinstance(row, dict) or column not in row:
                    keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                    raise BuildError(f"{where} has no {column!r} (it holds {keys}): pass --text_column NAME")
                if row[column] is not None and not isinstance(row[column], str):
                    raise BuildError(f"{where} holds {type(row[column]).__name__} {repr(row[column])[:40]} in "
                                     f"{column!r}, not a string: fix that row, or pass --text_column NAME")
                yield row[column]
    except (OSError, ValueError, EOFError) as e:  # unreadable, not gzip, not UTF-8, a broken JSON list
        raise BuildError(f"cannot read {path} ({error_line(e)})") from None


def _json_line(line: str, number: int, path: str) -> object:
    try:
        return json.loads(line)
    except ValueError as e:
        raise BuildError(f"line {number} of {path} is not JSON ({error_line(e)}): fix or remove that line") from None


@contextlib.contextmanager
def _source_errors(args: argparse.Namespace, files: list[str] | None) -> Iterator[None]:
    """Turn a failure to open or read the source into one BuildError line."""
    try:
        yield
    except BuildError:
        raise
    except Exception as e:
        reason = error_line(e)
        if files is None:
            raise BuildError(
                f"could not read {args.dataset} {args.subset} from the Hugging Face hub ({reason}); "
                f"without network, pass local files instead: python fineweb_edu.py --local "
                f"'DIR/*.parquet' --out OUT (parquet, jsonl[.gz] or plain text files)") from None
        raise BuildError(f"could not read the --local files ({reason})") from None




def _check_parquet_column(files: list[str], column: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for path in files:
        schema = pq.read_schema(path)
        if column not in schema.names:
            raise BuildError(f"{path} has no column {column!r} (columns: {schema.names}): pass --text_column NAME")
        kind = schema.field(column).type
        if kind not in (pa.string(), pa.large_string(), pa.null()):
            raise BuildError(f"{path}'s column {column!r} holds {kind}, not text: pass --text_column NAME")
