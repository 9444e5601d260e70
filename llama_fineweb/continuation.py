"""Continuing a run: which checkpoint a launch resumes from, what may change on resume, decay
branches, the base a LoRA run records, the lock on a run directory, and the learning-rate schedule
whose knobs a resume may change.

- A resume never changes the model or the data order (FIXED_ON_RESUME): refused in one line.
- Schedule knobs (SCHEDULE_KNOBS) and the arithmetic (ARITHMETIC_KNOBS) may change, with a warning.
- A run resumes only a checkpoint of its own kind, started from the same --init_from.
- A decay branch lives in its own out_dir; its length is fixed when it starts.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Callable

import torch.distributed as dist

from model import ModelConfig

from . import checkpoint
from .metrics import Logger
from .train_config import ConfigError, TrainConfig
from .utils import Dist

# Knobs whose change would alter the data order or the model: a resume must not change them.
FIXED_ON_RESUME = ("model", "model_overrides", "seq_len", "total_batch_tokens", "seed", "shuffle", "optimizer")
# Knobs that define the run's length and schedule: changing them on resume is allowed, with a warning.
SCHEDULE_KNOBS = ("max_steps", "warmup_steps", "max_lr", "min_lr", "lr_schedule", "decay_steps",
                  "decay_fraction", "decay_shape", "weight_decay", "beta1", "beta2", "eps", "grad_clip",
                  "muon_lr", "muon_momentum", "muon_weight_decay", "muon_ns_steps", "muon_adjust_lr")
# Knobs that change the arithmetic: allowed on resume (a smaller card may need float16), with a warning
# that the losses will no longer match a straight run's exactly.
ARITHMETIC_KNOBS = ("dtype", "cpu_autocast", "z_loss")


def resume_differences(saved_train: dict, saved_model: dict, cfg: TrainConfig) -> tuple[list[str], list[str]]:
    """(refused, allowed): what differs between a checkpoint's configs and `cfg`, as
    'knob: checkpoint X vs now Y'. Refused ones change the model or the data order."""
    def describe(k, old, new):
        return f"{k}: checkpoint {old!r} vs now {new!r}"

    # A knob a checkpoint does not record predates it: that run had its default.
    model_defaults = ModelConfig().to_dict()
    train_defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                      for f in dataclasses.fields(type(cfg))}
    saved_model = {**model_defaults, **saved_model} if saved_model else {}
    saved_train = {**train_defaults, **saved_train}
    refused = [describe(k, saved_model.get(k), v) for k, v in cfg.model_config().to_dict().items()
               if saved_model and saved_model.get(k) != v]
    refused += [describe(k, saved_train[k], getattr(cfg, k)) for k in FIXED_ON_RESUME + cfg.ALSO_FIXED_ON_RESUME
                if saved_train[k] != getattr(cfg, k)]
    allowed = [describe(k, saved_train[k], getattr(cfg, k)) for k in SCHEDULE_KNOBS
               if saved_train[k] != getattr(cfg, k)]
    allowed += [describe(k, saved_train[k], getattr(cfg, k))
                + " (the arithmetic differs: losses will not match a straight run exactly)"
                for k in ARITHMETIC_KNOBS if saved_train[k] != getattr(cfg, k)]
    return refused, allowed


def same_init_from(saved: str, now: str) -> bool:
    """Whether two --init_from values name the same base model (the same text, or the same path)."""
    if os.path.normpath(saved or ".") == os.path.normpath(now or "."):
        return True
    try:
        return bool(saved and now) and os.path.samefile(saved, now)
    except OSError:
        return False


def run_kind(meta: dict) -> str | None:
    """The kind of run that wrote a checkpoint: recorded since run kinds were, else told by its
    loader's data identity (shards: pretraining; instruction examples: fine-tuning)."""
    if meta.get("run_kind"):
        return meta["run_kind"]
    data = (meta.get("loader") or {}).get("data") or {}
    return "pretraining" if "shards" in data else "fine-tuning" if "examples" in data else None


def check_same_run(cfg: TrainConfig, ckpt: Path, meta: dict) -> None:
    """ConfigError unless `ckpt` was written by a run of cfg's kind that started from the same
    --init_from: a resume continues that run, so anything else would be silently ignored."""
    kind, scripts = run_kind(meta), {"pretraining": "train_llama.py", "fine-tuning": "finetune.py"}
    if kind is not None and kind != cfg.RUN_KIND:
        raise ConfigError(f"{ckpt} was written by a {kind} run ({scripts.get(kind, kind)}) and this is a "
                          f"{cfg.RUN_KIND} run ({cfg.SCRIPT}): continue it with {scripts.get(kind, kind)}, or "
                          f"choose another --out_dir (--init_from={ckpt} there starts from its weights)")
    if "train_config" not in meta:
        raise ConfigError(f"{ckpt} records no train_config: it was not written by a training run, so there is "
                          f"no run to resume; start from its weights with --init_from={ckpt} in another --out_dir")
    saved = meta["train_config"].get("init_from", "")
    if not same_init_from(saved, cfg.init_from):
        was = f"--init_from={saved}" if saved else "no --init_from (random weights)"
        keep = f"pass --init_from={saved} (it is not read on resume)" if saved else "drop --init_from"
        raise ConfigError(f"--init_from={cfg.init_from or repr('')} but the run in {ckpt.parent} started from {was} "
                          f"and a resume continues it from {ckpt.name}, never from a new base: {keep} to resume "
                          f"it, or choose another --out_dir to start from the new one")


def check_not_finished(cfg: TrainConfig, step: int, note: Callable[[str], None]) -> None:
    """ConfigError (exit 2) for a resume with no step left to train, unless the command line asked
    for exactly that step (--max_steps=N or --stop_step=N with N the checkpoint's step): a rerun
    that trains nothing must not look like a run that trained."""
    asked = getattr(cfg, "command_line", {})
    for knob, limit in (("max_steps", cfg.max_steps), ("stop_step", cfg.stop_step)):
        if not limit or step < limit:
            continue
        if asked.get(knob) == step:
            note(f"already at step {step}, as --{knob}={step} asks: nothing to do")
            return
        if knob == "max_steps" and step == limit:
            raise ConfigError(f"already complete at step {step} (max_steps {limit}): nothing to do; "
                              f"raise --max_steps to continue")
        raise ConfigError(f"already at step {step}, {'at' if step == limit else 'past'} {knob} {limit}: nothing to "
                          f"do; raise --{knob} above {step} to continue (or pass --{knob}={step} to accept that)")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to max_lr, then cfg.lr_schedule's way down to min_lr at max_steps: cosine,
    linear, or wsd (constant, then decay_shape over the last decay_length() steps)."""
    if step < cfg.warmup_steps:
        return cfg.max_lr * (step + 1) / cfg.warmup_steps
    if step >= cfg.max_steps:
        return cfg.min_lr
    if cfg.lr_schedule == "wsd":
        decay_start = cfg.max_steps - cfg.decay_length()
        if step < decay_start:
            return cfg.max_lr
        # The stable stage's end depends on max_steps alone: a longer run keeps max_lr for longer
        # (no jump while still in it), and a branch's decay starts at its checkpoint's step.
        progress = (step - decay_start) / cfg.decay_length()
        remaining = 1.0 - (math.sqrt(progress) if cfg.decay_shape == "1-sqrt" else progress)
        return cfg.min_lr + remaining * (cfg.max_lr - cfg.min_lr)
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    if cfg.lr_schedule == "linear":
        return cfg.max_lr + progress * (cfg.min_lr - cfg.max_lr)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.max_lr - cfg.min_lr)


def find_resume_checkpoint(cfg: TrainConfig, d: Dist, log: Logger) -> Path | None:
    """The checkpoint to resume from, checked against this config before any heavy work."""
    out_dir = Path(cfg.out_dir)
    if d.is_main and out_dir.is_dir():
        checkpoint.remove_incomplete(out_dir)  # safe: the lock says no other job writes here
    if cfg.resume == "never":
        existing = checkpoint.complete_checkpoints(out_dir)
        if existing and not cfg.start_over:
            raise ConfigError(f"--resume=never but {out_dir} holds {len(existing)} checkpoints (newest "
                              f"{existing[-1].name}): choose a new --out_dir, or add --start_over=archive "
                              f"(moves them aside) or --start_over=delete")
        if existing and d.is_main:
            log.print(checkpoint.start_over(out_dir, cfg.start_over))
        if d.world_size > 1:
            dist.barrier()
        return None
    ckpt = checkpoint.resolve(out_dir) if cfg.resume == "auto" and out_dir.is_dir() else None
    if cfg.resume != "auto":
        ckpt = checkpoint.resolve(cfg.resume)
        if ckpt is None:
            raise ConfigError(f"--resume={cfg.resume}: no checkpoint there")
    if cfg.decay_from:
        ckpt = decay_branch_start(cfg, ckpt, log)
    if ckpt is not None:
        meta = checkpoint.read_meta(ckpt)
        check_same_run(cfg, ckpt, meta)
        refused, allowed = resume_differences(meta.get("train_config", {}), meta.get("model_config", {}), cfg)
        if refused:
            raise ConfigError("cannot resume with a different model or data order: " + "; ".join(refused)
                              + f" (use the checkpoint's values, or a new --out_dir with --init_from={ckpt} for its weights)")
        for change in allowed:
            log.print(f"warning: changed on resume: {change}")
        if not cfg.decay_from:
            warn_if_lr_jumps(meta, cfg, log)
        check_not_finished(cfg, meta["step"], log.print)
    return ckpt


def decay_branch_start(cfg: TrainConfig, own: Path | None, log: Logger) -> Path:
    """The checkpoint a decay branch starts from, and its length: max_steps = the branch point's step
    + decay_steps. A branch resumed in its own out_dir keeps the length it started with."""
    ckpt = checkpoint.resolve(cfg.decay_from)
    if ckpt is None:
        raise ConfigError(f"--decay_from={cfg.decay_from}: no checkpoint there")
    if Path(cfg.out_dir).resolve() == ckpt.parent.resolve():
        raise ConfigError(f"--decay_from={cfg.decay_from} is in --out_dir={cfg.out_dir}: a branch needs its own "
                          f"out_dir, so that the main run goes on")
    if own is not None:
        cfg.max_steps = checkpoint.read_meta(own)["train_config"]["max_steps"]
        return own
    meta = checkpoint.read_meta(ckpt)
    step = meta["step"]
    cfg.max_steps = step + cfg.decay_steps
    main_run = dataclasses.replace(cfg, **saved_schedule(meta))
    if main_run.lr_schedule == "wsd" and step >= main_run.max_steps - main_run.decay_length():
        log.print(f"warning: {ckpt} (step {step}) is already in its run's decay stage, at lr "
                  f"{lr_at(step, main_run):.3g}: the branch decays from max_lr={cfg.max_lr:g} again")
    log.print(f"decay branch of run {meta.get('run_id')} from {ckpt}: {cfg.decay_shape} decay to "
              f"min_lr={cfg.min_lr:g} over {cfg.decay_steps} steps, stopping at step {cfg.max_steps}")
    return ckpt


def saved_schedule(meta: dict) -> dict:
    """The schedule knobs a checkpoint's run trained with (defaults for those it predates)."""
    saved, defaults = meta.get("train_config", {}), TrainConfig()
    return {k: saved.get(k, getattr(defaults, k)) for k in SCHEDULE_KNOBS}


def warn_if_lr_jumps(meta: dict, cfg: TrainConfig, log: Logger) -> None:
    """A changed schedule that moves the learning rate at the resumed step (a cosine run extended, a
    WSD run extended from inside its decay) is allowed, but said."""
    step, before = meta.get("step", 0), dataclasses.replace(cfg, **saved_schedule(meta))
    old, new = lr_at(step, before), lr_at(step, cfg)
    if not math.isclose(old, new, rel_tol=1e-9):
        log.print(f"warning: the changed schedule moves the learning rate at step {step} from {old:.4g} to "
                  f"{new:.4g} (extending a WSD run before its decay keeps it continuous)")


def lora_base(cfg: TrainConfig, resume_from: Path | None) -> dict:
    """The base model's reference a LoRA run records (checkpoint.base_reference); on resume the
    checkpoint's, after checking that --init_from still holds those exact weights."""
    if resume_from is None:
        return checkpoint.base_reference(cfg.init_from)
    saved = checkpoint.read_meta(resume_from).get("lora")
    if not saved:
        raise ConfigError(f"{resume_from} holds no LoRA adapters (a full fine-tuning run): resume it without "
                          f"--lora_rank, or choose another --out_dir")
    checkpoint.check_base(saved["base"], resume_from, now=cfg.init_from)
    return saved["base"]


def acquire_lock(cfg: TrainConfig, d: Dist) -> checkpoint.RunLock | None:
    """Rank 0 locks out_dir for the run's life; every rank learns whether it got the lock."""
    lock, error = None, None
    if d.is_main:
        try:
            lock = checkpoint.RunLock(cfg.out_dir)
        except checkpoint.CheckpointError as e:
            error = str(e)
    if d.world_size > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise checkpoint.CheckpointError(error)
    return lock
