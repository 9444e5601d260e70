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
from .utils import Dist, UserError

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
    if meta.get("lora") and cfg.init_from and not same_init_from(saved, cfg.init_from):
        # The base of a LoRA run is read on resume: the same bytes moved elsewhere are the same base.
        checkpoint.check_base(meta["lora"]["base"], ckpt, now=cfg.init_from)
        return
    if not same_init_from(saved, cfg.init_from):
        was = f"--init_from={saved}" if saved else "no --init_from (random weights)"
        read = ("a LoRA run reads its base on resume: these bytes, by sha256, wherever they are now" if meta.get("lora")
                else "it is not read on resume")
        keep = f"pass --init_from={saved} ({read})" if saved else "drop --init_from"
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
            raise ConfigError(f"already complete at step {step} (max_steps {limit}): nothing to do; raise "
                              f"--max_steps to continue, or start over with --resume=never "
                              f"--start_over=archive (or another --out_dir)")
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
    """The checkpoint to resume from, checked against this config before any heavy work. Rank 0
    decides and the others follow (its path, the branch length it set, or its refusal): ranks that
    each read `latest` could resume different steps where a shared filesystem is slow to agree."""
    if d.world_size == 1:
        return choose_resume_checkpoint(cfg, log)
    found, error = None, None
    if d.is_main:
        try:
            found = choose_resume_checkpoint(cfg, log)
        except Exception as e:  # noqa: BLE001 - the others must hear of it, or they wait forever
            error = e
    box = [None if found is None else str(found), cfg.max_steps,
           None if error is None else (type(error) if isinstance(error, UserError) else RuntimeError, str(error))]
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if box[2] is not None:
        kind, message = box[2]
        raise kind(message if kind is not RuntimeError else f"rank 0 failed to find the checkpoint: {message}")
    cfg.max_steps = box[1]
    return None if box[0] is None else Path(box[0])


def choose_resume_checkpoint(cfg: TrainConfig, log: Logger) -> Path | None:
    """find_resume_checkpoint's decision, made on rank 0 alone."""
    out_dir = Path(cfg.out_dir)
    if out_dir.is_dir():
        checkpoint.remove_incomplete(out_dir)  # safe: the lock says no other job writes here
    if cfg.resume == "never":
        existing = checkpoint.complete_checkpoints(out_dir)
        if existing and not cfg.start_over:
            raise ConfigError(f"--resume=never but {out_dir} holds {len(existing)} checkpoints (newest "
                              f"{existing[-1].name}): choose a new --out_dir, or add --start_over=archive "
                              f"(moves them aside) or --start_over=delete")
        if existing:
            done = checkpoint.start_over(out_dir, cfg.start_over)
            log.reopen()
            log.print(done)
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
    if own is not None and is_branch_of(checkpoint.read_meta(own), cfg.decay_from):
        return continue_branch(cfg, own)  # its start need not exist any more: the branch holds all it needs
    ckpt = checkpoint.resolve(cfg.decay_from)
    if ckpt is None:
        raise ConfigError(f"--decay_from={cfg.decay_from}: no checkpoint there")
    if Path(cfg.out_dir).resolve() == ckpt.parent.resolve():
        raise ConfigError(f"--decay_from={cfg.decay_from} is in --out_dir={cfg.out_dir}: a branch needs its own "
                          f"out_dir, so that the main run goes on")
    meta = checkpoint.read_meta(ckpt)
    if own is not None:
        own_meta = checkpoint.read_meta(own)
        parent = branch_parent(own_meta)
        fix = (f"resume that branch with --decay_from={parent['checkpoint']}, or choose a new --out_dir for this one"
               if parent else "a branch starts in an out_dir of its own: choose a new --out_dir for it")
        raise ConfigError(f"--out_dir={cfg.out_dir} holds {describe_run(own_meta, own)}, not a branch from {ckpt} "
                          f"(run {meta.get('run_id')}, step {meta['step']}): {fix}")
    step = meta["step"]
    cfg.max_steps = step + cfg.decay_steps
    main_run = dataclasses.replace(cfg, **saved_schedule(meta))
    if main_run.lr_schedule == "wsd" and step >= main_run.max_steps - main_run.decay_length():
        log.print(f"warning: {ckpt} (step {step}) is already in its run's decay stage, at lr "
                  f"{lr_at(step, main_run):.3g}: the branch decays from max_lr={cfg.max_lr:g} again")
    log.print(f"decay branch of run {meta.get('run_id')} from {ckpt}: {cfg.decay_shape} decay to "
              f"min_lr={cfg.min_lr:g} over {cfg.decay_steps} steps, stopping at step {cfg.max_steps}")
    return ckpt


def lineage(run_id: str, parent: dict | None) -> dict:
    """What every checkpoint records of where its run came from: its run id and, for a decay
    branch, the checkpoint it branched from (that run's id, the step, the path)."""
    return {"run_id": run_id, "parent": parent}


def branch_parent(meta: dict) -> dict | None:
    """The checkpoint a branch's checkpoint descends from: its recorded lineage, or for a branch
    saved before lineage was recorded, its --decay_from (path only)."""
    recorded = meta.get("lineage")
    if recorded is not None:
        return recorded.get("parent")
    saved = meta.get("train_config", {}).get("decay_from")
    return {"run_id": None, "step": None, "checkpoint": saved} if saved else None


def is_branch_of(meta: dict, decay_from: str) -> bool:
    """Whether a checkpoint (in a branch's out_dir) belongs to the branch from `decay_from`: the same
    checkpoint by path, or by run id and step (a run directory's latest, or the same checkpoint moved)."""
    parent = branch_parent(meta)
    if parent is None:
        return False
    if same_init_from(parent["checkpoint"], decay_from):
        return True
    try:
        named = checkpoint.resolve(decay_from)
        named_meta = checkpoint.read_meta(named) if named is not None else {}
    except checkpoint.CheckpointError:
        return False
    if Path(decay_from).resolve() != Path(named or decay_from).resolve() and parent["run_id"] is not None:
        return named_meta.get("run_id") == parent["run_id"]  # a run directory: its run, wherever it is now
    return parent["run_id"] is not None and (named_meta.get("run_id"), named_meta.get("step")) == (
        parent["run_id"], parent["step"])


def describe_run(meta: dict, ckpt: Path) -> str:
    """'a decay branch of run R from step S (PATH), at step_N' or 'run R, at step_N'."""
    parent = branch_parent(meta)
    if parent is None:
        return f"run {meta.get('run_id')}, at {ckpt.name}"
    of = f" of run {parent['run_id']} from step {parent['step']}" if parent["run_id"] is not None else ""
    return f"a decay branch{of} ({parent['checkpoint']}), at {ckpt.name}"


def continue_branch(cfg: TrainConfig, own: Path) -> Path:
    """A branch resumed in its own out_dir: the length it started with; refused when complete, with
    the command that decays for longer (a new branch: a finished one is at min_lr)."""
    meta = checkpoint.read_meta(own)
    cfg.max_steps = meta["train_config"]["max_steps"]
    if meta["step"] >= cfg.max_steps:
        parent = branch_parent(meta)
        raise ConfigError(f"the decay branch in {cfg.out_dir} is complete at step {meta['step']} (its decay from "
                          f"{parent['checkpoint']} ended at min_lr): nothing to do; for a longer decay start a new "
                          f"branch: --decay_from={parent['checkpoint']} --decay_steps=N --out_dir=NEW_DIR")
    return own


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


def lora_base(cfg: TrainConfig, resume_from: Path | None, d: Dist, log: Logger) -> dict:
    """The base model's reference a LoRA run records (checkpoint.base_reference); on resume the
    checkpoint's, after checking that --init_from holds those exact weights (at their new path if
    moved). Rank 0 marks a base checkpoint as this run's, so that its run's pruning keeps it."""
    if resume_from is None:
        base = checkpoint.base_reference(cfg.init_from)
    else:
        saved = checkpoint.read_meta(resume_from).get("lora")
        if not saved:
            raise ConfigError(f"{resume_from} holds no LoRA adapters (a full fine-tuning run): resume it without "
                              f"--lora_rank, or choose another --out_dir")
        base = checkpoint.check_base(saved["base"], resume_from, now=cfg.init_from)
    problem = checkpoint.pin_base(base, cfg.out_dir) if d.is_main else None
    if problem:
        log.print(f"warning: {problem}")
    return base


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
