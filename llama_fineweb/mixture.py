"""A weighted mixture of shard directories: training batches drawn from several sources in set shares.

    --data_mix=data/edu:0.9,data/code:0.1

Each source is a data directory as dataloader.py reads it, with its own token stream, its own
seeded permutation per epoch and its own epoch count. Global batch k is still G sequences of one
global stream, sliced across ranks and micro-steps exactly as GlobalOrder slices it; what changes is
which source each stream position draws from. That is decided position by position by the
largest-credit rule (smooth weighted round robin): every source earns its weight, the richest
takes the position and pays the total. Over any prefix a source's count stays within one sequence
of weight x positions, so the share over any window of steps is as close to the weight as whole
sequences allow, and it depends only on the weights and the position: not on the GPU count.

The loader's state is, per source, the sequences it has given and its credit (two integers), plus
the global position; a resume on any GPU count continues the same batches. New weights on resume
are allowed with a warning: each source continues from its own position, the credits start afresh.
"""

from __future__ import annotations

import bisect
import math
import os
import threading
from fractions import Fraction
from typing import Callable, Iterator

import numpy as np
import torch

from .dataloader import (DataError, GlobalOrder, TokenStream, TrainLoader, ValLoader, _pinnable,
                         check_same_data, data_identity)

# Source i permutes epoch e with seed + e + i * SOURCE_SEED_STRIDE: source 0 has the single-directory
# order (so a one-directory run can go on as source 0 of a mixture), and no two sources share a seed.
SOURCE_SEED_STRIDE = 1_000_003
KEPT_STATES = 256  # batch-start states kept: the training thread and the prefetch thread stay within these


def parse_data_mix(text: str) -> list[tuple[str, Fraction]]:
    """'DIR:WEIGHT,DIR:WEIGHT' -> [(dir, weight)], weights as exact fractions (any positive scale).

    A weight is read exactly as written (0.1234567 is 1234567/10^7, 1e-7 stays positive): the plan
    honours any positive weight, a tiny one by a sequence every so many."""
    sources = []
    for part in text.split(","):
        path, _, weight = part.strip().rpartition(":")
        try:
            value = Fraction(weight.strip())
        except (ValueError, ZeroDivisionError):
            value = None
        if not path or value is None or value < 0:
            raise DataError(f"--data_mix entry {part.strip()!r} is not DIR:WEIGHT with a weight >= 0 "
                            f"(example: --data_mix=data/edu:0.9,data/code:0.1)")
        sources.append((path, value))
    seen: dict[str, str] = {}
    for path, _ in sources:
        real = os.path.realpath(path)  # data/x, ./data/x/, $PWD/data/x and a link to it are one directory
        if real in seen:
            raise DataError(f"--data_mix names the directory {real!r} twice ({seen[real]!r} and {path!r}): "
                            f"name it once, with the sum of its weights")
        seen[real] = path
    if not any(w for _, w in sources):
        raise DataError(f"--data_mix={text!r}: at least one weight must be positive")
    integer_weights([w for _, w in sources], [p for p, _ in sources])
    return sources


def source_names(dirs: list[str]) -> list[str]:
    """Short names for logs and metrics: each directory's last part, numbered where two share one."""
    names = [os.path.basename(os.path.normpath(d)) or d for d in dirs]
    return [f"{n}{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


# The integer weights' total: beyond it a weight is finer than any run can draw (a sequence in 10^18).
MAX_WEIGHT_TOTAL = 10**18


def integer_weights(weights: list[Fraction], dirs: list[str] | None = None) -> list[int]:
    """The weights as Python integers in exactly the same ratio: the credits stay exact integers and
    every positive weight stays positive. Weights whose common denominator passes MAX_WEIGHT_TOTAL are
    refused, naming the finest one."""
    denominator = math.lcm(*(w.denominator for w in weights))
    units = [w.numerator * (denominator // w.denominator) for w in weights]
    if sum(units) > MAX_WEIGHT_TOTAL:
        finest = max(range(len(weights)), key=lambda i: weights[i].denominator)
        where = f" of {dirs[finest]!r}" if dirs else ""
        raise DataError(f"--data_mix weight {float(weights[finest]):g}{where} needs a precision the mixture cannot "
                        f"honour (the weights' common denominator is {denominator:.3g}, over 1e18): round the "
                        f"weights to fewer decimals")
    assert all(u > 0 for u, w in zip(units, weights) if w > 0), (weights, units)
    return units


class MixturePlan:
    """Which source each position of global batch k draws from, and that source's own position.

    A state (given, credit), each a tuple with an integer per source, holds at the start of each
    batch; the plan walks forward from an anchor state and keeps the latest KEPT_STATES of them,
    so both the training thread and a prefetch thread a few batches ahead find theirs.
    """

    def __init__(self, units: list[int], global_batch: int, batch: int, given: list[int], credit: list[int]):
        self.units, self.global_batch, self.total = units, global_batch, sum(units)
        self.anchor = batch
        self._states = {batch: (tuple(given), tuple(credit))}
        self._batches: dict[int, tuple[list[int], list[int]]] = {}
        self._lock = threading.Lock()

    def state(self, batch: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(sequences given per source, credit per source) at the start of global batch `batch`."""
        with self._lock:
            if batch < self.anchor:
                raise ValueError(f"batch {batch} is before the mixture's anchor {self.anchor}")
            if batch not in self._states:
                start = max((b for b in self._states if b <= batch), default=self.anchor)
                for b in range(start, batch):
                    self._advance(b)
            return self._states[batch]

    def batch(self, batch: int) -> tuple[list[int], list[int]]:
        """(source, the source's stream position) of each of global batch `batch`'s G positions."""
        if batch not in self._batches:
            self.state(batch + 1)
        return self._batches[batch]

    def _advance(self, batch: int) -> None:
        given, credit = list(self._states[batch][0]), list(self._states[batch][1])
        sources, positions = [], []
        for _ in range(self.global_batch):
            credit = [c + u for c, u in zip(credit, self.units)]
            s = credit.index(max(credit))  # ties: the earlier source
            credit[s] -= self.total
            sources.append(s)
            positions.append(given[s])
            given[s] += 1
        self._states[batch + 1] = (tuple(given), tuple(credit))
        self._batches[batch] = (sources, positions)
        # Batch b and its end state b + 1 are one entry: batch(b) reads both, so they go together.
        for old in [b for b in self._states if b != self.anchor and b < batch + 1 - KEPT_STATES]:
            del self._states[old]
            self._batches.pop(old - 1, None)


class MixtureOrder(GlobalOrder):
    """GlobalOrder's geometry (ranks, micro-steps, position, seek) over the mixed stream: its items are
    (source, sequence) pairs, each sequence from the source's own seeded order."""

    def __init__(self, plan: MixturePlan, sources: list[GlobalOrder], global_batch: int, micro_batch: int,
                 rank: int, world_size: int):
        # n is unused: the items come from the plan and the sources' own orders, not a permutation here
        super().__init__(global_batch, global_batch, micro_batch, rank, world_size, log=lambda line: None)
        self.plan, self.sources = plan, sources

    def _items(self, first: int, count: int) -> list[tuple[int, int]]:
        batch, offset = divmod(first, self.global_batch)
        sources, positions = self.plan.batch(batch)
        picked = zip(sources[offset:offset + count], positions[offset:offset + count])
        return [(s, self.sources[s].ids(p)[0]) for s, p in picked]  # a source order steps one item at a time


class MixtureLoader(TrainLoader):
    """TrainLoader's interface (next_batch with prefetch, state_dict, load_state_dict, close) over a
    weighted mixture of data directories; see the module docstring for the rule."""

    # TrainLoader's parameters, with the mixture in place of one directory; its __init__ is not
    # called, as it opens a single stream: the prefetch machinery it sets up is set up here.
    def __init__(self, mix: list[tuple[str, Fraction]], seq_len: int, micro_batch: int, global_batch: int,
                 rank: int = 0, world_size: int = 1, seed: int = 1337, shuffle: bool = True,
                 vocab_size: int | None = None, pin_memory: bool = False, prefetch: bool = False,
                 log: Callable[[str], None] = print):
        self.seq_len, self.seed, self.shuffle = seq_len, seed, shuffle
        self.pin_memory, self.prefetch, self.log = _pinnable(pin_memory), prefetch, log
        self.dirs = [d for d, _ in mix]
        self.data_dir = ",".join(self.dirs)
        self.names = source_names(self.dirs)
        self.weights = [w for _, w in mix]
        self.streams = [TokenStream(d, "train", vocab_size) for d in self.dirs]
        self.identities = [data_identity(d) for d in self.dirs]
        self.sequences_per_epoch = [s.total // (seq_len + 1) for s in self.streams]
        for d, n, s in zip(self.dirs, self.sequences_per_epoch, self.streams):
            if n == 0:
                raise DataError(f"the train shards in {d!r} hold {s.total:,} tokens, fewer than seq_len + 1 = "
                                f"{seq_len + 1}: build more data or lower seq_len")
        sources = [GlobalOrder(n, 1, 1, seed=seed + i * SOURCE_SEED_STRIDE, shuffle=shuffle,
                               log=lambda line, name=name: log(f"train data {name}: {line}"))
                   for i, (n, name) in enumerate(zip(self.sequences_per_epoch, self.names))]
        plan = MixturePlan(integer_weights(self.weights), global_batch, 0, [0] * len(mix), [0] * len(mix))
        self.order = MixtureOrder(plan, sources, global_batch, micro_batch, rank, world_size)
        self._worker = self._queue = None
        self._stop = threading.Event()
        total = sum(self.weights)
        shares = ", ".join(f"{name} {float(w / total):.1%} ({n:,} sequences per epoch)"
                           for name, w, n in zip(self.names, self.weights, self.sequences_per_epoch))
        log(f"train data: a mixture of {len(mix)} sources: {shares}; {global_batch} sequences of "
            f"{seq_len + 1} tokens per step = {self.accum_steps} micro-steps of {micro_batch} x {world_size} ranks")

    def _make(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = self.order.ids(step)
        rows = np.empty((len(pairs), self.seq_len + 1), dtype=np.uint16)
        for s, stream in enumerate(self.streams):
            where = [i for i, (source, _) in enumerate(pairs) if source == s]
            if where:
                starts = [pairs[i][1] * (self.seq_len + 1) for i in where]
                rows[where] = stream.read_windows(starts, self.seq_len + 1)
        x = torch.from_numpy(rows[:, :-1].astype(np.int64))  # (B, T)
        y = torch.from_numpy(rows[:, 1:].astype(np.int64))
        if self.pin_memory:
            x, y = x.pin_memory(), y.pin_memory()
        return x, y

    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
        """Micro-step `step`'s x, y again, and each sequence's source, shard and token offset (spike
        forensics)."""
        sources = []
        for s, sequence in self.order.ids(step):
            stream, at = self.streams[s], sequence * (self.seq_len + 1)
            i = bisect.bisect_right(stream.starts, at) - 1
            sources.append({"source": self.names[s], "sequence": sequence,
                            "shard": os.path.basename(stream.paths[i]), "offset": at - stream.starts[i]})
        return (*self._make(step), sources)

    def source_metrics(self) -> dict[str, float]:
        """Tokens trained on and epochs done per source, at the current global batch."""
        given, _ = self.order.plan.state(self.step // self.accum_steps)
        metrics = {}
        for name, count, n in zip(self.names, given, self.sequences_per_epoch):
            metrics[f"tokens/{name}"] = count * self.seq_len
            metrics[f"epoch/{name}"] = count / n
        return metrics

    def state_dict(self) -> dict:
        position = self.order.position()
        given, credit = self.order.plan.state(position // self.order.global_batch)
        return {**self.order_state(), "seed": self.seed, "seq_len": self.seq_len, "shuffle": self.shuffle,
                "mixture": [{"data_dir": d, "weight": str(w), "given": g, "credit": c, "data": identity}
                            for d, w, g, c, identity in zip(self.dirs, self.weights, given, credit,
                                                            self.identities)]}

    def load_state_dict(self, state: dict, accept_new_data: bool = False) -> None:
        """Continue each source where the saved state left it. Sources are matched by their place in
        the mixture; more may be appended (they start at their beginning). A one-directory state
        continues as source 0. Changed weights are said and start the credits afresh."""
        for key in ("seed", "seq_len", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(f"the saved loader state has {key}={state[key]!r} but this loader "
                                 f"{key}={getattr(self, key)!r}: use the saved value to resume")
        saved = state.get("mixture") or [{"data_dir": "(one directory)", "weight": "1", "given": state["position"],
                                          "credit": None, "data": state.get("data")}]
        if len(saved) > len(self.dirs):
            raise DataError(f"the checkpoint's mixture has {len(saved)} sources ({', '.join(s['data_dir'] for s in saved)}) "
                            f"but --data_mix names {len(self.dirs)}: keep them, in their order (weight 0 pauses one)")
        for i, entry in enumerate(saved):
            check_same_data(entry["data"], self.identities[i], self.dirs[i], accept_new_data,
                            self.log, source=(i, entry["data_dir"]))
        given = [entry["given"] for entry in saved] + [0] * (len(self.dirs) - len(saved))
        same_weights = (len(saved) == len(self.dirs) and state.get("mixture") is not None
                        and all(Fraction(e["weight"]) == w for e, w in zip(saved, self.weights)))
        credit = [e["credit"] for e in saved] if same_weights else [0] * len(self.dirs)
        if not same_weights:
            old = ", ".join(f"{e['data_dir']}:{float(Fraction(e['weight'])):g}" for e in saved)
            new = ", ".join(f"{d}:{float(w):g}" for d, w in zip(self.dirs, self.weights))
            self.log(f"warning: the data mixture changed on resume ({old} -> {new}): each source continues "
                     f"from its own position, in the new shares from here on")
        self.close()
        self.seek_order(state)  # the position and the skipped windows (--skip_batches, rollbacks)
        # The saved counts are those at the saved position, even where a skipped window moved past it.
        batch = int(state["position"]) // self.order.global_batch
        self.order.plan = MixturePlan(self.order.plan.units, self.order.global_batch, batch, given, credit)


class MixtureVal:
    """Each source's fixed validation set (its own val split, as ValLoader reads it); the mixture's
    val_loss is their mean weighted by the current weights."""

    def __init__(self, loader: MixtureLoader, seq_len: int, micro_batch: int, rank: int = 0,
                 world_size: int = 1, max_sequences: int | None = None, vocab_size: int | None = None,
                 pin_memory: bool = False):
        self.sources = {name: ValLoader(d, seq_len, micro_batch, rank, world_size, max_sequences, vocab_size,
                                        pin_memory) for name, d in zip(loader.names, loader.dirs)}
        total = sum(loader.weights)
        self.weights = {name: float(w / total) for name, w in zip(loader.names, loader.weights)}

    def combine(self, losses: dict[str, float]) -> float:
        return sum(self.weights[name] * loss for name, loss in losses.items())

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for val in self.sources.values():
            yield from val
