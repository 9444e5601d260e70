"""Token shards -> training and validation batches, in an order that does not depend on the GPU count.

The train shards of a data directory, concatenated in index order, are one token stream. It is cut
into non-overlapping windows of T+1 tokens: sequence i is stream[i*(T+1) : (i+1)*(T+1)], x its first
T tokens and y its last T. An epoch visits every sequence once, in the order of a permutation seeded
with seed + epoch (or in stream order, the reference's, with shuffle=False); epochs follow each other
into one endless global stream of sequences.

Global batch k is global-stream sequences [k*G, (k+1)*G). Within it, micro-step m of rank r takes
the B sequences from k*G + m*B*W + r*B, so W GPUs with A accumulation steps see exactly what one GPU
with W*A steps sees. The loader's whole position is one number, the sequences consumed, which is why
a run can resume on another GPU count (same G) and see the same batches. Validation is a fixed
set, the val split's first windows in order: a ValLoader opens it once per run and yields this
rank's share each time it is iterated.

Shards are memory-mapped and the pages read are handed back to the kernel as we go, so resident
memory stays flat however many shards are read. Each shard's header is checked when it is opened,
and the token ids of every batch against the vocabulary as it is read (one max over the batch), so
start-up reads no shard whole and bad data fails at the first batch that holds it: a one-line
DataError naming the file and the position. A shard that manifest.json lists with its size, its
sampled fingerprint and a max_token below the vocabulary is not checked at all; a shard whose
size or fingerprint no longer matches the manifest (rewritten in place since the build) is refused.
A directory holding shards of two name prefixes (`copy_of_edufineweb_train_000001.npy` beside the
real ones) or one index twice is refused too: every file there would be read as part of the data.

This module owns the shard names (shard_name, SHARD_RE) and the data's identity: data_identity()
records each train shard's name, size and hashes (the manifest's sha256 where it lists the shard,
and always a fingerprint sampled from the file itself), TrainLoader saves it with its position, and
load_state_dict refuses to continue on other data unless asked to (check_same_data, which
mixture.py's sources go through too; identity_differences says what changed).
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import mmap
import os
import queue
import re
import threading
from typing import Callable, Iterator

import numpy as np
import torch

from .utils import UserError, error_line

# build-nanogpt's names, so its shards load here and ours there: shard 0 is the validation split
SHARD_PREFIX = "edufineweb"
SHARD_PATTERN = rf"{SHARD_PREFIX}_(val|train)_(\d{{6,}})\.npy"  # what fineweb_edu.py writes
# What the loader reads: any PREFIX_train_N.npy / PREFIX_val_N.npy, as other nanoGPT-style tools name them
SHARD_RE = re.compile(r"^[\w.-]*?_(val|train)_(\d+)\.npy$")
MANIFEST = "manifest.json"
RELEASE_EVERY = 64 << 20  # bytes mapped in, at most, between handing the pages back
FAULT_AROUND = 2 << 20  # one page fault may map this much: a whole large folio of the page cache
FINGERPRINT_EDGE = 1 << 20  # bytes hashed at each end of a shard the manifest does not vouch for...
FINGERPRINT_BLOCKS, FINGERPRINT_BLOCK = 8, 64 << 10  # ...and in evenly spaced blocks between


class DataError(UserError, ValueError):
    """Missing, corrupt or unusable data; the message is one line that names the file (a ValueError
    too, as it was before user errors had a type of their own)."""


def shard_name(index: int) -> str:
    """The file name of shard `index`: edufineweb_val_000000.npy, edufineweb_train_000001.npy, ..."""
    return f"{SHARD_PREFIX}_{'val' if index == 0 else 'train'}_{index:06d}.npy"


def shard_paths(data_dir: str, split: str) -> list[str]:
    """The split's shards in data_dir, in index order."""
    if not os.path.isdir(data_dir):
        raise DataError(f"data directory {data_dir!r} does not exist: build it with "
                        f"`python fineweb_edu.py --out {data_dir}` (add --local 'GLOB' for local text)")
    names = sorted(os.listdir(data_dir))
    refuse_mixed_shards(data_dir, names)
    found = []
    for name in names:
        match = SHARD_RE.match(name)
        if match and match.group(1) == split:
            found.append((int(match.group(2)), name))
    if not found:
        raise DataError(f"no {split} shards (*_{split}_NNNNNN.npy) in {data_dir!r}: build "
                        f"them with `python fineweb_edu.py --out {data_dir}`")
    return [os.path.join(data_dir, name) for _, name in sorted(found)]


def refuse_mixed_shards(data_dir: str, names: list[str]) -> None:
    """DataError naming the files when data_dir's shards carry more than one name prefix or one
    split's index appears twice: the loader reads every shard-named file as one stream, so a stray
    copy (copy_of_edufineweb_train_000001.npy) would silently become more training data."""
    prefixes: dict[str, list[str]] = {}
    indices: dict[tuple[str, int], list[str]] = {}
    for name in names:
        match = SHARD_RE.match(name)
        if match:
            prefixes.setdefault(name[:match.start(1) - 1], []).append(name)
            indices.setdefault((match.group(1), int(match.group(2))), []).append(name)
    if len(prefixes) > 1:
        counted = ", ".join(f"{prefix}_* ({len(files)} files, e.g. {files[0]})" for prefix, files in prefixes.items())
        raise DataError(f"{data_dir} holds shards of {len(prefixes)} name prefixes: {counted}; they would all be "
                        f"read as one dataset: move the files that do not belong to it out of the directory")
    twice = next(((split, index, files) for (split, index), files in indices.items() if len(files) > 1), None)
    if twice:
        split, index, files = twice
        raise DataError(f"{data_dir} holds {split} shard {index} twice ({', '.join(files)}): both would be read; "
                        f"move the one that does not belong out of the directory")


def read_manifest(data_dir: str) -> tuple[dict[str, dict], str | None]:
    """manifest.json's shard entries by file name and the sha256 of its bytes; ({}, None) if there is none."""
    path = os.path.join(data_dir, MANIFEST)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return {}, None
    try:
        entries = {s["file"]: s for s in json.loads(raw)["shards"]}
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path} is not a readable manifest ({error_line(e)}): restore it from the build "
                        f"that wrote the shards, or delete it") from None
    return entries, hashlib.sha256(raw).hexdigest()


def fingerprint(path: str) -> str:
    """fingerprint() of `path`, computed once per process for a file that has not changed since."""
    stat = os.stat(path)
    return _fingerprint(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _fingerprint(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a shard's first and last FINGERPRINT_EDGE bytes and FINGERPRINT_BLOCKS blocks between:
    tells rebuilt shards apart without reading whole files (a shard smaller than that is read whole)."""
    size = os.path.getsize(path)
    sha = hashlib.sha256(size.to_bytes(8, "little"))
    middle = size - 2 * FINGERPRINT_EDGE
    if middle <= FINGERPRINT_BLOCKS * FINGERPRINT_BLOCK:
        spans = [(0, size)]
    else:
        step = middle // FINGERPRINT_BLOCKS
        spans = ([(0, FINGERPRINT_EDGE)]
                 + [(FINGERPRINT_EDGE + k * step, FINGERPRINT_BLOCK) for k in range(FINGERPRINT_BLOCKS)]
                 + [(size - FINGERPRINT_EDGE, FINGERPRINT_EDGE)])
    with open(path, "rb") as f:
        for offset, length in spans:
            f.seek(offset)
            sha.update(f.read(length))
    return sha.hexdigest()


def data_identity(data_dir: str) -> dict:
    """What a run trains on: each train shard's size and content hashes, and the manifest's digest.

    Every shard gets a fingerprint() of the file itself (a few MiB read), so a shard rewritten in
    place at the same size shows even beside a stale manifest; manifest.json's sha256 is recorded
    beside it where the manifest lists the shard with the same size.
    """
    entries, digest = read_manifest(data_dir)
    shards = {}
    for path in shard_paths(data_dir, "train"):
        name, size = os.path.basename(path), os.path.getsize(path)
        entry = entries.get(name, {})
        shards[name] = {"bytes": size, "fingerprint": fingerprint(path)}
        if entry.get("bytes") == size and "sha256" in entry:
            shards[name]["sha256"] = entry["sha256"]
    return {"shards": shards, "manifest": digest}


def refuse_stale_manifest(data_dir: str, paths: list[str], entries: dict[str, dict]) -> None:
    """DataError for a shard that manifest.json lists with a fingerprint but whose size or sampled
    fingerprint no longer matches it: the file was rewritten after the build (e.g. by another
    tokenizer script writing into the same directory), so the manifest's sha256 and max_token
    describe other bytes. Entries without a fingerprint (older builds) are trusted by size alone."""
    for path in paths:
        entry = entries.get(os.path.basename(path))
        if not entry or "fingerprint" not in entry:
            continue
        size = os.path.getsize(path)
        if entry.get("bytes") != size or entry["fingerprint"] != fingerprint(path):
            what = f"is {size:,} bytes, not {entry.get('bytes')!r}" if entry.get("bytes") != size else \
                "has other bytes than its sampled fingerprint there records"
            raise DataError(f"{path} no longer matches {os.path.join(data_dir, MANIFEST)}: it {what} (rewritten "
                            f"since the build?); rebuild the directory with fineweb_edu.py, or delete "
                            f"{MANIFEST} to use the files as they are (their token ids are then checked as read)")


def identity_differences(saved: dict, current: dict) -> list[str]:
    """How `current` differs from `saved` (two data_identity() results): "added: ...", "removed: ...",
    "changed: ...", each naming the shards; empty when they are the same data.

    A shard hashed one way in one and the other way in the other (manifest.json removed or added
    since) is compared by size; the manifests' digests are compared when both have one.
    """
    old, new = saved["shards"], current["shards"]
    changed = [name for name in sorted(old.keys() & new.keys()) if not _same_content(old[name], new[name])]
    if saved.get("manifest") and current.get("manifest") and saved["manifest"] != current["manifest"]:
        changed.append(MANIFEST)
    differences = []
    for what, names in [("added", sorted(new.keys() - old.keys())),
                        ("removed", sorted(old.keys() - new.keys())), ("changed", changed)]:
        if names:
            listed = ", ".join(names) if len(names) <= 3 else f"{len(names)} files, {names[0]} ... {names[-1]}"
            differences.append(f"{what}: {listed}")
    return differences


def check_same_data(saved: dict | None, current: dict, where: str, accept_new_data: bool,
                    log: Callable[[str], None], source: tuple[int, str] | None = None) -> None:
    """Refuse to resume on data other than the checkpoint's, unless accept_new_data (then log it).

    `saved` and `current` are data_identity() results, `where` the directory `current` was read
    from. `source` is (its place, the checkpoint's directory there) for a mixture source, so the
    refusal says which one. A checkpoint that records no identity (older than them) is let through
    with a note.
    """
    if saved is None:
        log(f"train data: the checkpoint records no data identity (it predates them), so it could "
            f"not be checked that {where} holds the data it was trained on" if source is None else
            f"train data: the checkpoint records no data identity for {where}; it was not checked")
        return
    differences = identity_differences(saved, current)
    if not differences:
        return
    listed = "; ".join(differences)
    if not accept_new_data and source is None:
        raise DataError(f"the data in {where} differs from the checkpoint's ({listed}): "
                        f"rebuild or restore the original shards, or pass --accept_new_data=true "
                        f"to continue on this data (from this position on, the order is the new "
                        f"data's permutation)")
    if not accept_new_data:
        index, saved_dir = source
        raise DataError(f"the data in {where} (mixture source {index}) differs from the "
                        f"checkpoint's {saved_dir} ({listed}): restore it, keep the sources in "
                        f"their order, or pass --accept_new_data=true to continue on this data")
    log(f"train data: the data in {where} differs from the checkpoint's ({listed}); continuing on "
        f"it as accept_new_data asks, from the same position in its own order")


def _same_content(a: dict, b: dict) -> bool:
    return a["bytes"] == b["bytes"] and all(a[k] == b[k] for k in ("sha256", "fingerprint") if k in a and k in b)


def open_shard(path: str) -> np.memmap:
    """Memory-map a shard, checking that it is a complete 1-D uint16 .npy file."""
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:
        raise DataError(f"{path} is not a readable .npy token shard ({error_line(e)}): "
                        f"delete it and rebuild with fineweb_edu.py") from None
    if not isinstance(tokens, np.memmap) or tokens.dtype != np.dtype("<u2") or tokens.ndim != 1:
        raise DataError(f"{path} holds {getattr(tokens, 'dtype', type(tokens).__name__)} of shape "
                        f"{getattr(tokens, 'shape', '?')}, not a 1-D uint16 token array: "
                        f"delete it and rebuild with fineweb_edu.py")
    size = os.path.getsize(path)
    if tokens.offset + tokens.nbytes != size:
        raise DataError(f"{path} is {size} bytes, not the {tokens.offset + tokens.nbytes} its header "
                        f"announces: delete it and rebuild with fineweb_edu.py")
    return tokens


def _allow_open_files(count: int, data_dir: str) -> None:
    """Each memory map keeps a file descriptor open: make room for `count` of them and some spare."""
    try:
        import resource
    except ImportError:  # not a POSIX system
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = count + 512
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    if hard != resource.RLIM_INFINITY and hard < wanted:
        raise DataError(f"the {count} shards in {data_dir!r} need {wanted} open files but the limit is "
                        f"{hard}: raise it (ulimit -n) or rebuild with a bigger --shard_size")
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


class TokenStream:
    """A split's shards as one token stream, read through memory maps."""

    def __init__(self, data_dir: str, split: str, vocab_size: int | None = None):
        self.paths = shard_paths(data_dir, split)
        _allow_open_files(len(self.paths), data_dir)
        self.shards = [open_shard(p) for p in self.paths]
        self.arrays = [np.asarray(s) for s in self.shards]  # plain views: slicing a memmap costs twice as much
        self.starts = np.cumsum([0] + [len(s) for s in self.shards]).tolist()  # stream offset of each shard
        self.total = self.starts[-1]
        self.vocab_size = vocab_size
        entries = read_manifest(data_dir)[0]
        refuse_stale_manifest(data_dir, self.paths, entries)
        # fineweb_edu.py took max_token from the very buffer it saved: a shard whose size and
        # fingerprint match that entry needs no check
        self.vouched = [vocab_size is None or _vouched(entries.get(os.path.basename(p)), p, vocab_size)
                        for p in self.paths]
        self.tokens_checked = 0  # token ids compared against the vocabulary so far
        self.mapped_since_release = 0

    def read(self, start: int, out: np.ndarray) -> None:
        """Fill `out` with the stream's tokens from `start` on, across shard boundaries if need be."""
        i = bisect.bisect_right(self.starts, start) - 1
        done = 0
        while done < len(out):
            shard = self.arrays[i]
            offset = start + done - self.starts[i]
            take = min(len(out) - done, len(shard) - offset)
            out[done:done + take] = shard[offset:offset + take]
            done += take
            i += 1
        # a short read can map far more than its own bytes: count it as at least one fault-around
        self.mapped_since_release += max(out.nbytes, FAULT_AROUND)
        if self.mapped_since_release >= RELEASE_EVERY:
            self.release()

    def read_windows(self, starts: list[int], length: int) -> np.ndarray:
        """Row i = the stream's `length` tokens from starts[i], as a uint16 array, with its token ids
        checked against the vocabulary unless the manifest vouches for every shard the rows touch."""
        rows = np.empty((len(starts), length), dtype=np.uint16)
        for row, start in zip(rows, starts):
            self.read(start, row)
        if not all(self._vouched_for(start, length) for start in starts):
            self._check(rows, starts)
        return rows

    def _vouched_for(self, start: int, length: int) -> bool:
        first = bisect.bisect_right(self.starts, start) - 1
        last = bisect.bisect_right(self.starts, start + length - 1) - 1
        return all(self.vouched[first:last + 1])

    def _check(self, rows: np.ndarray, starts: list[int]) -> None:
        # one max over the whole batch: checking only what is read keeps start-up free of full-shard scans
        self.tokens_checked += rows.size
        if int(rows.max(initial=0)) < self.vocab_size:
            return
        row, column = np.argwhere(rows >= self.vocab_size)[0]
        at = starts[row] + int(column)
        i = bisect.bisect_right(self.starts, at) - 1
        raise DataError(f"{self.paths[i]} holds token id {int(rows[row, column])} at position "
                        f"{at - self.starts[i]}, but vocab_size is {self.vocab_size}: it was built with "
                        f"another tokenizer or is corrupt; rebuild it with fineweb_edu.py")

    def release(self) -> None:
        """Hand the mapped pages back: they stay in the page cache, but leave our resident set."""
        for shard in self.shards:
            _release(shard)
        self.mapped_since_release = 0


def _vouched(entry: dict | None, path: str, vocab_size: int) -> bool:
    # refuse_stale_manifest has already compared the fingerprint; without one, size alone cannot
    # tell a rewritten shard from the one the manifest describes
    return (entry is not None and entry.get("bytes") == os.path.getsize(path) and "fingerprint" in entry
            and isinstance(entry.get("max_token"), int) and entry["max_token"] < vocab_size)


def _release(shard: np.memmap) -> None:
    if hasattr(mmap, "MADV_DONTNEED") and isinstance(getattr(shard, "_mmap", None), mmap.mmap):
        shard._mmap.madvise(mmap.MADV_DONTNEED)


def _windows(stream: TokenStream, sequence_ids: list[int], seq_len: int,
             pin_memory: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y for the given sequences: (len(ids), seq_len) int64 each, y = x shifted by one."""
    rows = stream.read_windows([sequence * (seq_len + 1) for sequence in sequence_ids], seq_len + 1)
    x = torch.from_numpy(rows[:, :-1].astype(np.int64))  # (B, T), contiguous
    y = torch.from_numpy(rows[:, 1:].astype(np.int64))
    if pin_memory:
        x, y = x.pin_memory(), y.pin_memory()
    return x, y


def _pinnable(pin_memory: bool) -> bool:
    # pinning needs an accelerator; without one the same tensors, unpinned, are the right answer
    return pin_memory and torch.cuda.is_available()


class GlobalOrder:
    """Which items (sequences, examples) each rank's micro-steps take, whatever the world size.

    Epoch e visits the n items in a permutation seeded with seed + e (in index order without
    shuffle); epochs follow each other into one global stream. Global batch k is stream positions
    [k*G, (k+1)*G); micro-step m of rank r takes the B positions from k*G + m*B*W + r*B. The whole
    position is one number, the items consumed, so a state saved on W GPUs resumes on any other
    count with the same G. The pretraining and the fine-tuning loaders share this arithmetic.
    """

    # The batch geometry and the shuffle, each with its own meaning; an options object would only
    # rename them.
    def __init__(self, n: int, global_batch: int, micro_batch: int, rank: int = 0, world_size: int = 1,
                 seed: int = 1337, shuffle: bool = True, log: Callable[[str], None] = print,
                 unit: str = "sequences", every_epoch: bool = True):
        if global_batch % (micro_batch * world_size) != 0:
            raise DataError(f"global_batch {global_batch} {unit} is not a multiple of micro_batch "
                             f"{micro_batch} x world_size {world_size} = {micro_batch * world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.n, self.global_batch, self.micro_batch = n, global_batch, micro_batch
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.log, self.unit = log, unit
        self.step = 0  # micro-steps taken by this rank; global batch step // accum_steps
        self.skipped: list[tuple[int, int]] = []  # [start, end) global batches never served, merged
        self._orders: dict[int, np.ndarray] = {}
        # False logs only the first new epoch: a fine-tuning run may go through seventy of them
        self.every_epoch, self._epoch_logged = every_epoch, False

    @property
    def accum_steps(self) -> int:
        return self.global_batch // (self.micro_batch * self.world_size)

    def _order(self, epoch: int) -> np.ndarray:
        """Epoch `epoch`'s order; the two latest are kept, as a batch may straddle two."""
        if epoch not in self._orders:
            order = np.arange(self.n, dtype=np.uint32 if self.n < 2**32 else np.int64)
            if self.shuffle:
                np.random.default_rng(self.seed + epoch).shuffle(order)
            if epoch > 0 and (self.every_epoch or not self._epoch_logged):
                self._epoch_logged = True
                how = f"a new permutation (seed {self.seed + epoch})" if self.shuffle else "index order again"
                later = "" if self.every_epoch else "; each later epoch likewise, with the next seed (not logged)"
                self.log(f"epoch {epoch} starts after {epoch * self.n:,} {self.unit}, in {how}{later}")
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}
            self._orders[epoch] = order
        return self._orders[epoch]

    def ids(self, step: int) -> list[int]:
        """The items of this rank's micro-step `step` (counted from the start of training)."""
        batch, micro = divmod(step, self.accum_steps)
        first = batch * self.global_batch + (micro * self.world_size + self.rank) * self.micro_batch
        return self._items(first, self.micro_batch)

    def step_ids(self, step: int) -> list[int]:
        """The items of the whole global batch (every rank, every micro-step) that micro-step
        `step` belongs to."""
        return self._items(step // self.accum_steps * self.global_batch, self.global_batch)

    def _items(self, first: int, count: int) -> list[int]:
        """The items at stream positions [first, first + count)."""
        return [int(self._order(p // self.n)[p % self.n]) for p in range(first, first + count)]

    def skip(self, windows: list) -> None:
        """Never serve global batches in these half-open [start, end) windows (merged with those
        already skipped); the next batch served moves past any window it falls in. Windows are in
        global batch indices of the data order, so they mean the same on any GPU count."""
        merged: list[tuple[int, int]] = []
        for start, end in sorted([*self.skipped, *((int(a), int(b)) for a, b in windows)]):
            if not 0 <= start < end:
                raise ValueError(f"skip window {start}:{end} is empty or negative: use START:END with START < END")
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], end))
            else:
                merged.append((start, end))
        self.skipped = merged
        self.step = self.following(self.step - 1) if self.step % self.accum_steps == 0 else self.step

    def following(self, step: int) -> int:
        """The micro-step that comes after `step`: the next one, or, at the end of a global batch,
        the first of the next batch not in a skipped window."""
        step += 1
        if step % self.accum_steps:
            return step
        batch = step // self.accum_steps
        for start, end in self.skipped:
            if start <= batch < end:
                batch = end
        return batch * self.accum_steps

    @property
    def batch(self) -> int:
        """The global batch index (of the data order) this rank's next micro-step belongs to."""
        return self.step // self.accum_steps

    def position(self) -> int:
        """Items of the global stream consumed; only between optimizer steps."""
        batches, micro = divmod(self.step, self.accum_steps)
        if micro:
            raise ValueError(f"the position was asked after micro-step {micro} of {self.accum_steps} of a "
                             f"global batch: save between optimizer steps")
        return batches * self.global_batch

    def seek(self, position: int) -> None:
        """Continue from a saved position, whatever the world size and micro-batch that saved it."""
        if position % self.global_batch:
            raise DataError(f"saved position {position} is not a multiple of global_batch "
                             f"{self.global_batch}: resume with the global batch that saved it")
        self.step = position // self.global_batch * self.accum_steps
        self.skip([])  # a position inside a skipped window moves past it


class FollowsOrder:
    """A loader whose batches follow a GlobalOrder in `self.order` (TrainLoader, finetune's
    SFTLoader): the counters the training loop reads."""

    order: GlobalOrder

    @property
    def accum_steps(self) -> int:
        return self.order.accum_steps

    @property
    def step(self) -> int:
        """Micro-steps taken by this rank."""
        return self.order.step

    def skip(self, windows: list) -> None:
        """Never serve these [start, end) global batches (GlobalOrder.skip); kept in state_dict()."""
        self.close()  # batches built ahead may be ones now skipped
        self.order.skip(windows)

    def order_state(self) -> dict:
        """What the loader's state_dict() holds of its order: the position and the skipped windows."""
        return {"position": self.order.position(), "skip_batches": [list(w) for w in self.order.skipped]}

    def seek_order(self, state: dict) -> None:
        """The order_state() of a checkpoint: its windows (added to this run's) and its position."""
        self.order.skip(state.get("skip_batches", []))
        self.order.seek(int(state["position"]))

    def close(self) -> None:
        pass


class TrainLoader(FollowsOrder):
    """This rank's training micro-batches, cut from the world-size-independent global stream."""

    # Many parameters on purpose: the loader stands alone (tests, benchmarks, other scripts use it
    # without a TrainConfig); all but the first four are keywords with defaults.
    def __init__(self, data_dir: str, seq_len: int, micro_batch: int, global_batch: int,
                 rank: int = 0, world_size: int = 1, seed: int = 1337, shuffle: bool = True,
                 vocab_size: int | None = None, pin_memory: bool = False, prefetch: bool = False,
                 log: Callable[[str], None] = print):
        self.seq_len, self.seed, self.shuffle = seq_len, seed, shuffle
        self.pin_memory = _pinnable(pin_memory)
        self.prefetch = prefetch
        self.log = log
        self.data_dir = data_dir
        self.stream = TokenStream(data_dir, "train", vocab_size)
        self.identity = data_identity(data_dir)  # once: the shards do not change under a running job
        self.sequences_per_epoch = self.stream.total // (seq_len + 1)
        if self.sequences_per_epoch == 0:
            raise DataError(f"the train shards in {data_dir!r} hold {self.stream.total:,} tokens, fewer "
                            f"than seq_len + 1 = {seq_len + 1}: build more data or lower seq_len")
        self.order = GlobalOrder(self.sequences_per_epoch, global_batch, micro_batch, rank, world_size, seed,
                                 shuffle, log=lambda line: log(f"train data: {line}"))
        self._worker: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        order = f"shuffled with seed {seed} + epoch" if shuffle else "in stream order"
        log(f"train data: {len(self.stream.paths)} shards, {self.stream.total:,} tokens = "
            f"{self.sequences_per_epoch:,} sequences of {seq_len + 1} tokens per epoch, {order}; "
            f"{global_batch} sequences per step = {self.accum_steps} micro-steps of {micro_batch} "
            f"x {world_size} ranks")

    def _make(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _windows(self.stream, self.order.ids(step), self.seq_len, self.pin_memory)

    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
        """Micro-step `step`'s x, y again, and where each sequence comes from (its shard and token
        offset there): for the forensics of a spike."""
        ids = self.order.ids(step)
        sources = []
        for sequence in ids:
            at = sequence * (self.seq_len + 1)
            i = bisect.bisect_right(self.stream.starts, at) - 1
            sources.append({"sequence": sequence, "shard": os.path.basename(self.stream.paths[i]),
                            "offset": at - self.stream.starts[i]})
        return (*_windows(self.stream, ids, self.seq_len, False), sources)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next micro-batch: x, y of shape (micro_batch, seq_len), int64."""
        if not self.prefetch:
            batch = self._make(self.step)
        else:
            if self._worker is None:
                self._start_worker()
            batch = self._queue.get()
            if isinstance(batch, BaseException):
                self._worker = None
                raise batch
        self.order.step = self.order.following(self.order.step)
        return batch

    def _start_worker(self) -> None:
        # Batches are a pure function of the step, so a thread can build them ahead; it has the
        # stream to itself, and its numpy copies and page faults overlap the GPU's work.
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=4)
        self._worker = threading.Thread(target=self._fill, args=(self.step, self._stop, self._queue),
                                        daemon=True, name="TrainLoader prefetch")
        self._worker.start()

    def _fill(self, step: int, stop: threading.Event, out: queue.Queue) -> None:
        while not stop.is_set():
            try:
                item = self._make(step)
            except BaseException as e:  # handed to next_batch, which raises it in the training thread
                item = e
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue.Full:
                    pass
            if isinstance(item, BaseException):
                return
            step = self.order.following(step)

    def close(self) -> None:
        """Stop the prefetch thread, if any."""
        if self._worker is not None:
            self._stop.set()
            self._worker.join()
            self._worker = None

    def state_dict(self) -> dict:
        """The loader's position: sequences of the global stream consumed, at a global-batch boundary."""
        return {**self.order_state(), "seed": self.seed, "seq_len": self.seq_len,
                "shuffle": self.shuffle, "data": self.identity}

    def load_state_dict(self, state: dict, accept_new_data: bool = False) -> None:
        """Continue from a saved position, whatever the world size and micro-batch that saved it.

        The data must be the data the state was saved on (see data_identity); with accept_new_data
        a difference is logged instead and the run goes on from the same position in the new data.
        """
        for key in ("seed", "seq_len", "shuffle"):
            if state[key] != getattr(self, key):
                raise DataError(f"the saved loader state has {key}={state[key]!r} but this loader "
                                 f"{key}={getattr(self, key)!r}: use the saved value to resume")
        if "mixture" in state:  # mixture.MixtureLoader's: each source has its own position
            sources = ",".join(f"{s['data_dir']}:{s['weight']}" for s in state["mixture"])
            raise DataError(f"the checkpoint trained on a data mixture: resume with --data_mix={sources}")
        check_same_data(state.get("data"), self.identity, self.data_dir, accept_new_data, self.log)
        self.close()
        self.seek_order(state)


class ValLoader:
    """This rank's share of the fixed validation set, in micro_batch batches (the last may be smaller).

    The set is the first max_sequences (default: all) non-overlapping (T+1)-token windows of the val
    split, the same for every world size; rank r of W takes the contiguous r-th W-th of it. The
    stream is opened once, here, so missing or broken val data fails at construction; each
    iteration yields the same batches again.
    """

    # Like TrainLoader's: usable without a TrainConfig; the last five are keywords with defaults.
    def __init__(self, data_dir: str, seq_len: int, micro_batch: int, rank: int = 0, world_size: int = 1,
                 max_sequences: int | None = None, vocab_size: int | None = None, pin_memory: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.stream = TokenStream(data_dir, "val", vocab_size)
        count = self.stream.total // (seq_len + 1)
        if count == 0:
            raise DataError(f"the val shards in {data_dir!r} hold {self.stream.total:,} tokens, fewer than "
                            f"seq_len + 1 = {seq_len + 1}: build more data or lower seq_len")
        if max_sequences is not None:
            count = min(count, max_sequences)
        self.first, self.last = rank * count // world_size, (rank + 1) * count // world_size
        self.seq_len, self.micro_batch = seq_len, micro_batch
        self.pin_memory = _pinnable(pin_memory)

    def __len__(self) -> int:
        return -(-(self.last - self.first) // self.micro_batch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(self.first, self.last, self.micro_batch):
            ids = list(range(start, min(start + self.micro_batch, self.last)))
            yield _windows(self.stream, ids, self.seq_len, self.pin_memory)
        self.stream.release()  # between evaluations the val pages need not stay resident


# ValLoader's parameters, passed through.
def val_batches(data_dir: str, seq_len: int, micro_batch: int, rank: int = 0, world_size: int = 1,
                max_sequences: int | None = None, vocab_size: int | None = None,
                pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One pass over ValLoader(...) with the same arguments; bad data raises here, at the call."""
    return iter(ValLoader(data_dir, seq_len, micro_batch, rank, world_size, max_sequences, vocab_size,
                          pin_memory))
