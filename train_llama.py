"""Pretrain a LLaMa on token shards, on one process or many.

    python train_llama.py --config configs/tiny.py                      # CPU, offline demo
    torchrun --standalone --nproc_per_node=8 train_llama.py --config configs/llama_1p7b.py
    python train_llama.py --config configs/llama_1p7b.py --benchmark=20  # synthetic tokens

Any TrainConfig field (llama_fineweb/train_config.py) can be overridden as --key=value. A run
resumes from the latest checkpoint in its out_dir by default; SIGTERM, SIGUSR1 and Ctrl-C save a
checkpoint and exit cleanly (a second Ctrl-C exits at once).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import time
import uuid
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from fineweb_edu import build_local_corpus
from llama_fineweb import (checkpoint, forecast, hellaswag, layer_stats, lora, parallel, planner, profiling,
                           stability)
from llama_fineweb.continuation import acquire_lock, find_resume_checkpoint, lineage, lora_base, lr_at
from llama_fineweb.dataloader import TrainLoader, ValLoader
from llama_fineweb.metrics import LOG_FILE, Logger, Throughput, flops_per_token, format_duration, peak_flops
from llama_fineweb.mixture import MixtureLoader, MixtureVal, parse_data_mix
from llama_fineweb.stability import Stability, StepStats
from llama_fineweb.step import (StepSettings, build_optimizer, gradient_accumulation, optimizer_step,
                                 set_lr)
from llama_fineweb.tokenizer import EOT, get_encoding
from llama_fineweb.train_config import ConfigError, TrainConfig, training_cli
from llama_fineweb.utils import DTYPES, Dist, paths_to_create, remove_created, setup_distributed
from model import Transformer, build_model

__all__ = ["TrainConfig", "main", "train"]  # TrainConfig re-exported for older config files


# ----------------------------------------------------------------------------- the run's state

@dataclass
class Progress:
    """The run's counters: what a checkpoint needs besides tensors, loader and RNG."""

    step: int = 0
    tokens_seen: int = 0
    skipped_total: int = 0
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    parent: dict | None = None  # a decay branch's start: {"run_id", "step", "checkpoint"} (continuation.lineage)

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.skipped_total = state.get("skipped_total", 0)
        self.run_id = state.get("run_id") or self.run_id
        self.parent = state.get("parent")


class StopFlag:
    """Set by SIGTERM/SIGUSR1 (what SLURM sends before a kill) and Ctrl-C: the run finishes its
    step, saves and exits. A second signal exits at once, except within a second of the first:
    torchrun forwards a Ctrl-C to workers that the terminal has already sent it to."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self, log: Callable[[str], None] = print):
        self.log = log  # the run's log: the line reaches its log file when the terminal is gone
        self.requested_at: float | None = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.requested_at is not None:
            if now - self.requested_at < 1.0:
                return
            os._exit(128 + signum)
        self.requested_at = now
        self.log(f"received {signal.Signals(signum).name}: saving a checkpoint after this step "
                 f"(send it again to exit at once)")

    def close(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


@dataclass
class Run:
    """Everything a training run holds; the loop's helpers take it instead of long argument lists."""

    cfg: TrainConfig
    dist: Dist
    log: Logger
    model: Transformer  # the unwrapped module (sharded in place under FSDP): checkpoints, sampling
    train_model: nn.Module  # compiled and/or DDP-wrapped: the training step
    eval_model: nn.Module  # compiled, not DDP (FSDP: parallel.GatheredForEval): validation, HellaSwag
    optimizer: torch.optim.Optimizer
    loader: TrainLoader | None  # None in benchmark mode: synthetic tokens
    val: ValLoader | None
    accum_steps: int
    last_step: int
    meter: Throughput | None = None
    progress: Progress = field(default_factory=Progress)
    stop: StopFlag | None = None
    stopping: bool = False  # a signal reached some rank: save and stop after this step
    lock: checkpoint.RunLock | None = None
    hellaswag_examples: list | None = None
    synthetic: torch.Generator | None = None
    stability: Stability | None = None  # spike detector, loss scale, checkpoint health, this step's event
    stats: StepStats | None = None  # this step's values on the host (agree_on_step)
    memory_logged: bool = False  # the per-rank bytes of params, grads and AdamW state, once per process
    adapter: dict | None = None  # LoRA: {"spec", "base"}, what checkpoints record instead of the base weights
    saver: checkpoint.AsyncSaver | None = None  # --async_save: the checkpoint written in the background
    profiler: profiling.StepProfiler | None = None  # --profile: the trace of the chosen steps
    layer_stats: layer_stats.LayerStats | None = None  # --layer_stats_interval: per-block statistics
    started: float = field(default_factory=time.perf_counter)

    @property
    def benchmark(self) -> bool:
        return self.cfg.benchmark > 0

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """bf16/fp16 autocast on CUDA (on CPU with cpu_autocast); None (float32, no autocast) otherwise."""
        if (self.dist.device.type != "cuda" and not self.cfg.cpu_autocast) or self.cfg.dtype == "float32":
            return None
        return DTYPES[self.cfg.dtype]

    def autocast(self):
        dtype = self.autocast_dtype
        return nullcontext() if dtype is None else torch.autocast(self.dist.device.type, dtype=dtype)

    def checkpoint_state(self) -> dict:
        """The named stateful objects a checkpoint holds (checkpoint.py's contract)."""
        return {"model": checkpoint.ModelState(self.model, trainable_only=self.adapter is not None),
                "optim": checkpoint.OptimizerState(self.model, self.optimizer),
                "loader": self.loader, "rng": checkpoint.RNGState(), "progress": self.progress,
                **self.stability.checkpoint_parts()}

    def close(self) -> None:
        try:
            if self.saver is not None:
                self.saver.close()  # the save in flight completes before the lock is let go
        finally:
            for part in (self.profiler, self.loader, self.stop, self.lock):
                if part is not None:
                    part.close()
            self.log.close()


# ----------------------------------------------------------------------------- the loop

def main(argv: list[str] | None = None) -> dict:
    return training_cli("train_llama.py", __doc__, argv, TrainConfig, train)


def train(cfg: TrainConfig, make_data: Callable | None = None) -> dict:
    """Train as `cfg` says; returns the steady-state figures. `make_data(cfg, dist, log)` returns
    (train loader, validation iterable) and defaults to the token shards (make_loaders):
    finetune.py passes its instruction data. A train loader has next_batch() -> (x, y) with
    y = -1 where no loss is taken, state_dict(), load_state_dict(state, accept_new_data) and
    close(), and targets_in_step() if its micro-batches hold unequal numbers of targets; the
    validation iterable yields (x, y) batches each time it is iterated."""
    run = setup(cfg, make_data or make_loaders)
    try:
        while run.progress.step < run.last_step:
            lr = set_learning_rate(run)
            evaluate_if_due(run)
            stats, applied = train_step(run)
            log_step(run, stats, lr, applied)
            if roll_back_if_spiked(run):
                continue
            if save_if_due(run):
                break
        wait_for_save(run)
    except torch.OutOfMemoryError:
        snapshot = profiling.dump_memory_snapshot(run.cfg.memory_snapshot, run.cfg.out_dir, run.dist, "oom")
        if run.meter.times:
            if snapshot:
                run.log.print(f"out of memory: the allocator's snapshot is {snapshot}")
            raise
        raise ConfigError(stability.out_of_memory_message(run.cfg, run.dist.device, snapshot)) from None
    finally:
        run.close()
    return summarize(run)


def set_learning_rate(run: Run) -> float:
    lr = lr_at(run.progress.step, run.cfg)
    set_lr(run.optimizer, lr)
    return lr


def train_step(run: Run) -> tuple[StepStats, bool]:
    """optimizer_step on the run's model, optimizer and next batches, judged by decide_step, then the
    run's counters. Returns (the step's values, whether the update was applied)."""
    cfg = run.cfg
    parallel.release_eval(run.eval_model, cfg)
    run.meter.start()
    step_targets = step_target_count(run)
    batch_index = None if run.benchmark else run.loader.order.batch  # the data order's global batch
    run.profiler.before_step(run.progress.step + 1)
    if run.layer_stats is not None:
        run.layer_stats.begin(run.progress.step + 1)
    batches = (next_batch(run) for _ in range(run.accum_steps))
    _, _, applied, stopping = optimizer_step(
        run.model, run.train_model, run.optimizer, batches, step_settings(run), step_targets,
        agree=lambda norm, loss, z: decide_step(run, norm, loss, z, batch_index),
        after_update=lambda: after_update(run), scaler=run.stability.scaler)
    run.stability.after_step(applied)
    run.meter.stop()
    run.progress.step += 1
    run.profiler.after_step(run.progress.step)
    if run.layer_stats is not None and (per_layer := run.layer_stats.finish()):
        run.log.metrics(run.progress.step, **per_layer)
    if len(run.meter.times) == 1:
        profiling.dump_memory_snapshot(cfg.memory_snapshot, cfg.out_dir, run.dist, "first_step")
    run.progress.tokens_seen += cfg.total_batch_tokens
    if run.stability.event is None or run.stability.event["event"] != "overflow":
        run.progress.skipped_total += not applied
    run.stopping = stopping
    return run.stats, applied


def decide_step(run: Run, grad_norm: torch.Tensor, loss_sum: torch.Tensor, z_sum: torch.Tensor,
                batch_index: int | None) -> tuple[bool, bool]:
    """optimizer_step's `agree` in training: the step's one sync (agree_on_step), then the spike
    verdict and its forensics (Stability.judge). Returns (apply the update?, stop after it?)."""
    run.stats = agree_on_step(run, grad_norm, loss_sum, z_sum)
    cfg = run.cfg
    clip_scale = min(1.0, cfg.grad_clip / (run.stats.grad_norm + 1e-6)) if cfg.grad_clip else 1.0  # torch's
    if run.layer_stats is not None:
        run.layer_stats.gradients(clip_scale)

    def forensics(record: dict) -> str | None:
        blocks = list(run.model.layers)
        norms = [n / clip_scale for n in layer_stats.block_grad_norms(blocks, run.dist)]
        history = list(run.layer_stats.history) if run.layer_stats is not None else []
        record = {**record, "gradient_jump": layer_stats.gradient_jump(norms, history), "layer_grad_norm": norms}
        return stability.spike_forensics(record, batch_index, run.accum_steps, run.loader, run.eval_model,
                                         run.autocast, run.dist, cfg.out_dir, cfg.doc_mask)

    global_batch = 0 if run.benchmark else run.loader.order.global_batch
    applied = run.stability.judge(run.stats, run.progress.step + 1, batch_index, global_batch, forensics,
                                  judging=not run.benchmark)
    parallel.release_eval(run.eval_model, run.cfg)  # what a spike's forensics gathered (FSDP)
    return applied, run.stats.stop


def step_settings(run: Run) -> StepSettings:
    cfg = run.cfg
    return StepSettings(accum_steps=run.accum_steps, grad_clip=cfg.grad_clip, autocast_dtype=run.autocast_dtype,
                        sdpa_backend=cfg.sdpa_backend, reduce_every_micro_step=cfg.fsdp_reduce_every_micro_step,
                        world_size=run.dist.world_size, z_loss=cfg.z_loss, device_type=run.dist.device.type,
                        doc_mask=cfg.doc_mask)


def after_update(run: Run) -> None:
    log_memory_once(run)
    if run.layer_stats is not None:
        run.layer_stats.updated()


def log_memory_once(run: Run) -> None:
    """What each rank holds, once per process, once the AdamW state exists."""
    if not run.memory_logged:
        run.memory_logged = True
        sizes = parallel.memory_per_rank(run.model, run.optimizer)
        run.log.print(parallel.describe_memory(sizes))
        run.log.metrics(run.progress.step + 1, **{f"{k}_per_rank": v for k, v in sizes.items()})


def step_target_count(run: Run) -> int | None:
    """Target tokens in the whole coming step (all micro-steps, all ranks) when micro-batches hold
    different numbers of them (fine-tuning: answer tokens only); None when all are full."""
    count = getattr(run.loader, "targets_in_step", None)
    return count() if count is not None else None


def next_batch(run: Run) -> tuple[torch.Tensor, torch.Tensor]:
    if run.benchmark:
        x = torch.randint(0, run.model.config.vocab_size, (run.cfg.micro_batch, run.cfg.seq_len + 1),
                          generator=run.synthetic)
        x, y = x[:, :-1], x[:, 1:]
    else:
        x, y = run.loader.next_batch()
    return x.to(run.dist.device, non_blocking=True), y.to(run.dist.device, non_blocking=True)


def agree_on_step(run: Run, grad_norm: torch.Tensor, loss_sum: torch.Tensor, z_sum: torch.Tensor) -> StepStats:
    """The step's loss, gradient norm and flags on the host, the same on every rank: the one
    host-device sync per step (and one all-reduce). A non-finite value on any rank is seen by all;
    a signal to any rank stops all of them after the same step."""
    requested = run.stop is not None and run.stop.requested
    saving = run.saver is not None and run.saver.in_flight()  # ranks agree when a background save is complete
    values = torch.stack([(~torch.isfinite(loss_sum)).float(), (~torch.isfinite(grad_norm)).float(),
                          torch.tensor(float(requested), device=grad_norm.device),
                          loss_sum.float(), grad_norm.float(), z_sum.float(),
                          torch.tensor(float(saving), device=grad_norm.device)])
    if run.dist.world_size > 1:
        dist.all_reduce(values)  # SUM (gloo has no AVG): flags > 0 anywhere; the means below
        values[3:] /= run.dist.world_size  # the gradient norm is the same on every rank already
    bad_loss, bad_norm, stop, loss, norm, z, saving = values.tolist()
    if not saving:
        wait_for_save(run)  # complete on every rank: returns at once
    return StepStats(loss=loss - run.cfg.z_loss * z, grad_norm=norm, z_loss=z, loss_finite=not bad_loss,
                     norm_finite=not bad_norm, stop=bool(stop))


def log_step(run: Run, stats: StepStats, lr: float, applied: bool) -> None:
    step, log, meter = run.progress.step, run.log, run.meter
    if run.stability.event is not None:
        run.stability.log_event(log, step, run.progress.skipped_total)
    run.stability.check_stop()
    if not applied or (step % run.cfg.log_interval and step != run.last_step):
        return
    loss, norm, dt = stats.loss, stats.grad_norm, meter.times[-1]
    mfu = meter.mfu(dt)
    eta = (run.last_step - step) * meter.recent()
    mem = torch.cuda.max_memory_allocated(run.dist.device) / 2**30 if run.dist.device.type == "cuda" else None
    log.print(f"step {step:6d}/{run.last_step} | loss {loss:.4f} | lr {lr:.2e} | norm {norm:.3f} | "
              f"{meter.tokens_per_s(dt):,.0f} tok/s | MFU {f'{mfu:.1%}' if mfu else '-'} | {dt * 1000:.0f} ms | "
              f"ETA {format_duration(eta)}" + (f" | mem {mem:.1f} GiB" if mem else ""))
    if len(meter.times) == 10:
        log.print(f"at the measured speed, the remaining {run.last_step - step:,} steps take about "
                  f"{format_duration(eta)}")
    extra = {"z_loss": stats.z_loss} if run.cfg.z_loss else {}
    if run.stability.scaler.enabled:
        extra["loss_scale"] = run.stability.scaler.scale
    per_source = getattr(run.loader, "source_metrics", None)  # a mixture's tokens and epochs per source
    if per_source is not None:
        extra.update(per_source())
    log.metrics(step, loss=loss, lr=lr, grad_norm=norm, tokens_per_s=meter.tokens_per_s(dt), mfu=mfu,
                ms=dt * 1000, tokens_seen=run.progress.tokens_seen, mem_gib=mem, spike_score=run.stability.score, **extra)


def roll_back_if_spiked(run: Run) -> bool:
    """After a step whose spike asks for a rollback: back to the last good checkpoint, in this
    process, with the data window from its position through the spiking batch skipped from now on.
    Made durable at once: the checkpoints written after the good one move to out_dir/rejected/ and
    the restored state is saved again with the window, so a crash now resumes past the bad data.
    True when it rolled back."""
    rollback = run.stability.rollback_target()
    if rollback is None:
        return False
    target, window = rollback
    wait_for_save(run)  # a save in flight is complete before checkpoints are set aside
    windows, run_id = [*run.loader.order.skipped, window], run.progress.run_id
    restore(run, target)
    run.progress.run_id = run_id  # the same run goes on, even from a branch's start in its parent's directory
    run.loader.load_state_dict(saved_state(target, "loader"), accept_new_data=run.cfg.accept_new_data)
    run.loader.skip(windows)
    if run.dist.is_main:
        moved = checkpoint.set_aside(run.cfg.out_dir, after_step=run.progress.step)
        if moved:
            run.log.print(f"moved {len(moved)} checkpoints written after {target.name} to {moved[0].parent}: "
                          f"the rollback found their weights bad")
    save(run)
    wait_for_save(run)
    run.stability.rolled_back(checkpoint.step_dir(run.cfg.out_dir, run.progress.step))
    return True


def save_if_due(run: Run) -> bool:
    """Save when due (interval, last step, signal); True when the run should stop now."""
    cfg, step, health = run.cfg, run.progress.step, run.stability.health
    stopping = run.stopping
    if run.benchmark:
        return stopping
    due = step == run.last_step or (cfg.save_interval and step % cfg.save_interval == 0)
    if due and health.unhealthy and not stopping:
        # A checkpoint of weights that just spiked (or whose step was skipped) must not push a
        # healthier one out: the save waits for the next healthy step.
        health.save_deferred = step != run.last_step
        run.log.print(f"step {step}: not saving a checkpoint after a skipped or spiking step"
                      + ("; saving at the next healthy step" if health.save_deferred else
                         f"; {run.stability.last_good_checkpoint()}"))
    elif stopping or due or (health.save_deferred and not health.unhealthy):
        if step == cfg.max_steps:
            evaluate_if_due(run, force=True)
        save(run)
        health.save_deferred = False
    if stopping:
        run.log.print(f"stopped by signal after step {step}; resume with the same command")
    return stopping


def save(run: Run) -> None:
    """A checkpoint of this step; with --async_save it is written in the background (the previous
    one completed first). save_s: the seconds the loop was blocked."""
    wait_for_save(run)
    t0 = time.perf_counter()
    meta = {"run_id": run.progress.run_id, "lineage": lineage(run.progress.run_id, run.progress.parent),
            "run_kind": run.cfg.RUN_KIND, "train_config": dataclasses.asdict(run.cfg),
            "model_config": run.model.config.to_dict(), "metrics_position": run.log.position(),
            **({"lora": run.adapter} if run.adapter else {})}
    writer = run.saver.save if run.saver is not None else checkpoint.save
    path = writer(run.cfg.out_dir, run.progress.step, run.checkpoint_state(), meta,
                  keep_last=run.cfg.keep_last, keep=run.stability.health.good)
    run.stability.health.pending = path
    seconds = time.perf_counter() - t0
    if run.saver is not None:
        run.stability.health.writing = path
        run.log.print(f"writing checkpoint {path} in the background (the loop waited {seconds:.1f}s)")
    else:
        run.log.print(f"saved checkpoint {path} in {seconds:.1f}s")
    run.log.metrics(run.progress.step, save_s=seconds)


def wait_for_save(run: Run) -> None:
    """Block until the background save in flight (if any) is complete; it may then become good."""
    if run.saver is None or run.stability.health.writing is None:
        return
    path = run.saver.wait()
    run.stability.health.written()
    run.log.print(f"saved checkpoint {path} (written in the background)")


def summarize(run: Run) -> dict:
    """The steady-state figures (for --benchmark and for callers of train())."""
    step_time, steps = run.meter.steady()
    d = run.dist
    result = {"steps": len(run.meter.times), "ms_per_step": step_time * 1000,
              "tokens_per_s": run.meter.tokens_per_s(step_time), "mfu": run.meter.mfu(step_time),
              "peak_mem_gib": torch.cuda.max_memory_allocated(d.device) / 2**30 if d.device.type == "cuda" else None,
              "first_step_s": run.meter.times[0] if run.meter.times else None,
              "elapsed_s": time.perf_counter() - run.started}
    if run.benchmark:
        mfu = f"{result['mfu']:.1%}" if result["mfu"] else "-"
        mem = f"{result['peak_mem_gib']:.1f} GiB" if result["peak_mem_gib"] else "-"
        run.log.print(f"benchmark: {result['tokens_per_s']:,.0f} tokens/s | MFU {mfu} | "
                      f"{result['ms_per_step']:.1f} ms/step | peak memory {mem} "
                      f"(median of the last {steps} of {len(run.meter.times)} steps)")
        run.log.print(f"benchmark_json: {json.dumps(result)}")
    return result


# ----------------------------------------------------------------------------- evaluation

def evaluate_if_due(run: Run, force: bool = False) -> None:
    """Validation loss, HellaSwag and a sample, each when its interval divides the step; each
    timed on its own so that the step's throughput measures training alone."""
    if run.benchmark:
        return
    cfg, step, log = run.cfg, run.progress.step, run.log
    run.model.eval()  # LoRA's dropout: off while evaluating and sampling, on again below

    def due(interval: int) -> bool:
        return bool(interval) and (force or step % interval == 0)

    if due(cfg.eval_interval):
        t0 = time.perf_counter()
        if isinstance(run.val, MixtureVal):  # each source's own set; val_loss their weighted mean
            per_source = {f"val_loss/{name}": validation_loss(run, val) for name, val in run.val.sources.items()}
            val = run.val.combine({name[len("val_loss/"):]: loss for name, loss in per_source.items()})
        else:
            per_source, val = {}, validation_loss(run)
        shown = "".join(f" | {name[len('val_loss/'):]} {loss:.4f}" for name, loss in per_source.items())
        log.print(f"step {step}: val loss {val:.4f}{shown}")
        log.metrics(step, val_loss=val, **per_source, eval_s=time.perf_counter() - t0)
        forecast.at_evaluation(cfg, log, step)  # where the run is heading: a line and metrics fields
    if due(cfg.hellaswag_interval):
        t0 = time.perf_counter()
        result = hellaswag_score(run)
        log.print(f"step {step}: HellaSwag acc {result['acc']:.4f} acc_norm {result['acc_norm']:.4f} "
                  f"({result['n']} examples)")
        log.metrics(step, hellaswag_acc=result["acc"], hellaswag_acc_norm=result["acc_norm"],
                    hellaswag_s=time.perf_counter() - t0)
    # Under FSDP every forward gathers parameters from all ranks: all of them sample (the same
    # tokens, from the same seeded generator); only rank 0 logs.
    if due(cfg.sample_interval) and (run.dist.is_main or parallel.is_sharded(run.model)):
        t0 = time.perf_counter()
        log.print(f"step {step}: sample: {sample_text(run)!r}")
        log.metrics(step, sample_s=time.perf_counter() - t0)
    run.model.train()


@torch.no_grad()
def validation_loss(run: Run, batches=None) -> float:
    """Mean loss over the fixed validation set (run.val, or `batches`: one mixture source's); each
    rank scores its share, totals all-reduced."""
    d = run.dist
    total = torch.zeros(2, dtype=torch.float64, device=d.device)  # (summed loss, tokens)
    for x, y in (run.val if batches is None else batches):
        x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
        with run.autocast():
            loss = run.eval_model(x, y)
        scored = (y >= 0).sum()  # tokens with a target: all of them in pretraining
        total[0] += loss.double() * scored
        total[1] += scored
    if total[1] == 0:  # fewer validation batches than ranks: this one had none
        parallel.join_eval(run.eval_model, d.device)
    if d.world_size > 1:
        dist.all_reduce(total)
    return (total[0] / total[1]).item()


def hellaswag_score(run: Run) -> dict:
    d = run.dist
    if not hellaswag.rank_share(run.hellaswag_examples, d.rank, d.world_size):  # fewer examples than ranks
        parallel.join_eval(run.eval_model, d.device)
    return hellaswag.evaluate(
        run.eval_model, run.hellaswag_examples, d.device, batch_size=max(1, run.cfg.micro_batch // 4),
        autocast_dtype=run.autocast_dtype,
        rank=d.rank, world_size=d.world_size, max_seq_len=run.cfg.seq_len, progress=d.is_main)


@torch.no_grad()
def sample_text(run: Run) -> str:
    """A seeded continuation of the sample prompt, up to <|endoftext|> as chat.py answers; its own
    generator leaves training RNG alone."""
    enc, device = get_encoding(), run.dist.device
    prompt = torch.tensor([enc.encode_ordinary(run.cfg.sample_prompt)], device=device)
    generator = torch.Generator(device=device).manual_seed(run.cfg.seed)
    with run.autocast():
        out = run.model.generate(prompt, run.cfg.sample_tokens, temperature=run.cfg.sample_temperature, top_k=50,
                                 generator=generator)
    new = out[0, prompt.size(1):].tolist()
    return enc.decode(prompt[0].tolist() + (new[:new.index(EOT)] if EOT in new else new))


# ----------------------------------------------------------------------------- setup

def setup(cfg: TrainConfig, make_data: Callable) -> Run:
    """Process group, lock, checks, data, model, optimizer, resume, compile: a Run ready to train."""
    d = setup_distributed(cfg.device)
    benchmark = cfg.benchmark > 0
    # What a launch refused during set-up removes again: a typo leaves no empty run directory behind.
    leftovers = (paths_to_create(cfg.out_dir, (checkpoint.LOCK, "metrics.jsonl", LOG_FILE))
                 if d.is_main and not benchmark else [])
    lock = None if benchmark else acquire_lock(cfg, d)
    log = Logger(cfg.out_dir, d.is_main, write_file=not benchmark,
                 wandb_project=cfg.wandb_project if cfg.wandb else None,
                 tensorboard=cfg.tensorboard, config=cfg)
    run = None
    try:
        auto = cfg.micro_batch == "auto"
        if auto:
            cfg = plan_micro_batch(cfg, d, log)
        run = build_run(cfg, d, log, lock, make_data)
        if auto and d.device.type == "cuda":
            confirm_micro_batch(run, make_data)
            cfg = run.cfg
        log.print(f"config: {json.dumps(dataclasses.asdict(cfg))}")
        log.print(f"model {cfg.model}: {run.model.num_params():,} parameters | {cfg.total_batch_tokens:,} "
                  f"tokens/step = {cfg.micro_batch} micro-batch x {cfg.seq_len} seq x {run.accum_steps} "
                  f"accumulation x {d.world_size} processes | device {d.device} | "
                  f"compile {parallel.compile_mode(cfg, d)} | "
                  f"{'fsdp' if parallel.is_sharded(run.model) else 'ddp' if d.world_size > 1 else 'one process'}")
        run.stop = StopFlag(log.print)
        return run
    except BaseException:
        if run is not None:
            run.close()
        else:
            log.close()
            if lock is not None:
                lock.close()
        remove_created(leftovers)
        raise


def plan_micro_batch(cfg: TrainConfig, d: Dist, log: Logger) -> TrainConfig:
    """--micro_batch=auto: planner.py's largest fitting micro-batch for this device's memory, the
    smallest any rank found (ranks must agree: it sets the accumulation)."""
    budget, where = planner.memory_budget(d.device, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    micro_batch, why = planner.auto_micro_batch(cfg, d.world_size, d.device, budget)
    if d.world_size > 1:
        agreed = torch.tensor(micro_batch, device=d.device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        if agreed.item() != micro_batch:
            micro_batch, why = int(agreed.item()), "the smallest any rank's memory allows"
    log.print(f"micro_batch=auto: {micro_batch}: {why} ({where})")
    return dataclasses.replace(cfg, micro_batch=micro_batch)


def confirm_micro_batch(run: Run, make_data: Callable) -> None:
    """On CUDA, one real micro-step at the planned micro-batch, halved (within the exact choices)
    while it runs out of memory; the loaders are remade for a smaller one, at the same position."""
    cfg, d = run.cfg, run.dist
    choices = planner.micro_batch_choices(cfg.total_batch_tokens, cfg.seq_len, d.world_size)
    micro_batch, failed = planner.confirm_micro_batch(cfg.micro_batch, choices, lambda mb: planner.fits_one_step(
        run.model, run.train_model, run.optimizer, mb, cfg.seq_len, run.autocast(), cfg.sdpa_backend))
    if not failed:
        run.log.print(f"micro_batch=auto: {micro_batch} confirmed by one step")
        return
    run.log.print(f"micro_batch=auto: {', '.join(map(str, failed))} ran out of memory in a real step; "
                  f"using {micro_batch}")
    run.cfg = dataclasses.replace(cfg, micro_batch=micro_batch)
    run.accum_steps = gradient_accumulation(run.cfg, d.world_size)
    if run.loader is not None:
        position = run.loader.state_dict()
        run.loader.close()
        run.loader, run.val = make_data(run.cfg, d, run.log)
        run.loader.load_state_dict(position, accept_new_data=cfg.accept_new_data)


def build_run(cfg: TrainConfig, d: Dist, log: Logger, lock: checkpoint.RunLock | None,
              make_data: Callable) -> Run:
    benchmark = cfg.benchmark > 0
    stability.check_precision(cfg, d)
    profiling.start_memory_history(cfg.memory_snapshot, d)
    accum_steps = gradient_accumulation(cfg, d.world_size)
    seed_everything(cfg.seed)  # the same initial weights on every rank
    if d.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    resume_from = None if benchmark else find_resume_checkpoint(cfg, d, log)
    loader, val = (None, None) if benchmark else make_data(cfg, d, log)
    if resume_from is not None:  # the data check comes before any heavy loading
        loader.load_state_dict(saved_state(resume_from, "loader"), accept_new_data=cfg.accept_new_data)
    if loader is not None and cfg.skip_batches:
        loader.skip(stability.parse_windows(cfg.skip_batches))
    model = build_model(cfg.model_config(), d.device)
    spec = cfg.lora_spec()
    base = lora_base(cfg, resume_from, d, log) if spec and not benchmark else None  # a changed base: refused first
    # A LoRA run's checkpoints hold its adapters alone: the base is read on resume too.
    if cfg.init_from and (resume_from is None or spec) and not benchmark:
        init_weights_from(cfg.init_from, model, log, cfg.verify)
    if spec:
        attach_adapters(model, spec, cfg, d, log)
    # Wrapped (sharded under FSDP) before the optimizer exists and before a checkpoint is read:
    # AdamW is built on the shards and each rank loads only its shard of the saved state.
    train_model, eval_model = parallel.parallelize(model, cfg, d)
    if d.world_size > 1:
        # The weights are drawn (and broadcast); what draws from torch's RNG from here on, LoRA's
        # dropout, draws on each rank its own masks, as one process does for each micro-batch.
        torch.manual_seed(cfg.seed + 1 + d.rank)
    run = Run(cfg, d, log, model, train_model, eval_model, build_optimizer(model, cfg, d.device), loader,
              val, accum_steps=accum_steps, last_step=cfg.benchmark if benchmark else cfg.max_steps, lock=lock,
              stability=Stability(cfg, scaler_enabled=cfg.dtype == "float16" and (d.device.type == "cuda"
                                                                                   or cfg.cpu_autocast)),
              adapter={"spec": spec.to_dict(), "base": base} if spec else None)
    if cfg.stop_step:
        run.last_step = min(run.last_step, cfg.stop_step)
    if cfg.async_save and not benchmark:
        run.saver = checkpoint.AsyncSaver(d.device)
    run.profiler = profiling.StepProfiler(cfg.profile_steps(), cfg.out_dir, d, log.print)
    if cfg.layer_stats_interval:
        run.layer_stats = layer_stats.LayerStats(model.layers, cfg.layer_stats_interval, d)
    if resume_from is not None:
        restore(run, resume_from)
        drop_superseded_metrics(run, resume_from)
    run.meter = make_meter(run)
    run.synthetic = torch.Generator().manual_seed(cfg.seed)
    if cfg.hellaswag_interval and not benchmark:
        run.hellaswag_examples = load_hellaswag(cfg)
    return run


def attach_adapters(model: Transformer, spec: lora.LoraSpec, cfg: TrainConfig, d: Dist, log: Logger) -> None:
    """LoRA adapters on the loaded base, which is frozen; on CUDA its linear weights are held in
    the autocast dtype (lora.hold_frozen_linears_in), the adapters stay float32 for AdamW."""
    lora.attach(model, spec)
    if d.device.type == "cuda" and cfg.dtype != "float32":
        lora.hold_frozen_linears_in(model, DTYPES[cfg.dtype])
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.print(f"lora: rank {spec.rank}, alpha {spec.alpha:g}, dropout {spec.dropout:g} on "
              f"{','.join(spec.targets)}: {trained:,} parameters train, {model.num_params() - trained:,} frozen")


def saved_state(ckpt: Path, name: str):
    meta = checkpoint.read_meta(ckpt)
    if name not in meta:
        raise checkpoint.CheckpointError(f"{ckpt / checkpoint.META} has no {name!r}: it was not written by a "
                                         f"training run; use --init_from={ckpt} for its weights")
    return meta[name]


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def make_loaders(cfg: TrainConfig, d: Dist, log: Logger) -> tuple[TrainLoader, ValLoader | None]:
    if cfg.data_mix:  # prepare_local_data builds data_dir, which a mixture does not read
        return make_mixture_loaders(cfg, d, log)
    if cfg.prepare_local_data:
        if d.is_main:
            build_local_corpus(cfg.data_dir, log=log.print)
        if d.world_size > 1:
            dist.barrier()
    vocab_size, cuda = cfg.model_config().vocab_size, d.device.type == "cuda"
    loader = TrainLoader(cfg.data_dir, cfg.seq_len, cfg.micro_batch, cfg.total_batch_tokens // cfg.seq_len,
                         rank=d.rank, world_size=d.world_size, seed=cfg.seed, shuffle=cfg.shuffle,
                         vocab_size=vocab_size, pin_memory=cuda, prefetch=cuda, log=log.print)
    val = (ValLoader(cfg.data_dir, cfg.seq_len, cfg.micro_batch, d.rank, d.world_size,
                     max_sequences=cfg.val_sequences, vocab_size=vocab_size, pin_memory=cuda)
           if cfg.eval_interval else None)
    return loader, val


def make_mixture_loaders(cfg: TrainConfig, d: Dist, log: Logger) -> tuple[MixtureLoader, MixtureVal | None]:
    """make_loaders for --data_mix: the weighted mixture, and each source's own validation set."""
    vocab_size, cuda = cfg.model_config().vocab_size, d.device.type == "cuda"
    loader = MixtureLoader(parse_data_mix(cfg.data_mix), cfg.seq_len, cfg.micro_batch,
                           cfg.total_batch_tokens // cfg.seq_len, rank=d.rank, world_size=d.world_size,
                           seed=cfg.seed, shuffle=cfg.shuffle, vocab_size=vocab_size, pin_memory=cuda,
                           prefetch=cuda, log=log.print)
    val = (MixtureVal(loader, cfg.seq_len, cfg.micro_batch, d.rank, d.world_size, max_sequences=cfg.val_sequences,
                      vocab_size=vocab_size, pin_memory=cuda) if cfg.eval_interval else None)
    return loader, val


def restore(run: Run, ckpt: Path) -> None:
    """Model, optimizer, loader position, RNG and counters from `ckpt` (checkpoint.py's contract)."""
    state = run.checkpoint_state()
    del state["loader"]  # restored (and its data checked) before the model was built
    for name in run.stability.checkpoint_parts():
        del state[name]
    branch_start = run.cfg.decay_from and Path(ckpt).resolve().parent != Path(run.cfg.out_dir).resolve()
    advice = "branch from another step_* directory (--decay_from=PATH)" if branch_start else checkpoint.RESUME_ADVICE
    meta = checkpoint.load(ckpt, state, verify_files=run.cfg.verify, advice=advice)
    run.stability.load_state_dict(meta)
    run.stability.health.good = ckpt
    if branch_start:
        run.progress.parent = {"run_id": run.progress.run_id, "step": run.progress.step,
                               "checkpoint": str(Path(ckpt).resolve())}
        run.progress.run_id = Progress().run_id
    written_by = meta.get("world_size", run.dist.world_size)
    note = "" if written_by == run.dist.world_size else f" (written by {written_by} processes)"
    run.log.print(f"resumed from {ckpt} at step {run.progress.step}, {run.progress.tokens_seen:,} "
                  f"tokens seen{note}")


def drop_superseded_metrics(run: Run, ckpt: Path) -> None:
    """At launch, cut metrics.jsonl back to where it ended when `ckpt` was saved: the rows after it
    are of steps this run does again, and would otherwise appear twice."""
    meta = checkpoint.read_meta(ckpt)
    position = meta.get("metrics_position")
    if position is None or ckpt.parent.resolve() != Path(run.cfg.out_dir).resolve():
        return  # a checkpoint from before this was recorded, or another run's metrics.jsonl
    dropped = run.log.drop_after(position, meta["step"])
    if dropped:
        run.log.print(f"metrics.jsonl: dropped the {dropped} rows logged after this checkpoint was saved "
                      f"(its steps are done again now, so no step appears twice)")


def init_weights_from(path: str, model: Transformer, log: Logger, verify: str = "full") -> None:
    """Weights only, from our checkpoint, an imported weights directory (export_hf.py --from_hf)
    or a Hugging Face Llama directory (checkpoint.load_weights_into); the optimizer starts fresh."""
    checkpoint.load_weights_into(path, model, verify)
    log.print(f"initialized weights from {path}")


def make_meter(run: Run) -> Throughput:
    d = run.dist
    name = torch.cuda.get_device_name(d.device) if d.device.type == "cuda" else None
    peak, note = peak_flops(name, run.cfg.peak_tflops)
    if d.device.type == "cuda":
        run.log.print(f"MFU: {note}")
    flops = flops_per_token(run.model, run.cfg.seq_len)
    return Throughput(run.cfg.total_batch_tokens, flops * run.cfg.total_batch_tokens, peak,
                      d.world_size, d.device)


def load_hellaswag(cfg: TrainConfig):
    """Loaded at start, so that missing data fails now rather than hours into the run."""
    return hellaswag.load_examples(cfg.hellaswag_data or None, limit=cfg.hellaswag_limit or None)


if __name__ == "__main__":
    main()
