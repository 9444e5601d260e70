"""TrainConfig: every knob of a run, its validation, and the `--config FILE --key=value` parser.

Config files import it (`from llama_fineweb.train_config import TrainConfig`) and define
`config()` returning one; the command line overrides fields as `--key=value`, type-checked,
unknown keys refused.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import inspect
import io
import re
import sys
import textwrap
import tokenize
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from typing import ClassVar, Literal, get_args, get_origin, get_type_hints

from model import ModelConfig, model_config

from .dataloader import DataError
from .lora import LoraSpec, parse_targets
from .stability import parse_windows
from .utils import (MOVED_MODULES, UserError, cli_errors, closed_output_survives, moved_module_line,
                    teardown_distributed)


class ConfigError(UserError):
    """A bad config or command line: one line naming the problem and the fix."""


@dataclass
class TrainConfig:
    """Every knob of a pretraining run. Each field's trailing comment is its --help sentence and a
    comment line above a run of fields names their group (train_config.knob_help reads both)."""

    # What kind of run this config trains, recorded in every checkpoint: a run never resumes as another kind.
    RUN_KIND: ClassVar[str] = "pretraining"
    SCRIPT: ClassVar[str] = "train_llama.py"
    ALSO_FIXED_ON_RESUME: ClassVar[tuple[str, ...]] = ()  # a subclass's knobs beside FIXED_ON_RESUME
    # model
    model: str = "1p7b"  # a preset of model.py: tiny, 124m, 978m or 1p7b
    model_overrides: dict = field(default_factory=dict)  # ModelConfig fields to change (config files only)
    # data
    data_dir: str = "data/edu_fineweb10B"  # the token shards (fineweb_edu.py writes them)
    data_mix: str = ""  # shard directories in set shares, DIR:WEIGHT,DIR:WEIGHT (mixture.py); empty = data_dir
    prepare_local_data: bool = False  # build a small offline corpus into the config's own data_dir if empty
    shuffle: bool = True  # seeded permutation of sequences; False = the reference's file order
    seq_len: int = 1024  # tokens per sequence (the model's context)
    doc_mask: bool = False  # training attends within each packed document only (doc_mask.py); off in the paper
    accept_new_data: bool = False  # resume although the shards differ from the checkpoint's
    # batch: tokens per optimizer step; the gradient accumulation follows from the GPU count
    total_batch_tokens: int = 524_288  # tokens per optimizer step, over all GPUs and micro-steps
    micro_batch: int | str = 16  # sequences per forward on each GPU, or auto: the largest planner.py fits
    # schedule
    max_steps: int = 38_147  # length of the run in optimizer steps (default: 20.0B tokens)
    warmup_steps: int = 715  # steps of linear warmup to max_lr
    max_lr: float = 6e-4  # learning rate after warmup
    min_lr: float = 6e-5  # learning rate reached at max_steps
    lr_schedule: Literal["cosine", "linear", "wsd"] = "cosine"  # cosine (the paper's), linear (the DMaS model cards) or wsd (warmup-stable-decay)
    decay_steps: int = 0  # wsd: steps of the final decay; 0 = decay_fraction of max_steps
    decay_fraction: float = 0.2  # wsd: the decay's share of max_steps when decay_steps is 0
    decay_shape: Literal["linear", "1-sqrt"] = "linear"  # wsd: "linear" or "1-sqrt" (faster at first, slower near min_lr)
    decay_from: str = ""  # wsd: branch from this stable-stage checkpoint, decay over decay_steps in a new out_dir
    # AdamW
    weight_decay: float = 0.1  # on 2-D weights only
    beta1: float = 0.9  # AdamW's first-moment decay
    beta2: float = 0.95  # AdamW's second-moment decay
    eps: float = 1e-8  # AdamW's epsilon
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 = no clipping
    max_skipped_steps: int = 5  # stop after this many skipped steps in a row, non-finite or above the divergence limit
    # Muon (docs/optimizers.md): torch.optim.Muon for the blocks' 2-D weights, AdamW above for the rest
    optimizer: Literal["adamw", "muon"] = "adamw"  # adamw (the paper's) or muon: Muon for the blocks' matrices, AdamW for embedding, head and norms
    muon_lr: float = 0.02  # Muon's LR after warmup; it follows the schedule as max_lr does (times lr / max_lr)
    muon_momentum: float = 0.95  # Muon's momentum (Nesterov)
    muon_weight_decay: float = 0.0  # Muon's decoupled weight decay: each step scales its weights by 1 - lr x this
    muon_ns_steps: int = 5  # Newton-Schulz iterations that orthogonalize each Muon update
    muon_adjust_lr: Literal["original", "match_rms_adamw"] = "original"  # Muon's LR per matrix shape: original (x sqrt(max(1, rows/cols))) or match_rms_adamw (x 0.2 sqrt(max(rows, cols)), AdamW-sized LRs)
    # stability (docs/stability.md): what a loss or gradient-norm spike does
    on_spike: Literal["off", "warn", "skip", "rollback"] = "skip"  # off | warn | skip (the update) | rollback (to the last good checkpoint)
    spike_threshold: float = 10.0  # a step whose robust z-score (loss or grad norm) exceeds this spikes
    spike_window: int = 200  # the healthy steps a step is compared with
    spike_min_history: int = 50  # healthy steps kept before z-scores judge (the divergence limit judges from the start)
    spike_jump: float = 0.5  # divergence limit: a loss this share of the way from the median recent one back to ln(vocab)
    spike_adopt_after: int = 3  # loss spikes in a row below the divergence limit that become the new level
    max_rollbacks: int = 3  # rollbacks in one process before the run stops
    rollback_margin: int = 0  # global batches skipped past the spiking one on a rollback
    skip_batches: str = ""  # "A:B,C:D": global batches [A, B) of the data order never trained on
    loss_scale_growth_interval: int = 2000  # float16: steps without an overflow before the loss scale doubles
    z_loss: float = 0.0  # PaLM's auxiliary loss, z_loss x mean(log(sum(exp(logits)))^2); 1e-4 in PaLM
    # evaluation and sampling (0 = never)
    eval_interval: int = 250  # steps between validation losses
    val_sequences: int = 640  # sequences in the fixed validation set, the same on any GPU count
    sample_interval: int = 1000  # steps between seeded samples from sample_prompt
    sample_prompt: str = "Hello, I'm a language model,"  # the text a sample continues
    sample_tokens: int = 64  # tokens per sample
    sample_temperature: float = 1.0  # sampling temperature (top-k 50); 0 = greedy
    hellaswag_interval: int = 0  # steps between HellaSwag scores
    hellaswag_limit: int = 0  # score the first N examples; 0 = all 10,042
    hellaswag_data: str = ""  # local hellaswag_val.jsonl; empty = download once and cache
    # checkpoints
    out_dir: str = "out/run"  # the run directory: checkpoints, metrics.jsonl, log.txt
    save_interval: int = 1000  # steps between checkpoints (the last step is always saved)
    keep_last: int = 3  # keep the newest N checkpoints; 0 = keep every one
    resume: str = "auto"  # "auto": out_dir's latest checkpoint if any; "never"; or a path
    start_over: Literal["", "archive", "delete"] = ""  # with resume=never in a used out_dir: "archive" or "delete" its checkpoints
    init_from: str = ""  # weights only (our checkpoint or a Hugging Face directory)
    stop_step: int = 0  # save and stop after this step (e.g. to fit a job's time limit)
    verify: Literal["full", "size"] = "full"  # on load: "full" checks every file's sha256, "size" only the sizes
    async_save: bool = True  # write checkpoints in the background (staged in CPU memory) while training goes on
    # system
    device: str = "auto"  # auto = cuda if available, else cpu
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"  # autocast dtype on CUDA (float16: with dynamic loss scaling); CPU runs in float32
    cpu_autocast: bool = False  # CPU steps under the dtype's autocast too (tests the fp16/bf16 path)
    compile: bool = True  # torch.compile on CUDA (on CPU only when compile_cpu is set)
    compile_cpu: bool = False  # torch.compile on CPU too (slow to start, for tests)
    compile_mode: Literal["blocks", "model"] = "model"  # "model": one graph; "blocks": each block (half the compile time)
    # parallelism and memory (parallel.py)
    parallel: Literal["ddp", "fsdp"] = "ddp"  # "ddp": each rank holds the whole model; "fsdp": params, grads, AdamW sharded
    fsdp_shard_size: int = 0  # fsdp: ranks that share one copy; 0 = all; GPUs per node = HSDP across nodes
    reshard_after_forward: bool = True  # fsdp: free each block's gathered params after its forward
    fsdp_reduce_every_micro_step: bool = False  # fsdp: least memory, but accumulation x the reduce traffic
    activation_checkpointing: Literal["none", "full", "selective"] = "none"  # "none", "full" (every block) or "selective" (every ac_every-th)
    ac_every: int = 2  # selective activation checkpointing: every N-th block
    sdpa_backend: Literal["auto", "flash", "cudnn", "efficient", "math"] = "auto"  # attention kernel: auto (SDPA picks), flash, cudnn, efficient or math
    ddp_bucket_mb: int = 25  # DDP all-reduce bucket size; larger buckets, fewer messages across nodes
    ddp_bf16_compress: bool = False  # DDP: all-reduce gradients in bfloat16 (half the traffic)
    # seed, logs and benchmark mode
    seed: int = 1337  # initial weights and data order
    log_interval: int = 1  # steps between log lines
    peak_tflops: float = 0.0  # the device's dense bf16 peak for MFU; 0 = look it up by name
    wandb: bool = False  # log to Weights & Biases too
    wandb_project: str = "llama-fineweb"  # the wandb project
    tensorboard: bool = False  # log to TensorBoard too (out_dir/tensorboard)
    benchmark: int = 0  # >0: time this many steps on synthetic tokens, save nothing
    # profiling and per-layer statistics (docs/at-scale.md)
    profile: str = ""  # START:END: a torch.profiler trace of steps START..END in out_dir/profile/; empty = none
    memory_snapshot: bool = False  # CUDA: record the allocator's history; a snapshot after step 1 and on out-of-memory
    layer_stats_interval: int = 0  # steps between per-block gradient, weight, update and activation statistics; 0 = never

    def model_config(self) -> ModelConfig:
        return model_config(self.model, max_seq_len=self.seq_len, **self.model_overrides)

    def lora_spec(self) -> LoraSpec | None:
        """The LoRA adapters to train instead of every weight (fine-tuning only), else None."""
        return None

    def validate(self) -> None:
        """ConfigError naming the first knob whose value cannot work, and what would."""
        positive = ("seq_len", "total_batch_tokens", "max_steps", "max_lr", "eps",
                    "log_interval", "max_skipped_steps", "spike_threshold", "spike_window",
                    "spike_min_history", "spike_jump", "spike_adopt_after", "loss_scale_growth_interval",
                    "muon_lr", "muon_ns_steps")
        at_least_zero = ("warmup_steps", "min_lr", "weight_decay", "grad_clip", "eval_interval",
                         "sample_interval", "sample_tokens", "hellaswag_interval", "hellaswag_limit",
                         "sample_temperature", "save_interval", "keep_last", "stop_step", "peak_tflops",
                         "benchmark", "max_rollbacks", "rollback_margin", "z_loss", "layer_stats_interval",
                         "muon_weight_decay")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name}={getattr(self, name)!r} must be positive")
        if self.micro_batch != "auto" and not (isinstance(self.micro_batch, int) and self.micro_batch > 0):
            raise ConfigError(f"--micro_batch={self.micro_batch!r} must be positive (sequences per micro-step) or auto")
        for name in at_least_zero:
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name}={getattr(self, name)!r} must be 0 or more")
        for name in ("beta1", "beta2", "muon_momentum"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"--{name}={getattr(self, name)!r} must be in [0, 1)")
        if self.min_lr > self.max_lr:
            raise ConfigError(f"--min_lr={self.min_lr} is above --max_lr={self.max_lr}")
        if self.eval_interval and self.val_sequences <= 0:
            raise ConfigError(f"--val_sequences={self.val_sequences} must be positive when "
                              f"--eval_interval is set (or pass --eval_interval=0 to skip validation)")
        if self.total_batch_tokens % self.seq_len:
            raise ConfigError(f"--total_batch_tokens={self.total_batch_tokens:,} is not a multiple of "
                              f"--seq_len={self.seq_len}: a step holds whole sequences")
        self._validate_choices()
        try:
            self.model_config()
        except (TypeError, ValueError) as e:
            raise ConfigError(f"bad model config: {e}") from None
        self._validate_sample_and_loggers()

    def _validate_sample_and_loggers(self) -> None:
        """What would otherwise fail mid-run or after the run directory exists: the sample's length
        against the context, and the packages --tensorboard / --wandb need."""
        if self.sample_interval and not self.benchmark:  # benchmark mode never samples
            from .tokenizer import get_encoding  # noqa: PLC0415 - tiktoken only when a sample is due

            prompt = len(get_encoding().encode_ordinary(self.sample_prompt))
            if prompt + self.sample_tokens > self.seq_len:
                fix = f"--sample_tokens={self.seq_len - prompt}" if prompt < self.seq_len else "a shorter --sample_prompt"
                raise ConfigError(f"a sample of --sample_prompt ({prompt} tokens) + --sample_tokens="
                                  f"{self.sample_tokens} exceeds --seq_len={self.seq_len}: pass {fix} "
                                  f"(or --sample_interval=0)")
        for flag, package in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
            if getattr(self, flag) and importlib.util.find_spec(package) is None:
                raise ConfigError(f"--{flag}=true needs the {package} package, which is not installed: "
                                  f"`pip install {package}`, or leave --{flag} off")

    def _validate_choices(self) -> None:
        for name, allowed in choices(type(self)).items():
            if getattr(self, name) not in allowed:
                shown = ", ".join(a for a in allowed if a)  # "" (unset) is not a choice to offer
                raise ConfigError(f"--{name}={getattr(self, name)!r}: choose one of {shown}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"--device={self.device!r}: choose auto, cpu or cuda")
        if self.spike_min_history > self.spike_window:
            raise ConfigError(f"--spike_min_history={self.spike_min_history} is more than --spike_window="
                              f"{self.spike_window} healthy steps kept: no step would ever be judged")
        parse_windows(self.skip_batches)
        self.profile_steps()
        if self.start_over and self.resume != "never":
            raise ConfigError("--start_over only applies with --resume=never")
        if not self.resume:
            raise ConfigError("--resume is empty: use auto, never or a checkpoint path")
        self._validate_schedule()
        if self.data_mix:
            from .mixture import parse_data_mix  # noqa: PLC0415 - torch and numpy only when a mixture is named

            try:
                parse_data_mix(self.data_mix)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        for name in ("ac_every", "ddp_bucket_mb"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name}={getattr(self, name)!r} must be positive")
        if self.fsdp_shard_size < 0:
            raise ConfigError(f"--fsdp_shard_size={self.fsdp_shard_size} must be 0 (all ranks) or a "
                              f"divisor of the process count")

    def _validate_schedule(self) -> None:
        if self.decay_steps < 0:
            raise ConfigError(f"--decay_steps={self.decay_steps} must be 0 (use decay_fraction) or more")
        if not 0 < self.decay_fraction <= 1:
            raise ConfigError(f"--decay_fraction={self.decay_fraction} must be in (0, 1]")
        if self.decay_from:
            if self.lr_schedule != "wsd" or not self.decay_steps:
                raise ConfigError("--decay_from decays a WSD run's checkpoint: add --lr_schedule=wsd and "
                                  "--decay_steps=N (the branch's length)")
            if self.resume != "auto":
                raise ConfigError("--decay_from starts (or, in its own out_dir, resumes) a branch: leave "
                                  "--resume at auto")
            return  # max_steps is the checkpoint's step + decay_steps, known once the checkpoint is read
        if self.lr_schedule == "wsd" and self.warmup_steps + self.decay_length() > self.max_steps:
            raise ConfigError(f"--warmup_steps={self.warmup_steps} + a decay of {self.decay_length()} steps "
                              f"exceed --max_steps={self.max_steps}: shorten them or lengthen the run")

    def profile_steps(self) -> tuple[int, int] | None:
        """--profile=START:END as (START, END), both steps included; None when unset."""
        if not self.profile:
            return None
        m = re.fullmatch(r"(\d+):(\d+)", self.profile)
        if not m or not 1 <= int(m[1]) <= int(m[2]):
            raise ConfigError(f"--profile={self.profile!r}: write START:END, two step numbers with "
                              f"1 <= START <= END (e.g. --profile=10:12)")
        return int(m[1]), int(m[2])

    def decay_length(self) -> int:
        """wsd: the steps of the final decay (decay_steps, else decay_fraction of max_steps)."""
        return self.decay_steps or max(1, round(self.decay_fraction * self.max_steps))


def choices(kind: type[TrainConfig]) -> dict[str, tuple]:
    """{knob: its allowed values} for every knob typed Literal[...]: the one place a choice is listed."""
    return {name: get_args(hint) for name, hint in get_type_hints(kind).items() if get_origin(hint) is Literal}


# ----------------------------------------------------------------------------- parsing

# Knobs that take "auto" besides a number: the number's type, by an example value.
AUTO_KNOBS = {"micro_batch": 1}


def _parse_value(name: str, text: str, current):
    if name in AUTO_KNOBS:
        if text.strip().lower() == "auto":
            return "auto"
        current = AUTO_KNOBS[name]  # a number otherwise, also where the config file said auto
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
            if kind is int:  # 1e4 and 2.5e5 are fine where they are whole numbers
                try:
                    value = float(text.replace("_", ""))
                    if value.is_integer():
                        return int(value)
                except ValueError:
                    pass
    elif kind is str:
        return text
    also = " or auto" if name in AUTO_KNOBS else ""
    raise ConfigError(f"--{name}={text!r}: expected a {kind.__name__}{also} (like --{name}={current!r})")


def load_config(argv: list[str], kind: type[TrainConfig] = TrainConfig) -> TrainConfig:
    """A `kind` (TrainConfig or a subclass) from `--config FILE` (its `config()` function) and
    `--key=value` overrides, validated."""
    cfg = _parse_config(argv, kind)
    cfg.validate()
    return cfg


def _parse_config(argv: list[str], kind: type[TrainConfig]) -> TrainConfig:
    args = list(argv)
    cfg = kind()
    if "--config" in args or any(a.startswith("--config=") for a in args):
        i = next(i for i, a in enumerate(args) if a == "--config" or a.startswith("--config="))
        path = args.pop(i).partition("=")[2] or (args.pop(i) if i < len(args) else "")
        cfg = load_config_file(path, kind)
    names = {f.name for f in dataclasses.fields(kind)}
    named_data_dir, given = cfg.data_dir, set()
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
        given.add(key)
    if cfg.prepare_local_data and cfg.data_dir != named_data_dir and "prepare_local_data" not in given:
        _local_data_elsewhere(cfg.data_dir, named_data_dir)
        cfg.prepare_local_data = False
    # Which knobs the command line set (not the config file): a rerun of a finished run exits 0 only
    # when it names the step it is at (check_not_finished).
    cfg.command_line = {key: getattr(cfg, key) for key in given}
    return cfg


def training_cli(program: str, doc: str, argv: list[str] | None, kind: type[TrainConfig],
                 start: Callable[[TrainConfig], dict]) -> dict:
    """The entry point train_llama.py and finetune.py share: --help, the config from `argv`, then
    `start(cfg)`; a user's error is one line (exit 2), a closed stdout is quiet, Ctrl-C before the
    first step loses nothing, and the process group is torn down whatever happens."""
    argv = sys.argv[1:] if argv is None else argv
    with closed_output_survives():
        if "-h" in argv or "--help" in argv:
            with cli_errors(program):
                print(usage(doc, argv, kind))
            return {}
        try:
            with cli_errors(program, expected=(DataError,)):
                try:
                    return start(load_config(argv, kind))
                finally:
                    teardown_distributed()
        except KeyboardInterrupt:
            print("interrupted before training started; nothing was lost", file=sys.stderr)
            raise SystemExit(130) from None


def _local_data_elsewhere(data_dir: str, named_data_dir: str) -> None:
    """A config builds its offline corpus only into the data_dir it names: a mistyped --data_dir must
    not quietly become a second corpus. Another directory is read as it is, if it holds shards."""
    if not Path(data_dir).is_dir() or not any(Path(data_dir).glob("*_train_*.npy")):
        raise ConfigError(f"--data_dir={data_dir} holds no shards, and the config builds its corpus only into "
                          f"{named_data_dir}: check the path, or add --prepare_local_data=true to build it there")


def load_config_file(path: str, kind: type[TrainConfig]) -> TrainConfig:
    """The config a file's config() returns, unvalidated; ConfigError if there is none."""
    if not path or not Path(path).is_file():
        raise ConfigError(f"config file {path!r} not found (try --config configs/tiny.py)")
    spec = importlib.util.spec_from_file_location("run_config", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in MOVED_MODULES:
            raise ConfigError(moved_module_line(e.name.split(".")[0], path)) from None
        raise
    if not hasattr(module, "config"):
        raise ConfigError(f"{path} must define config() returning a {kind.__name__}")
    cfg = module.config()
    if not isinstance(cfg, kind):
        raise ConfigError(f"{path}: config() returned {type(cfg).__name__}, not a {kind.__name__}")
    return cfg


def knob_help(kind: type[TrainConfig] = TrainConfig) -> dict[str, tuple[str, str]]:
    """{field: (group, sentence)} from the dataclass's own source, its one description: a field's
    sentence is its trailing comment, its group the comment line(s) above its run of fields, both
    taken from the class that introduces the field (SFTConfig's overrides keep TrainConfig's)."""
    described: dict[str, tuple[str, str]] = {}
    own: list[str] = []  # fields the most derived class introduces: listed first, they are its point
    for cls in reversed(kind.__mro__):
        if not dataclasses.is_dataclass(cls):
            continue
        source = textwrap.dedent(inspect.getsource(cls))
        comments = {tok.start[0]: (tok.string.lstrip("#").strip(), tok.line.strip().startswith("#"))
                    for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                    if tok.type == tokenize.COMMENT}
        fields = {f.name for f in dataclasses.fields(cls)}
        group, last_line = "", 0
        for node in ast.parse(source).body[0].body:
            if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
                continue
            above = [text for line, (text, alone) in sorted(comments.items())
                     if alone and last_line < line < node.lineno]
            last_line = node.end_lineno
            if node.target.id not in fields:  # a ClassVar, and the comment above it is its own
                continue
            group = " ".join(above) or group
            trailing = comments.get(node.end_lineno, ("", True))
            sentence = "" if trailing[1] else trailing[0]
            if node.target.id not in described:
                described[node.target.id] = (group, sentence)
                if cls is kind and cls is not TrainConfig:
                    own.append(node.target.id)
    return {name: described[name] for name in [*own, *(n for n in described if n not in own)]}


def usage(doc: str, argv: list[str] = (), kind: type[TrainConfig] = TrainConfig) -> str:
    """--help: the script's summary and examples, then every knob by group with its sentence and
    its value: the config file's (and overrides') when the command line has --config FILE."""
    cfg = _parse_config([a for a in argv if a not in ("-h", "--help")], kind)
    config_file = next((a.partition("=")[2] or argv[i + 1] for i, a in enumerate(argv)
                        if a.startswith("--config") and (a != "--config" or i + 1 < len(argv))), None)
    values = f"the values of {config_file}" if config_file else "their defaults"
    intro = "\n\n".join(doc.strip().split("\n\n")[:2])
    lines = [intro, "", f"Knobs ({kind.__name__}), with {values}; override any as --key=value:"]
    by_group: dict[str, list[str]] = {}
    allowed = choices(kind)
    for name, (group, sentence) in knob_help(kind).items():
        value = _shown(getattr(cfg, name))
        if name in allowed:
            sentence += " [one of: " + ", ".join(a or "''" for a in allowed[name]) + "]"
        by_group.setdefault(group, []).append(f"  --{name}={value}".ljust(36) + f" {sentence}".rstrip())
    for group, knobs in by_group.items():
        lines += ["", group if ":" in group else f"{group}:", *knobs]
    return "\n".join(lines)


def _shown(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    text = value if isinstance(value, str) and value and value.isprintable() and " " not in value else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ----------------------------------------------------------------------------- fine-tuning

@dataclass
class SFTConfig(TrainConfig):
    """TrainConfig plus the SFT knobs; defaults are the 1.7B recipe (configs/sft_1p7b.py)."""

    RUN_KIND: ClassVar[str] = "fine-tuning"
    SCRIPT: ClassVar[str] = "finetune.py"
    # The adapters' shape: a checkpoint's adapters fit only the same ones (dropout may change).
    ALSO_FIXED_ON_RESUME: ClassVar[tuple[str, ...]] = ("lora_rank", "lora_alpha", "lora_targets")

    # fine-tuning data
    data: str = "yahma/alpaca-cleaned"  # .json/.jsonl file (alpaca or chat rows) or a hub dataset
    template: str = "vicuna"  # a name in chat_template.TEMPLATES or a .json file of Template's fields
    val_fraction: float = 0.02  # rows held out for validation (fixed split seed)
    overlong: Literal["drop", "truncate"] = "drop"  # examples over seq_len + 1 tokens: "drop" or "truncate"
    pad_multiple: int = 64  # pad batches to a multiple of this: few shapes for torch.compile
    epochs: float = 0.0  # > 0: max_steps = ceil(epochs x train examples / examples per step)
    # LoRA (lora.py, through PEFT)
    lora_rank: int = 0  # rank of the adapters; 0 = full fine-tuning, R > 0 trains adapters with the base frozen
    lora_alpha: float = 16.0  # the adapters' output is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0  # on the adapters' input, in training only
    lora_targets: str = "wq,wk,wv,wo,w1,w2,w3"  # projections that get adapters: wq,wk,wv,wo attention; w1,w2,w3 SwiGLU
    # overrides of pretraining's defaults: the Alpaca recipe (see configs/sft_1p7b.py); --help shows
    # each under its pretraining group with the sentence written there
    total_batch_tokens: int = 128 * 1024  # 128 examples per step at seq_len 1024
    micro_batch: int | str = 16
    max_lr: float = 2e-5
    min_lr: float = 0.0
    warmup_steps: int = 36
    weight_decay: float = 0.0
    max_steps: int = 1189  # ~3 epochs of alpaca-cleaned at 128 examples per step (or set epochs)
    eval_interval: int = 100
    sample_interval: int = 0
    sample_temperature: float = 0.0  # greedy, as `chat.py --temperature 0` answers
    out_dir: str = "out/sft"
    save_interval: int = 200

    def validate(self) -> None:
        super().validate()
        if not self.init_from:
            raise ConfigError("finetune.py starts from a trained model: pass --init_from=RUN_DIR (one of our runs "
                              "or step_* directories) or a Hugging Face Llama directory")
        if not self.data:
            raise ConfigError("--data is empty: pass a .json/.jsonl file or a hub dataset name")
        if self.data_mix:
            raise ConfigError("--data_mix mixes pretraining shards; finetune.py reads its examples from --data")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"--val_fraction={self.val_fraction} must be in [0, 1)")
        if self.eval_interval and not self.val_fraction:
            raise ConfigError("--val_fraction=0 leaves no validation examples: set it, or --eval_interval=0")
        if self.pad_multiple <= 0:
            raise ConfigError(f"--pad_multiple={self.pad_multiple} must be positive")
        if self.epochs < 0:
            raise ConfigError(f"--epochs={self.epochs} must be 0 (use max_steps) or more")
        self._validate_lora()

    def _validate_lora(self) -> None:
        if self.lora_rank < 0:
            raise ConfigError(f"--lora_rank={self.lora_rank} must be 0 (full fine-tuning) or positive")
        if not self.lora_rank:
            return
        if not self.lora_alpha > 0 or not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"--lora_alpha={self.lora_alpha} must be positive and --lora_dropout="
                              f"{self.lora_dropout} in [0, 1)")
        try:
            parse_targets(self.lora_targets)
        except ValueError as e:
            raise ConfigError(f"--lora_targets={self.lora_targets!r}: {e}") from None
        if self.optimizer == "muon":
            raise ConfigError("--optimizer=muon with --lora_rank: Muon orthogonalizes whole weight matrices, and a "
                              "LoRA adapter's low-rank factors are not ones: use --optimizer=adamw (or full fine-tuning)")
        if self.parallel == "fsdp":
            # Sharding pays for itself on the trained weights, their gradients and AdamW state: under
            # LoRA those are the small adapters, and the frozen base replicates as in inference.
            raise ConfigError("--parallel=fsdp with --lora_rank: LoRA trains only the small adapters, so sharding "
                              "saves little beyond the frozen base (held in bf16 on CUDA: 3.4 GB at 1p7b), and "
                              "FSDP with frozen parameters is not supported here: use --parallel=ddp")

    def lora_spec(self) -> LoraSpec | None:
        if not self.lora_rank:
            return None
        return LoraSpec(self.lora_rank, self.lora_alpha, self.lora_dropout, parse_targets(self.lora_targets))
