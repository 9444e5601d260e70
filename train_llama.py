"""Pretrain a LLaMa on token shards, on one process or many.

    python train_llama.py --config configs/tiny.py                      # CPU, offline demo
    torchrun --standalone --nproc_per_node=8 train_llama.py --config configs/llama_1p7b.py
    python train_llama.py --config configs/llama_1p7b.py --benchmark=20  # synthetic tokens

Any TrainConfig field can be overridden as --key=value. A run resumes from the latest checkpoint
in its out_dir by default; SIGTERM/SIGUSR1 save a checkpoint and exit cleanly.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
from dataloader import DataError, TrainLoader, val_batches
from metrics import Logger, format_duration
from model import ModelConfig, Transformer, model_config


@dataclass
class TrainConfig:
    # model: a preset of model.py, with optional field overrides (config files only)
    model: str = "1p7b"
    model_overrides: dict = field(default_factory=dict)
    # data
    data_dir: str = "data/edu_fineweb10B"
    prepare_local_data: bool = False  # build a small offline corpus into data_dir if it is empty
    shuffle: bool = True  # seeded permutation of sequences; False = the reference's file order
    seq_len: int = 1024
    # batch: tokens per optimizer step; the gradient accumulation follows from the GPU count
    total_batch_tokens: int = 524_288
    micro_batch: int = 16
    # schedule
    max_steps: int = 38_147  # 38,147 x 524,288 = 20.0B tokens
    warmup_steps: int = 715
    max_lr: float = 6e-4
    min_lr: float = 6e-5
    # AdamW
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    max_skipped_steps: int = 5  # stop after this many consecutive non-finite steps
    # evaluation and sampling (0 = never)
    eval_interval: int = 250
    val_sequences: int = 640  # fixed validation set: 640 x 1024 tokens, the same on any GPU count
    sample_interval: int = 1000
    sample_prompt: str = "Hello, I'm a language model,"
    sample_tokens: int = 64
    hellaswag_interval: int = 0
    hellaswag_limit: int = 0  # 0 = all 10,042 examples
    hellaswag_data: str = ""  # local hellaswag_val.jsonl; empty = download once and cache
    # checkpoints
    out_dir: str = "out/run"
    save_interval: int = 1000
    keep_last: int = 3
    resume: str = "auto"  # "auto": out_dir's latest checkpoint if any; "never"; or a path
    init_from: str = ""  # weights only (our checkpoint or a Hugging Face directory)
    stop_step: int = 0  # save and stop after this step (e.g. to fit a job's time limit)
    # system
    device: str = "auto"  # auto = cuda if available, else cpu
    dtype: str = "bfloat16"  # autocast dtype on CUDA; CPU runs in float32
    compile: bool = True  # torch.compile on CUDA (on CPU only when compile_cpu is set)
    compile_cpu: bool = False
    seed: int = 1337
    log_interval: int = 1
    wandb: bool = False
    wandb_project: str = "llama-fineweb"
    tensorboard: bool = False
    benchmark: int = 0  # >0: time this many steps on synthetic tokens, save nothing
    fault_nan_step: int = -1  # test hook: make this step's loss NaN to exercise the skip path

    def model_config(self) -> ModelConfig:
        return model_config(self.model, max_seq_len=self.seq_len, **self.model_overrides)


# Knobs whose change would alter the data order or the model: a resume must not change them.
FIXED_ON_RESUME = ("model", "model_overrides", "seq_len", "total_batch_tokens", "seed", "shuffle")
# Knobs that define the run's length and schedule: changing them on resume is allowed, with a warning.
SCHEDULE_KNOBS = ("max_steps", "warmup_steps", "max_lr", "min_lr", "weight_decay", "beta1",
                  "beta2", "eps", "grad_clip")

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


class ConfigError(ValueError):
    """A bad config or command line: one line naming the problem and the fix."""


# ----------------------------------------------------------------------------- config

def _parse_value(name: str, text: str, current):
    kind = type(current)
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
    elif kind in (int, float):
        try:
            return kind(text.replace("_", ""))
        except ValueError:
            pass
    elif kind is str:
        return text
    raise ConfigError(f"--{name}={text!r}: expected a {kind.__name__} (like --{name}={current!r})")


def load_config(argv: list[str]) -> TrainConfig:
    """TrainConfig from `--config FILE` (its `config()` function) and `--key=value` overrides."""
    args = list(argv)
    cfg = TrainConfig()
    if "--config" in args or any(a.startswith("--config=") for a in args):
        i = next(i for i, a in enumerate(args) if a == "--config" or a.startswith("--config="))
        path = args.pop(i).partition("=")[2] or (args.pop(i) if i < len(args) else "")
        cfg = _load_config_file(path)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"unexpected argument {arg!r}: use --key=value (see --help)")
        key, _, text = arg[2:].partition("=")
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean --{close[0]}?" if close else "; see --help for the knobs"
            raise ConfigError(f"unknown config key --{key}{hint}")
        if key == "model_overrides":
            raise ConfigError("model_overrides can only be set in a config file")
        setattr(cfg, key, _parse_value(key, text, getattr(cfg, key)))
    try:
        cfg.model_config()
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad model config: {e}") from None
    return cfg


def _load_config_file(path: str) -> TrainConfig:
    if not path or not Path(path).is_file():
        raise ConfigError(f"config file {path!r} not found (try --config configs/tiny.py)")
    spec = importlib.util.spec_from_file_location("run_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "config"):
        raise ConfigError(f"{path} must define config() returning a TrainConfig")
    cfg = module.config()
    if not isinstance(cfg, TrainConfig):
        raise ConfigError(f"{path}: config() returned {type(cfg).__name__}, not a TrainConfig")
    return cfg


def usage() -> str:
    lines = [__doc__.strip(), "", "knobs (TrainConfig):"]
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  --{f.name}={default!r}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- setup

@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(cfg: TrainConfig) -> Dist:
    """One process per GPU under torchrun (RANK/WORLD_SIZE set), else a single process."""
    device_type = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device=cuda but no CUDA device is visible; use --device=cpu")
    if "RANK" not in os.environ:
        return Dist(device=torch.device(device_type))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return Dist(rank, local_rank, world_size, device)


def build_model(cfg: TrainConfig, device: torch.device) -> Transformer:
    """Built on the meta device and materialized on `device`: never a full CPU copy first."""
    with torch.device("meta"):
        model = Transformer(cfg.model_config())
    model.to_empty(device=device)
    model.init_weights()
    return model


def build_optimizer(model: Transformer, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on 2-D weights only (not on norms)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.max_lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to max_lr, then cosine decay to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.max_lr * (step + 1) / cfg.warmup_steps
    if step >= cfg.max_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.max_lr - cfg.min_lr)


def flops_per_token(model: Transformer) -> float:
    """6N + 12 L T d: the matmul FLOPs of forward + backward, attention scores included."""
    c = model.config
    return 6 * model.num_params() + 12 * c.n_layers * c.max_seq_len * c.dim


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def gradient_accumulation(cfg: TrainConfig, world_size: int) -> int:
    per_micro_step = cfg.micro_batch * cfg.seq_len * world_size
    if cfg.total_batch_tokens % per_micro_step:
        options = [b for b in range(1, 4 * cfg.micro_batch + 1)
                   if cfg.total_batch_tokens % (b * cfg.seq_len * world_size) == 0]
        hint = f"; micro_batch values that divide: {options[-4:]}" if options else ""
        raise ConfigError(
            f"total_batch_tokens={cfg.total_batch_tokens:,} is not divisible by micro_batch x seq_len x "
            f"world_size = {cfg.micro_batch} x {cfg.seq_len} x {world_size} = {per_micro_step:,}{hint}")
    return cfg.total_batch_tokens // per_micro_step


# ----------------------------------------------------------------------------- state

def check_resume_compatible(saved: dict, cfg: TrainConfig, log) -> None:
    saved_model = saved["model_config"]
    current_model = cfg.model_config().to_dict()
    diffs = [f"{k}: checkpoint {saved_model.get(k)!r} vs now {v!r}"
             for k, v in current_model.items() if saved_model.get(k) != v]
    saved_train = saved["train_config"]
    diffs += [f"{k}: checkpoint {saved_train.get(k)!r} vs now {getattr(cfg, k)!r}"
              for k in FIXED_ON_RESUME if saved_train.get(k) != getattr(cfg, k)]
    if diffs:
        raise ConfigError("cannot resume with a different model or data order: " + "; ".join(diffs)
                          + " (use --init_from for weights only, or a new --out_dir)")
    for k in SCHEDULE_KNOBS:
        if saved_train.get(k) != getattr(cfg, k):
            log(f"warning: {k} changed on resume: {saved_train.get(k)!r} -> {getattr(cfg, k)!r}")


# ----------------------------------------------------------------------------- signals

class StopFlag:
    """Set by SIGTERM/SIGUSR1 (what SLURM sends before a kill); a second signal exits at once."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            os._exit(128 + signum)
        self.requested = True
        print(f"received {signal.Signals(signum).name}: saving a checkpoint after this step "
              f"(send it again to exit at once)", flush=True)



def agree_on_step(grad_norm: torch.Tensor, loss_sum: torch.Tensor, stop: StopFlag, d: Dist) -> tuple[bool, bool]:
    """(apply the update?, stop now?), the same on every rank: the one host-device sync per step.

    A non-finite loss or gradient norm on any rank skips the update everywhere; a signal to any
    rank stops all of them after the same step.
    """
    flags = torch.stack([~(torch.isfinite(grad_norm) & torch.isfinite(loss_sum)),
                         torch.tensor(stop.requested, device=grad_norm.device)]).float()
    if d.world_size > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    nonfinite, stop_requested = flags.tolist()
    return not nonfinite, bool(stop_requested)


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def validation_loss(model, cfg: TrainConfig, d: Dist, autocast) -> float:
    """Mean loss over the fixed validation set; each rank scores its share, totals all-reduced."""
    total = torch.zeros(2, dtype=torch.float64, device=d.device)  # (summed loss, tokens)
    for x, y in val_batches(cfg.data_dir, cfg.seq_len, cfg.micro_batch, d.rank, d.world_size,
                            max_sequences=cfg.val_sequences, vocab_size=cfg.model_config().vocab_size,
                            pin_memory=d.device.type == "cuda"):
        x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
        with autocast:
            loss = model(x, y)
        total[0] += loss.double() * y.numel()
        total[1] += y.numel()
    if d.world_size > 1:
        dist.all_reduce(total)
    return (total[0] / total[1]).item()


@torch.no_grad()
def sample_text(model: Transformer, cfg: TrainConfig, d: Dist, autocast) -> str:
    """A seeded continuation of the sample prompt; its own generator leaves training RNG alone."""
    from tokenizer import get_encoding  # noqa: PLC0415

    enc = get_encoding()
    prompt = torch.tensor([enc.encode_ordinary(cfg.sample_prompt)], device=d.device)
    generator = torch.Generator(device=d.device).manual_seed(cfg.seed)
    with autocast:
        out = model.generate(prompt, cfg.sample_tokens, temperature=1.0, top_k=50, generator=generator)
    return enc.decode(out[0].tolist())


# ----------------------------------------------------------------------------- training

def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(usage())
        return {}
    try:
        cfg = load_config(argv)
        return train(cfg)
    except (ConfigError, DataError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(cfg: TrainConfig) -> dict:
    d = setup_distributed(cfg)
    benchmark = cfg.benchmark > 0
    log = Logger(cfg.out_dir, d.is_main, write_file=not benchmark,
                 wandb_project=cfg.wandb_project if cfg.wandb else None,
                 tensorboard=cfg.tensorboard, config=cfg)
    accum_steps = gradient_accumulation(cfg, d.world_size)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    if d.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = (torch.autocast("cuda", dtype=getattr(torch, cfg.dtype))
                if d.device.type == "cuda" else nullcontext())

    resume_from = None if benchmark else find_resume_checkpoint(cfg, d, log)
    loader = None if benchmark else make_loader(cfg, d, log)
    model = build_model(cfg, d.device)
    optimizer = build_optimizer(model, cfg, d.device)
    step, tokens_seen = 0, 0
    if resume_from is not None:
        step, tokens_seen = restore(resume_from, d, model, optimizer, loader, log)
    elif cfg.init_from and not benchmark:
        init_weights_from(cfg.init_from, model, log)

    use_compile = cfg.compile and (d.device.type == "cuda" or cfg.compile_cpu)
    compiled = torch.compile(model) if use_compile else model
    # DDP around the compiled module: gradient sync on the last micro-step only. rope is a
    # function of the config, so there is no buffer to broadcast.
    train_model = (DDP(compiled, device_ids=[d.local_rank] if d.device.type == "cuda" else None,
                       broadcast_buffers=False) if d.world_size > 1 else compiled)
    hellaswag_examples = load_hellaswag(cfg) if cfg.hellaswag_interval and not benchmark else None

    n_params = model.num_params()
    tokens_per_step = cfg.total_batch_tokens
    flops_step = flops_per_token(model) * tokens_per_step
    peak = peak_flops(d.device)
    log.print(f"config: {json.dumps(dataclasses.asdict(cfg))}")
    log.print(f"model {cfg.model}: {n_params:,} parameters | {tokens_per_step:,} tokens/step = "
              f"{cfg.micro_batch} micro-batch x {cfg.seq_len} seq x {accum_steps} accumulation x "
              f"{d.world_size} processes | device {d.device} | compile {use_compile}")

    stop = StopFlag()
    synthetic = torch.Generator().manual_seed(cfg.seed)
    last_step = cfg.benchmark if benchmark else cfg.max_steps
    if cfg.stop_step:
        last_step = min(last_step, cfg.stop_step)
    consecutive_skips = skipped_total = 0
    timings: list[float] = []
    t_start = time.perf_counter()
    while step < last_step:
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if not benchmark:
            evaluate_if_due(step, cfg, d, model, compiled, autocast, hellaswag_examples, log)

        loss_sum = torch.zeros((), device=d.device)
        for micro_step in range(accum_steps):
            if benchmark:
                x = torch.randint(0, model.config.vocab_size, (cfg.micro_batch, cfg.seq_len + 1), generator=synthetic)
                x, y = x[:, :-1], x[:, 1:]
            else:
                x, y = loader.next_batch()
            x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
            if d.world_size > 1:
                # Toggled instead of `no_sync()` so the same code runs with or without DDP.
                train_model.require_backward_grad_sync = micro_step == accum_steps - 1
            with autocast:
                loss = train_model(x, y)
            if step == cfg.fault_nan_step:
                loss = loss * float("nan")
            loss = loss / accum_steps
            loss_sum += loss.detach()
            loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        finite, stopping = agree_on_step(grad_norm, loss_sum, stop, d)
        if finite:
            optimizer.step()
            consecutive_skips = 0
        else:
            consecutive_skips += 1
            skipped_total += 1
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += tokens_per_step

        if d.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        timings.append(dt)
        if not finite:
            log.print(f"step {step}: non-finite loss or gradient norm, update skipped "
                      f"({consecutive_skips} in a row, {skipped_total} in total)")
            log.metrics(step, skipped=True, skipped_total=skipped_total)
            if consecutive_skips >= cfg.max_skipped_steps:
                log.print(f"stopping: {consecutive_skips} consecutive non-finite steps; the last good "
                          f"checkpoint is kept in {cfg.out_dir} (lower max_lr or check the data)")
                log.close()
                raise SystemExit(1)
        elif step % cfg.log_interval == 0 or step == last_step:
            log_step(step, last_step, loss_sum, grad_norm, lr, dt, timings, tokens_per_step,
                     flops_step, peak, tokens_seen, d, log)

        if not benchmark and (stopping or step == last_step
                              or (cfg.save_interval and step % cfg.save_interval == 0)):
            if step == cfg.max_steps:
                evaluate_if_due(step, cfg, d, model, compiled, autocast, hellaswag_examples, log, force=True)
            save(cfg, d, model, optimizer, loader, step, tokens_seen, log)
        if stopping:
            log.print(f"stopped by signal after step {step}; resume with the same command")
            break

    if loader is not None:
        loader.close()
    result = summarize(cfg, d, timings, tokens_per_step, flops_step, peak, time.perf_counter() - t_start, log)
    log.close()
    return result


def make_loader(cfg: TrainConfig, d: Dist, log: Logger):
    if cfg.prepare_local_data:
        if d.is_main:
            from fineweb_edu import build_local_corpus  # noqa: PLC0415

            build_local_corpus(cfg.data_dir, log=log.print)
        if d.world_size > 1:
            dist.barrier()
    return TrainLoader(cfg.data_dir, cfg.seq_len, cfg.micro_batch, cfg.total_batch_tokens // cfg.seq_len,
                       rank=d.rank, world_size=d.world_size, seed=cfg.seed, shuffle=cfg.shuffle,
                       vocab_size=cfg.model_config().vocab_size, pin_memory=d.device.type == "cuda",
                       prefetch=d.device.type == "cuda", log=log.print)


def find_resume_checkpoint(cfg: TrainConfig, d: Dist, log: Logger) -> Path | None:
    """The checkpoint to resume from, checked against this config before any heavy work."""
    if d.is_main and Path(cfg.out_dir).is_dir():
        checkpoint.remove_incomplete(cfg.out_dir)
    if cfg.resume == "never":
        return None
    if cfg.resume == "auto":
        ckpt = checkpoint.resolve(cfg.out_dir) if Path(cfg.out_dir).is_dir() else None
    else:
        ckpt = checkpoint.resolve(cfg.resume)
        if ckpt is None:
            raise ConfigError(f"--resume={cfg.resume}: no checkpoint there")
    if ckpt is not None:
        check_resume_compatible(checkpoint.read_meta(ckpt), cfg, log)
    return ckpt


def restore(ckpt: Path, d: Dist, model: Transformer, optimizer, loader, log: Logger) -> tuple[int, int]:
    """Model, optimizer, loader position and RNG from `ckpt`; returns (step, tokens_seen)."""
    # The optimizer's hyperparameters come from this config, not the checkpoint, so that a
    # deliberate change of weight decay or betas takes effect.
    fresh_groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    meta = checkpoint.load(ckpt, model, optimizer)
    for group, fresh in zip(optimizer.param_groups, fresh_groups):
        group.update(fresh)
    loader.load_state_dict(meta["loader"])
    rngs = meta["rng"]
    checkpoint.set_rng_state(rngs[d.rank] if d.rank < len(rngs) else rngs[0])
    note = "" if meta["world_size"] == d.world_size else f" (written by {meta['world_size']} processes)"
    log.print(f"resumed from {ckpt} at step {meta['step']}, {meta['tokens_seen']:,} tokens seen{note}")
    return meta["step"], meta["tokens_seen"]


def init_weights_from(path: str, model: Transformer, log: Logger) -> None:
    """Weights only: our checkpoint or a Hugging Face Llama directory; the optimizer starts fresh."""
    if (Path(path) / "config.json").is_file():
        from export_hf import load_hf  # noqa: PLC0415

        # Read on the CPU: a second full copy on the GPU would double its memory for a moment.
        source = load_hf(path, device="cpu", pad_vocab_to=model.config.vocab_size)
        theirs, ours = source.config.to_dict(), model.config.to_dict()
        diffs = [f"{k}: {theirs[k]!r} vs {ours[k]!r}" for k in ours
                 if k not in ("max_seq_len", "init_std", "depth_scaled_init", "loss_chunk_size") and theirs[k] != ours[k]]
        if diffs:
            raise ConfigError(f"--init_from={path} does not match the model config: " + "; ".join(diffs))
        model.load_state_dict(source.state_dict())
    else:
        ckpt = checkpoint.resolve(path)
        if ckpt is None:
            raise ConfigError(f"--init_from={path}: no checkpoint there")
        checkpoint.load(ckpt, model)
    log.print(f"initialized weights from {path}")


def load_hellaswag(cfg: TrainConfig):
    """Loaded at start, so that missing data fails now rather than hours into the run."""
    import hellaswag  # noqa: PLC0415

    return hellaswag.load_examples(cfg.hellaswag_data or None, limit=cfg.hellaswag_limit or None)


def evaluate_if_due(step: int, cfg: TrainConfig, d: Dist, model: Transformer, compiled, autocast,
                    hellaswag_examples, log: Logger, force: bool = False) -> None:
    def due(interval: int) -> bool:
        return bool(interval) and (force or step % interval == 0)

    if due(cfg.eval_interval):
        val = validation_loss(compiled, cfg, d, autocast)
        log.print(f"step {step}: val loss {val:.4f}")
        log.metrics(step, val_loss=val)
    if due(cfg.hellaswag_interval):
        import hellaswag  # noqa: PLC0415

        result = hellaswag.evaluate(
            compiled, hellaswag_examples, d.device, batch_size=max(1, cfg.micro_batch // 4),
            autocast_dtype=getattr(torch, cfg.dtype) if d.device.type == "cuda" else None,
            rank=d.rank, world_size=d.world_size, max_seq_len=cfg.seq_len, progress=d.is_main)
        log.print(f"step {step}: HellaSwag acc {result['acc']:.4f} acc_norm {result['acc_norm']:.4f} "
                  f"({result['n']} examples)")
        log.metrics(step, hellaswag_acc=result["acc"], hellaswag_acc_norm=result["acc_norm"])
    if due(cfg.sample_interval) and d.is_main:
        log.print(f"step {step}: sample: {sample_text(model, cfg, d, autocast)!r}")


def save(cfg: TrainConfig, d: Dist, model: Transformer, optimizer, loader, step: int,
         tokens_seen: int, log: Logger) -> None:
    t0 = time.perf_counter()
    meta = {
        "tokens_seen": tokens_seen,
        "loader": loader.state_dict(),
        "world_size": d.world_size,
        "model_config": model.config.to_dict(),
        "train_config": dataclasses.asdict(cfg),
        "rng": checkpoint.gather_rng_states(),
    }
    path = checkpoint.save(cfg.out_dir, step, model, optimizer, meta, keep_last=cfg.keep_last)
    log.print(f"saved checkpoint {path} in {time.perf_counter() - t0:.1f}s")


def log_step(step, last_step, loss_sum, grad_norm, lr, dt, timings, tokens_per_step, flops_step,
             peak, tokens_seen, d: Dist, log: Logger) -> None:
    if d.world_size > 1:
        dist.all_reduce(loss_sum)  # SUM: gloo has no AVG
        loss_sum /= d.world_size
    loss, norm = loss_sum.item(), grad_norm.item()
    tokens_per_s = tokens_per_step / dt
    mfu = flops_step / dt / (peak * d.world_size) if peak else None
    eta = (last_step - step) * float(np.median(timings[-20:]))
    mem = torch.cuda.max_memory_allocated(d.device) / 2**30 if d.device.type == "cuda" else None
    log.print(f"step {step:6d}/{last_step} | loss {loss:.4f} | lr {lr:.2e} | norm {norm:.3f} | "
              f"{tokens_per_s:,.0f} tok/s | MFU {f'{mfu:.1%}' if mfu else '-'} | {dt * 1000:.0f} ms | "
              f"ETA {format_duration(eta)}" + (f" | mem {mem:.1f} GiB" if mem else ""))
    if len(timings) == 10:
        log.print(f"at the measured speed, the remaining {last_step - step:,} steps take about "
                  f"{format_duration(eta)}")
    log.metrics(step, loss=loss, lr=lr, grad_norm=norm, tokens_per_s=tokens_per_s, mfu=mfu,
                ms=dt * 1000, tokens_seen=tokens_seen, mem_gib=mem)


def summarize(cfg: TrainConfig, d: Dist, timings: list[float], tokens_per_step: int, flops_step: float,
              peak, elapsed: float, log: Logger) -> dict:
    """For --benchmark: the median step after warm-up (the first steps include compilation)."""
    steady = timings[min(len(timings) - 1, max(1, len(timings) // 3)):] if timings else [float("nan")]
    step_time = float(np.median(steady))
    result = {"steps": len(timings), "ms_per_step": step_time * 1000,
              "tokens_per_s": tokens_per_step / step_time,
              "mfu": flops_step / step_time / (peak * d.world_size) if peak else None,
              "peak_mem_gib": torch.cuda.max_memory_allocated(d.device) / 2**30 if d.device.type == "cuda" else None,
              "elapsed_s": elapsed}
    if cfg.benchmark:
        mfu = f"{result['mfu']:.1%}" if result["mfu"] else "- (no known peak for this device)"
        mem = f"{result['peak_mem_gib']:.1f} GiB" if result["peak_mem_gib"] else "-"
        log.print(f"benchmark: {result['tokens_per_s']:,.0f} tokens/s | MFU {mfu} | "
                  f"{result['ms_per_step']:.1f} ms/step | peak memory {mem} "
                  f"(median of the last {len(steady)} of {len(timings)} steps)")
    return result


if __name__ == "__main__":
    # Config files import TrainConfig from `train_llama`: make that name this very module, not a
    # second copy whose TrainConfig would be a different class.
    sys.modules["train_llama"] = sys.modules[__name__]
    main()
