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
    """Scores a step's loss and gradient norm against the last `window` healthy steps: the larger of
    their robust z-scores (upward only). Below `min_history` healthy steps the score is 0, so the
    first steps' fast-moving values cannot trip it. Its history is part of the checkpoint, so a
    resumed run judges its first steps as the straight run would."""

    def __init__(self, threshold: float, window: int, min_history: int):
        self.threshold, self.min_history = threshold, min_history
        self.losses: deque[float] = deque(maxlen=window)
        self.norms: deque[float] = deque(maxlen=window)

    def score(self, loss: float, grad_norm: float) -> float:
        if len(self.losses) < self.min_history:
            return 0.0
        return max(robust_z(loss, list(self.losses)), robust_z(grad_norm, list(self.norms)))

    def is_spike(self, score: float) -> bool:
        return score > self.threshold

    def record(self, loss: float, grad_norm: float) -> None:
        """A healthy, applied step joins the history."""
        self.losses.append(loss)
        self.norms.append(grad_norm)

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "norms": list(self.norms)}

    def load_state_dict(self, state: dict) -> None:
        self.losses.clear()
        self.norms.clear()
        self.losses.extend(state.get("losses", []))
        self.norms.extend(state.get("norms", []))


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

    def update(self, overflow: bool) -> None:
        """Halve the scale after an overflow; double it after growth_interval steps without one."""
        if not self.enabled:
            return
        if overflow:
            self.scale, self.good_steps = max(self.scale / 2, 1.0), 0
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
    """out_dir/spikes/step_NNNNNNN.json: the spike's record and its `worst` highest-loss sequences,
    each with where it comes from (shard and token offset, or example index) and a decoded snippet."""
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
    path = Path(out_dir) / "spikes" / f"step_{record['step']:07d}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
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

    def judged(self, healthy: bool) -> None:
        """After a step that judged the current weights: a pending checkpoint becomes the good one
        if the step was healthy, and is never trusted if it was not."""
        self.unhealthy = not healthy
        if self.pending is not None:
            self.good = self.pending if healthy else self.good
            self.pending = None


# ----------------------------------------------------------------------------- the run's guard

class Stability:
    """The guard of one run: judges each step, says what to do about a bad one, and knows which
    checkpoint is safe to fall back to. `cfg` is the run's TrainConfig (its stability knobs)."""

    def __init__(self, cfg: Any, scaler_enabled: bool = False):
        self.cfg = cfg
        self.detector = SpikeDetector(cfg.spike_threshold, cfg.spike_window, cfg.spike_min_history)
        self.scaler = LossScaler(enabled=scaler_enabled)
        self.health = Health()
        self.consecutive_skips = 0  # steps in a row skipped or spiking (float16 overflows are not counted)
        self.event: dict | None = None  # this step's skip, spike, rollback or overflow record
        self.score = 0.0  # this step's spike score

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
        """Whether to apply step `step`'s update. Sets self.event for a non-finite step (or a float16
        overflow) and for a spike, whose `forensics(record)` is written; --on_spike says what a spike
        does. `judging`: False in benchmark mode (non-finite steps are still skipped)."""
        cfg, health = self.cfg, self.health
        self.event = None
        if not (stats.loss_finite and stats.norm_finite):
            overflow = self.scaler.enabled and stats.loss_finite
            self.event = {"event": "overflow" if overflow else "skip", "step": step, "reason": "non-finite"}
            return False
        self.score = self.detector.score(stats.loss, stats.grad_norm)
        if cfg.on_spike == "off" or not judging or not self.detector.is_spike(self.score):
            self.detector.record(stats.loss, stats.grad_norm)
            return True
        action = cfg.on_spike
        if action == "rollback" and health.good is None:
            action = "skip"  # nothing to go back to: a spike before the first confirmed checkpoint
        record = {"event": {"warn": "spike", "skip": "skip", "rollback": "rollback"}[action], "step": step,
                  "reason": "spike", "loss": stats.loss, "score": self.score, "grad_norm": stats.grad_norm,
                  "batch": batch_index, "position": batch_index * global_batch}
        if action == "rollback":
            start = checkpoint.read_meta(health.good)["loader"]["position"] // global_batch
            record.update(skip_batches=[start, batch_index + 1 + cfg.rollback_margin], to=str(health.good))
        elif cfg.on_spike == "rollback":
            record["note"] = "no checkpoint confirmed before this spike: skipped instead of rolled back"
        record["forensics"] = forensics(record)
        self.event = record
        return action == "warn"

    def after_step(self) -> None:
        """Once the step is taken: the loss scale, the run of skipped steps and the checkpoint
        health follow its verdict."""
        overflow = self.event is not None and self.event["event"] == "overflow"
        self.scaler.update(overflow)
        if not overflow:  # an overflow is float16 finding its scale, not a sign of trouble
            self.consecutive_skips = 0 if self.event is None else self.consecutive_skips + 1
            self.health.judged(healthy=self.event is None)

    def check_not_diverged(self) -> None:
        """UserError (the run stops) after max_skipped_steps skipped or spiking steps in a row."""
        if self.consecutive_skips >= self.cfg.max_skipped_steps:
            raise UserError(f"stopping: {self.consecutive_skips} steps in a row were skipped or spiking, the run "
                            f"diverged; {self.last_good_checkpoint()} (lower --max_lr or check the data)")

    def rollback_target(self) -> tuple[Path, tuple[int, int]] | None:
        """After a step whose spike asks for a rollback: (the checkpoint to restore, the window of
        global batches to skip from now on); None otherwise. UserError past max_rollbacks."""
        e, health = self.event, self.health
        if e is None or "skip_batches" not in e:
            return None
        if health.rollbacks >= self.cfg.max_rollbacks:
            raise UserError(f"stopping: a spike at step {e['step']} after {health.rollbacks} rollbacks "
                            f"(--max_rollbacks={self.cfg.max_rollbacks}); {self.last_good_checkpoint()}")
        health.rollbacks += 1
        return health.good, tuple(e["skip_batches"])

    def rolled_back(self) -> None:
        """The run is back on the good checkpoint's weights: nothing pending, nothing unhealthy."""
        self.consecutive_skips, self.health.pending, self.health.unhealthy = 0, None, False

    def log_event(self, log: Any, step: int, skipped_total: int) -> None:
        """One readable line and one metrics.jsonl record for this step's skip, spike, rollback or
        overflow (log: metrics.Logger)."""
        e = self.event
        if e["event"] == "overflow":
            log.print(f"step {step}: float16 overflow, update skipped; loss scale now {self.scaler.scale:g}")
            log.metrics(step, event="overflow", loss_scale=self.scaler.scale)
            return
        if e["reason"] == "non-finite":
            what = "non-finite loss or gradient norm"
        else:
            what = (f"loss spike: loss {e['loss']:.4f}, gradient norm {e['grad_norm']:.3f}, score {e['score']:.1f} "
                    f"> {self.cfg.spike_threshold:g} (global batch {e['batch']}; forensics {e['forensics']})")
        action = {"spike": "update applied (--on_spike=warn)",
                  "skip": f"update skipped ({self.consecutive_skips} in a row, {skipped_total} in total)",
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


def out_of_memory_message(cfg: Any, device: torch.device) -> str:
    """The one line for a CUDA out-of-memory error before the first step completed."""
    memory = ""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        memory = f" on {torch.cuda.get_device_name(device)} ({total:.1f} GiB, peak {peak:.1f} GiB allocated)"
    smaller = max(1, cfg.micro_batch // 2)
    return (f"out of memory at the first step with --micro_batch={cfg.micro_batch} x --seq_len={cfg.seq_len}"
            f"{memory}: try --micro_batch={smaller} (the same global batch, more accumulation), "
            f"--activation_checkpointing=full, or --parallel=fsdp across several GPUs")
