"""What keeps a long run alive: spike detection, the data windows a run skips, spike forensics,
dynamic loss scaling for float16, and the checks of precision and memory a changed card needs.

`Stability` owns all of it that lives across steps (detector history, loss scale, checkpoint
health, the run of skipped steps, the current event) with its own state_dict(); train_llama.py's
loop calls its methods by name.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from . import checkpoint
from .doc_mask import document_mask
from .tokenizer import get_encoding
from .utils import Dist, UserError, write_atomic


def parse_windows(text: str) -> list[tuple[int, int]]:
    """'A:B,C:D' -> [(A, B), (C, D)]: half-open ranges of global batch indices; UserError if malformed."""
    windows = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        start, sep, end = part.partition(":")
        try:
            window = (int(start), int(end))
        except ValueError:
            window = None
        if not sep or window is None or not 0 <= window[0] < window[1]:
            raise UserError(f"--skip_batches={text!r}: {part!r} is not START:END with 0 <= START < END "
                            f"(global batch indices, END excluded), e.g. --skip_batches=120:130,400:401")
        windows.append(window)
    return windows


@dataclass
class StepStats:
    """A step's values on the host, the same on every rank (train_llama.agree_on_step's one sync)."""

    loss: float  # mean over the step's targets and ranks, without the z-loss
    grad_norm: float
    z_loss: float  # mean squared log-normalizer (0 without --z_loss)
    loss_finite: bool
    norm_finite: bool
    stop: bool  # a signal reached some rank


def robust_z(value: float, history: list[float]) -> float:
    """How many robust standard deviations (1.4826 x the median absolute deviation) `value` lies
    above the median of `history`. The scale has a floor of 0.1% of the median, so a history that
    barely moves cannot turn noise into a spike."""
    median = statistics.median(history)
    mad = statistics.median(abs(x - median) for x in history)
    scale = max(1.4826 * mad, 1e-3 * abs(median), 1e-12)
    return (value - median) / scale


class SpikeDetector:
    """Judges a step's loss and gradient norm against the last `window` healthy steps.

    - z-scores (robust, upward only) of the loss and of the norm, once `min_history` steps are kept;
      below that they are 0, so the first steps' fast-moving values cannot trip them.
    - A history-free divergence limit from the first step on: the median of the kept losses plus
      `jump` of the way back to chance (ln(vocab)), and at least `jump` nats: a loss above it has
      lost half of what training learned, whatever the history's length. The median, not the best
      loss: one easy batch must not tighten it, and in a fast early fall it stays loose.
    - A run of spiking steps below that limit is a change of level, not a divergence: after
      `adopt_after` of them in a row their values become the new history (adopt).
    Its history is part of the checkpoint, so a resumed run judges as the straight run would."""

    def __init__(self, threshold: float, window: int, min_history: int, chance: float, jump: float = 0.5,
                 adopt_after: int = 3):
        self.threshold, self.min_history, self.chance, self.jump = threshold, min_history, chance, jump
        self.adopt_after = adopt_after
        self.losses: deque[float] = deque(maxlen=window)
        self.norms: deque[float] = deque(maxlen=window)
        self.pending: list[tuple[float, float]] = []  # the current run of spikes below the limit

    def z_scores(self, loss: float, grad_norm: float) -> tuple[float, float]:
        if len(self.losses) < self.min_history:
            return 0.0, 0.0
        return robust_z(loss, list(self.losses)), robust_z(grad_norm, list(self.norms))

    def divergence_limit(self) -> float | None:
        """The loss above which a step diverges; None before any healthy step is known."""
        if not self.losses:
            return None
        level = statistics.median(self.losses)
        return level + self.jump * max(self.chance - level, 1.0)

    def record(self, loss: float, grad_norm: float) -> None:
        """An applied step joins the history; a run of spikes ends."""
        self.losses.append(loss)
        self.norms.append(grad_norm)
        self.pending.clear()

    def shift(self, loss: float, grad_norm: float) -> bool:
        """A spike below the divergence limit: True once `adopt_after` in a row make it a new level,
        which then replaces the history."""
        self.pending.append((loss, grad_norm))
        if len(self.pending) < self.adopt_after:
            return False
        self.losses.clear()
        self.norms.clear()
        for old_loss, old_norm in self.pending:
            self.record(old_loss, old_norm)
        return True

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "norms": list(self.norms), "pending": [list(p) for p in self.pending]}

    def load_state_dict(self, state: dict) -> None:
        self.losses.clear()
        self.norms.clear()
        self.losses.extend(state.get("losses", []))
        self.norms.extend(state.get("norms", []))
        self.pending = [tuple(p) for p in state.get("pending", [])]


class LossScaler:
    """Dynamic loss scaling for float16 (what torch.amp.GradScaler does), kept on the host: the
    overflow verdict comes from the step's one sync (a non-finite gradient norm, the same on every
    rank, DDP or FSDP), so the scale never needs a sync of its own and stays equal on all ranks.
    Scales are powers of two: scaling and unscaling are exact. Disabled, every method is a no-op."""

    def __init__(self, enabled: bool, init_scale: float = 2.0 ** 16, growth_interval: int = 2000):
        self.enabled, self.growth_interval = enabled, growth_interval
        self.scale, self.good_steps = init_scale, 0

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale if self.enabled else loss

    @torch.no_grad()
    def unscale_(self, parameters) -> None:
        """Divide the gradients by the scale, in place (FSDP: each rank its shards)."""
        if not self.enabled:
            return
        grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                 for p in parameters if p.grad is not None]
        torch._foreach_mul_(grads, 1.0 / self.scale)

    def update(self, found_inf: bool) -> None:
        """GradScaler's rule: halve the scale after a step with a non-finite loss or gradient (no
        floor: below 1 the values themselves overflow, which Stability stops on); double it after
        growth_interval finite steps in a row."""
        if not self.enabled:
            return
        if found_inf:
            self.scale, self.good_steps = self.scale / 2, 0
            return
        self.good_steps += 1
        if self.good_steps == self.growth_interval:
            self.scale, self.good_steps = self.scale * 2, 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])


@torch.no_grad()
def sequence_losses(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, autocast,
                    doc_mask: bool = False) -> list[float]:
    """Each sequence's mean loss, one sequence at a time: no (B, T, vocab) logits held; with
    doc_mask, attention within each packed document as in training."""
    out = []
    for i in range(x.size(0)):
        mask = document_mask(x[i:i + 1], flex=x.device.type == "cuda") if doc_mask else None
        with autocast():
            out.append(model(x[i:i + 1], y[i:i + 1], mask=mask))
    return torch.stack(out).float().tolist()


def write_forensics(out_dir: str, record: dict, sequences: list[dict], decode, worst: int = 8) -> Path:
    """out_dir/spikes/step_NNNNNNN.json (then _2, _3, ...): the spike's record and its `worst`
    highest-loss sequences, each with where it comes from (shard and token offset, or example
    index) and a decoded snippet."""
    sequences = sorted(sequences, key=lambda s: -s["loss"] if math.isfinite(s["loss"]) else -math.inf)
    top = []
    for s in sequences[:worst]:
        tokens = s.pop("tokens")
        try:
            snippet = decode(tokens[:64])
        except Exception as e:  # a token id outside the tokenizer's range: show the ids instead
            snippet = f"<not decodable ({type(e).__name__}): ids {tokens[:16]}>"
        top.append({**s, "snippet": snippet})
    losses = [s["loss"] for s in sequences]
    # One file per event: a rollback runs through its step numbers again, and a second spike at a
    # step must not overwrite the first one's record.
    path = Path(out_dir) / "spikes" / f"step_{record['step']:07d}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 1
    while path.exists():
        n += 1
        path = path.with_name(f"step_{record['step']:07d}_{n}.json")
    summary = {"sequences": len(losses), "median_loss": statistics.median(losses) if losses else None}
    write_atomic(path, json.dumps({**record, "batch_losses": summary, "worst": top}, indent=1))
    return path


@dataclass
class Health:
    """Which checkpoint a run may fall back to, and whether it may save now (not saved: a resumed
    run starts from the checkpoint it resumed from, which it takes as good)."""

    good: Path | None = None  # the newest checkpoint whose weights a healthy step has confirmed
    pending: Path | None = None  # saved, but no step has judged its weights yet
    unhealthy: bool = False  # the last step was skipped or spiking: no checkpoint now
    save_deferred: bool = False  # a save fell due while unhealthy: made at the next healthy step
    rollbacks: int = 0  # rollbacks in this process
    writing: Path | None = None  # the pending checkpoint while an asynchronous save still writes it
    confirmed: bool = False  # a judged healthy step found the weights being written healthy

    def judged(self, healthy: bool, judged: bool = True) -> None:
        """After a step on the current weights: a pending checkpoint becomes the good one once a
        judged step finds them healthy, and is never trusted if a step finds them unhealthy; a step
        no check could judge leaves it pending. One still being written becomes good only once
        complete (written)."""
        self.unhealthy = not healthy
        if self.pending is None:
            return
        if not healthy:
            self.pending, self.confirmed = None, False
        elif judged and self.pending == self.writing:
            self.confirmed = True
        elif judged:
            self.good, self.pending = self.pending, None

    def written(self) -> None:
        """The asynchronous save in flight is complete on disk: good now if already confirmed."""
        if self.pending is not None and self.pending == self.writing and self.confirmed:
            self.good, self.pending = self.pending, None
        self.writing, self.confirmed = None, False


# ----------------------------------------------------------------------------- the run's guard

class Stability:
    """The guard of one run: judges each step, says what to do about a bad one, and knows which
    checkpoint is safe to fall back to. `cfg` is the run's TrainConfig (its stability knobs).

    - A non-finite loss or gradient, or a loss spike, is skipped or rolled back (--on_spike).
    - A gradient-norm excursion with a normal loss never stops a run: with clipping on its update
      is bounded, so it is applied, logged and joins the history (a lasting level is adopted).
    - A run of loss spikes below the divergence limit is a new level, adopted after
      spike_adopt_after steps; a run stops only after max_skipped_steps skipped steps in a row that
      are non-finite or above the limit (the loss far above its level before them).
    - --on_spike=warn never stops a run. A checkpoint is "good" once a judged healthy step follows it."""

    def __init__(self, cfg: Any, scaler_enabled: bool = False):
        self.cfg = cfg
        chance = math.log(cfg.model_config().vocab_size)
        self.detector = SpikeDetector(cfg.spike_threshold, cfg.spike_window, cfg.spike_min_history, chance,
                                      cfg.spike_jump, cfg.spike_adopt_after)
        self.scaler = LossScaler(enabled=scaler_enabled, growth_interval=cfg.loss_scale_growth_interval)
        self.health = Health()
        self.consecutive_skips = 0  # skipped steps in a row that are non-finite or above the divergence limit
        self.event: dict | None = None  # this step's record: skip, spike, norm, adopt, rollback, stop, overflow
        self.score = 0.0  # this step's spike score: the larger z-score of loss and norm
        self.diverging = False  # this step is non-finite, or its loss is above the divergence limit
        self.judged = False  # some check could judge this step (not the first of a fresh run)
        self.windows: list[tuple[int, int]] = []  # data windows this process's rollbacks skipped

    # What a checkpoint holds of it, under the names checkpoints have always used.
    def checkpoint_parts(self) -> dict[str, Any]:
        return {"spikes": self.detector, "scaler": self.scaler}

    def state_dict(self) -> dict:
        return {name: part.state_dict() for name, part in self.checkpoint_parts().items()}

    def load_state_dict(self, state: dict) -> None:
        """Parts a checkpoint lacks (older ones have neither) keep their fresh state."""
        for name, part in self.checkpoint_parts().items():
            if name in state:
                part.load_state_dict(state[name])

    def judge(self, stats: StepStats, step: int, batch_index: int | None, global_batch: int,
              forensics: Callable[[dict], str | None], judging: bool = True) -> bool:
        """Whether to apply step `step`'s update. Sets self.event for anything but a plain healthy
        step; a loss spike's `forensics(record)` is written. `judging`: False in benchmark mode
        (non-finite steps are still skipped)."""
        cfg, detector = self.cfg, self.detector
        self.event, self.diverging, self.judged = None, False, judging
        if not (stats.loss_finite and stats.norm_finite):
            overflow = self.scaler.enabled and stats.loss_finite
            # float16 at a scale of 1 or less: the values themselves overflow, not the scaled loss
            self.diverging = not overflow or self.scaler.scale <= 1
            self.event = {"event": "overflow" if overflow else "skip", "step": step, "reason": "non-finite"}
            return False
        loss_z, norm_z = detector.z_scores(stats.loss, stats.grad_norm)
        limit = detector.divergence_limit()
        self.score, self.judged = max(loss_z, norm_z), judging and limit is not None
        self.diverging = limit is not None and stats.loss > limit
        loss_spike = self.diverging or loss_z > cfg.spike_threshold
        if cfg.on_spike == "off" or not judging or not (loss_spike or norm_z > cfg.spike_threshold):
            detector.record(stats.loss, stats.grad_norm)
            return True
        record = {"step": step, "loss": stats.loss, "score": self.score, "grad_norm": stats.grad_norm,
                  "batch": batch_index, "position": batch_index * global_batch,
                  **({"limit": limit} if limit is not None else {})}
        if not loss_spike and cfg.grad_clip:
            detector.record(stats.loss, stats.grad_norm)
            self.event = {"event": "norm", "reason": "gradient norm", **record}
            return True
        if cfg.on_spike != "warn" and not self.diverging and detector.shift(stats.loss, stats.grad_norm):
            self.event = {"event": "adopt", "reason": "new level", **record}
            return True
        self.event = {**self._action(step, batch_index, global_batch), "reason": "spike", **record}
        self.event["forensics"] = forensics(dict(self.event))
        if self.event["event"] == "spike":  # warn: applied, and a lasting level joins the history
            detector.record(stats.loss, stats.grad_norm)
        return self.event["event"] == "spike"

    def _action(self, step: int, batch_index: int, global_batch: int) -> dict:
        """What --on_spike does with this spike: {"event": spike|skip|rollback|stop, ...}."""
        cfg, good = self.cfg, self.health.good
        if cfg.on_spike == "warn":
            return {"event": "spike"}
        if cfg.on_spike == "skip":
            return {"event": "skip"}
        if good is None:
            return {"event": "skip", "note": "no checkpoint confirmed before this spike: skipped instead of rolled back"}
        if not (good / checkpoint.META).is_file():
            raise UserError(f"stopping: the spike at step {step} asks for a rollback to {good}, which is missing "
                            f"(removed since it was confirmed, e.g. pruned by the run that wrote it): resume from "
                            f"a checkpoint that exists with --resume=PATH, or rerun with --on_spike=skip")
        start = checkpoint.read_meta(good)["loader"]["position"] // global_batch
        window = [start, batch_index + 1 + cfg.rollback_margin]
        if self.health.rollbacks >= cfg.max_rollbacks:
            return {"event": "stop", "skip_batches": window}
        return {"event": "rollback", "skip_batches": window, "to": str(good)}

    def after_step(self, applied: bool) -> None:
        """Once the step is taken: the loss scale, the run of skipped steps and the checkpoint
        health follow its verdict."""
        e = self.event
        self.scaler.update(found_inf=e is not None and e["reason"] == "non-finite")
        if e is not None and e["event"] == "overflow" and not self.diverging:
            return  # float16 finding its scale, not a sign of trouble
        if applied:
            self.consecutive_skips = 0
        elif self.diverging:
            self.consecutive_skips += 1
        self.health.judged(healthy=applied and (e is None or e["event"] in ("norm", "adopt")), judged=self.judged)

    def check_stop(self) -> None:
        """UserError (the run stops, one line) after a spike past --max_rollbacks, or after
        max_skipped_steps skipped steps in a row that were non-finite or above the divergence limit."""
        e, cfg = self.event, self.cfg
        if e is not None and e["event"] == "stop":
            good = self.health.good
            windows = ",".join(f"{a}:{b}" for a, b in [*self.windows, tuple(e["skip_batches"])])
            raise UserError(f"stopping: a spike at step {e['step']} after {self.health.rollbacks} rollbacks "
                            f"(--max_rollbacks={cfg.max_rollbacks}); the last good checkpoint is {good}: to "
                            f"train past the bad data, resume with --resume={good} --skip_batches={windows}")
        if self.consecutive_skips < cfg.max_skipped_steps:
            return
        if e is not None and e["event"] == "overflow":
            raise UserError(f"stopping: float16 overflowed on {self.consecutive_skips} steps in a row with the loss "
                            f"scale down to {self.scaler.scale:g}: the values exceed float16's range, which no "
                            f"scale fixes; continue with --dtype=bfloat16 (or float32); {self.last_good_checkpoint()}")
        raise UserError(f"stopping: {self.consecutive_skips} steps in a row were skipped with a non-finite loss or "
                        f"one far above its level before them: the run diverged; {self.last_good_checkpoint()} "
                        f"(lower --max_lr or check the data)")

    def rollback_target(self) -> tuple[Path, tuple[int, int]] | None:
        """After a step whose spike asks for a rollback: (the checkpoint to restore, the window of
        global batches to skip from now on); None otherwise."""
        e = self.event
        if e is None or e["event"] != "rollback":
            return None
        self.health.rollbacks += 1
        window = tuple(e["skip_batches"])
        self.windows.append(window)
        return self.health.good, window

    def rolled_back(self, saved: Path) -> None:
        """The run is back on the good weights, saved again (with the skipped window) as `saved`."""
        self.consecutive_skips, self.health.unhealthy = 0, False
        self.health.good, self.health.pending = saved, None
        self.detector.pending.clear()

    def log_event(self, log: Any, step: int, skipped_total: int) -> None:
        """One readable line and one metrics.jsonl record for this step's event (log: metrics.Logger)."""
        e = self.event
        if e["event"] == "overflow":
            log.print(f"step {step}: float16 overflow, update skipped; loss scale now {self.scaler.scale:g}")
            log.metrics(step, event="overflow", loss_scale=self.scaler.scale)
            return
        if e["reason"] == "non-finite":
            what = "non-finite loss or gradient norm"
        elif e["event"] == "norm":
            what = (f"gradient norm {e['grad_norm']:.3f} (score {e['score']:.1f}) with a normal loss {e['loss']:.4f}")
        else:
            above = (f" > the divergence limit {e['limit']:.3f}" if "limit" in e and e["loss"] > e["limit"]
                     else "")
            what = (f"loss spike: loss {e['loss']:.4f}{above}, gradient norm {e['grad_norm']:.3f}, score "
                    f"{e['score']:.1f} (threshold {self.cfg.spike_threshold:g}; global batch {e['batch']}"
                    + (f"; forensics {e['forensics']})" if e.get("forensics") else ")"))
        action = {"spike": "update applied (--on_spike=warn)",
                  "norm": f"update applied, clipped to norm {self.cfg.grad_clip:g}",
                  "adopt": (f"{self.detector.adopt_after} such steps in a row: their level is the new baseline, "
                            f"update applied"),
                  "skip": f"update skipped ({self.consecutive_skips} in a row, {skipped_total} in total)",
                  "stop": "no rollbacks left (--max_rollbacks)",
                  "rollback": (f"rolling back to {e.get('to')} and skipping global batches "
                               f"[{e['skip_batches'][0]}, {e['skip_batches'][1]})" if "skip_batches" in e else "")}
        log.print(f"step {step}: {what}; {action[e['event']]}" + (f" ({e['note']})" if "note" in e else ""))
        record = {k: v for k, v in e.items() if k != "step"}
        if e["event"] == "skip":
            record.update(skipped=True, skipped_total=skipped_total)
        log.metrics(step, **record)

    def last_good_checkpoint(self) -> str:
        """The end of a stop line: the checkpoint to resume from, which exists, or that there is none."""
        good = self.health.good
        if good is not None and (good / checkpoint.META).is_file():
            return f"the last good checkpoint is {good} (resume from it with --resume={good})"
        return (f"no checkpoint in {self.cfg.out_dir} was confirmed good before it (start again, e.g. with a "
                f"lower --max_lr)")


@torch.no_grad()
def spike_forensics(record: dict, batch_index: int, accum_steps: int, loader: Any, model: torch.nn.Module,
                    autocast: Callable, d: Dist, out_dir: str, doc_mask: bool) -> str | None:
    """Each sequence of the spiking global batch (`loader.batch_at` of its micro-steps) scored on its
    own by `model` (the weights that spiked, before any update), written with the worst ones'
    sources to out_dir/spikes/ on rank 0: its path."""
    sequences = []
    for step in range(batch_index * accum_steps, (batch_index + 1) * accum_steps):
        x, y, sources = loader.batch_at(step)
        losses = sequence_losses(model, x.to(d.device), y.to(d.device), autocast, doc_mask)
        sequences += [{**source, "loss": loss, "tokens": row.tolist()} for source, loss, row in zip(sources, losses, x)]
    if d.world_size > 1:
        everyone = [None] * d.world_size
        dist.all_gather_object(everyone, sequences)
        sequences = [s for part in everyone for s in part]
    if not d.is_main:
        return None
    return str(write_forensics(out_dir, dict(record), sequences, get_encoding().decode))


def check_precision(cfg: Any, d: Dist) -> None:
    """bfloat16 needs compute capability 8.0 (A100, RTX 30xx) or later: on a V100, T4 or RTX 20xx
    it is emulated at a fraction of the speed, if at all; float16 with loss scaling is the way."""
    if d.device.type != "cuda" or cfg.dtype != "bfloat16":
        return
    major, minor = torch.cuda.get_device_capability(d.device)
    if major < 8:
        raise UserError(f"--dtype=bfloat16: {torch.cuda.get_device_name(d.device)} (compute capability "
                        f"{major}.{minor}) has no bfloat16 support; use --dtype=float16 (with dynamic loss "
                        f"scaling) or --dtype=float32")


def out_of_memory_message(cfg: Any, device: torch.device, snapshot: Path | None = None) -> str:
    """The one line for a CUDA out-of-memory error before the first step completed (naming the
    allocator's snapshot, with --memory_snapshot)."""
    memory = ""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        memory = f" on {torch.cuda.get_device_name(device)} ({total:.1f} GiB, peak {peak:.1f} GiB allocated)"
    smaller = max(1, cfg.micro_batch // 2)
    return (f"out of memory at the first step with --micro_batch={cfg.micro_batch} x --seq_len={cfg.seq_len}"
            f"{memory}: try --micro_batch={smaller} (the same global batch, more accumulation), "
            f"--activation_checkpointing=full, or --parallel=fsdp across several GPUs"
            + (f"; the allocator's snapshot is {snapshot} (open it at https://pytorch.org/memory_viz)"
               if snapshot else ""))
