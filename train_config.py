"""TrainConfig: every knob of a run, its validation, and the `--config FILE --key=value` parser.

Config files import it (`from train_config import TrainConfig`) and define `config()` returning
one; the command line overrides fields as `--key=value`, type-checked, unknown keys refused.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import inspect
import io
import os
import re
import textwrap
import tokenize
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

from model import ModelConfig, model_config
from utils import DTYPES, UserError


SDPA_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")


class ConfigError(UserError):
    """A bad config or command line: one line naming the problem and the fix."""


@dataclass
class TrainConfig:
    """Every knob of a pretraining run. Each field's trailing comment is its --help sentence and a
    comment line above a run of fields names their group (train_config.knob_help reads both)."""

    # What kind of run this config trains, recorded in every checkpoint: a run never resumes as another kind.
    RUN_KIND: ClassVar[str] = "pretraining"
    SCRIPT: ClassVar[str] = "train_llama.py"
    # model
    model: str = "1p7b"  # a preset of model.py: tiny, 124m, 978m or 1p7b
    model_overrides: dict = field(default_factory=dict)  # ModelConfig fields to change (config files only)
    # data
    data_dir: str = "data/edu_fineweb10B"  # the token shards (fineweb_edu.py writes them)
    prepare_local_data: bool = False  # build a small offline corpus into the config's own data_dir if empty
    shuffle: bool = True  # seeded permutation of sequences; False = the reference's file order
    seq_len: int = 1024  # tokens per sequence (the model's context)
    accept_new_data: bool = False  # resume although the shards differ from the checkpoint's
    # batch: tokens per optimizer step; the gradient accumulation follows from the GPU count
    total_batch_tokens: int = 524_288  # tokens per optimizer step, over all GPUs and micro-steps
    micro_batch: int = 16  # sequences per forward on each GPU
    # schedule
    max_steps: int = 38_147  # length of the run in optimizer steps (default: 20.0B tokens)
    warmup_steps: int = 715  # steps of linear warmup to max_lr
    max_lr: float = 6e-4  # learning rate after warmup, decayed by a cosine
    min_lr: float = 6e-5  # learning rate reached at max_steps
    # AdamW
    weight_decay: float = 0.1  # on 2-D weights only
    beta1: float = 0.9  # AdamW's first-moment decay
    beta2: float = 0.95  # AdamW's second-moment decay
    eps: float = 1e-8  # AdamW's epsilon
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 = no clipping
    max_skipped_steps: int = 5  # stop after this many consecutive non-finite steps
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
    start_over: str = ""  # with resume=never in a used out_dir: "archive" or "delete" its checkpoints
    init_from: str = ""  # weights only (our checkpoint or a Hugging Face directory)
    stop_step: int = 0  # save and stop after this step (e.g. to fit a job's time limit)
    verify: str = "full"  # on load: "full" checks every file's sha256, "size" only the sizes
    # system
    device: str = "auto"  # auto = cuda if available, else cpu
    dtype: str = "bfloat16"  # autocast dtype on CUDA; CPU runs in float32
    compile: bool = True  # torch.compile on CUDA (on CPU only when compile_cpu is set)
    compile_cpu: bool = False  # torch.compile on CPU too (slow to start, for tests)
    compile_mode: str = "model"  # "model": one graph; "blocks": each block (half the compile time)
    # parallelism and memory (parallel.py)
    parallel: str = "ddp"  # "ddp": each rank holds the whole model; "fsdp": params, grads, AdamW sharded
    fsdp_shard_size: int = 0  # fsdp: ranks that share one copy; 0 = all; GPUs per node = HSDP across nodes
    reshard_after_forward: bool = True  # fsdp: free each block's gathered params after its forward
    fsdp_reduce_every_micro_step: bool = False  # fsdp: least memory, but accumulation x the reduce traffic
    activation_checkpointing: str = "none"  # "none", "full" (every block) or "selective" (every ac_every-th)
    ac_every: int = 2  # selective activation checkpointing: every N-th block
    sdpa_backend: str = "auto"  # attention kernel: "auto" (SDPA picks per call), "flash", "cudnn", "efficient", "math"
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

    def model_config(self) -> ModelConfig:
        return model_config(self.model, max_seq_len=self.seq_len, **self.model_overrides)

    def validate(self) -> None:
        """ConfigError naming the first knob whose value cannot work, and what would."""
        positive = ("seq_len", "total_batch_tokens", "micro_batch", "max_steps", "max_lr", "eps",
                    "log_interval", "max_skipped_steps")
        at_least_zero = ("warmup_steps", "min_lr", "weight_decay", "grad_clip", "eval_interval",
                         "sample_interval", "sample_tokens", "hellaswag_interval", "hellaswag_limit",
                         "sample_temperature", "save_interval", "keep_last", "stop_step", "peak_tflops", "benchmark")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name}={getattr(self, name)!r} must be positive")
        for name in at_least_zero:
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name}={getattr(self, name)!r} must be 0 or more")
        for name in ("beta1", "beta2"):
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

    def _validate_choices(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype={self.dtype!r}: choose one of {sorted(DTYPES)}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"--device={self.device!r}: choose auto, cpu or cuda")
        if self.verify not in ("full", "size"):
            raise ConfigError(f"--verify={self.verify!r}: choose full (sha256 of every file) or size")
        if self.start_over not in ("", "archive", "delete"):
            raise ConfigError(f"--start_over={self.start_over!r}: choose archive or delete")
        if self.start_over and self.resume != "never":
            raise ConfigError("--start_over only applies with --resume=never")
        if not self.resume:
            raise ConfigError("--resume is empty: use auto, never or a checkpoint path")
        choices = {"parallel": ("ddp", "fsdp"), "compile_mode": ("blocks", "model"),
                   "activation_checkpointing": ("none", "full", "selective"), "sdpa_backend": SDPA_BACKENDS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"--{name}={getattr(self, name)!r}: choose one of {', '.join(allowed)}")
        for name in ("ac_every", "ddp_bucket_mb"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name}={getattr(self, name)!r} must be positive")
        if self.fsdp_shard_size < 0:
            raise ConfigError(f"--fsdp_shard_size={self.fsdp_shard_size} must be 0 (all ranks) or a "
                              f"divisor of the process count")


# Knobs whose change would alter the data order or the model: a resume must not change them.
FIXED_ON_RESUME = ("model", "model_overrides", "seq_len", "total_batch_tokens", "seed", "shuffle")
# Knobs that define the run's length and schedule: changing them on resume is allowed, with a warning.
SCHEDULE_KNOBS = ("max_steps", "warmup_steps", "max_lr", "min_lr", "weight_decay", "beta1",
                  "beta2", "eps", "grad_clip")


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
    refused += [describe(k, saved_train[k], getattr(cfg, k)) for k in FIXED_ON_RESUME
                if saved_train[k] != getattr(cfg, k)]
    allowed = [describe(k, saved_train[k], getattr(cfg, k)) for k in SCHEDULE_KNOBS
               if saved_train[k] != getattr(cfg, k)]
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


# ----------------------------------------------------------------------------- parsing

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
            if kind is int:  # 1e4 and 2.5e5 are fine where they are whole numbers
                try:
                    value = float(text.replace("_", ""))
                    if value.is_integer():
                        return int(value)
                except ValueError:
                    pass
    elif kind is str:
        return text
    raise ConfigError(f"--{name}={text!r}: expected a {kind.__name__} (like --{name}={current!r})")


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
    # when it names the step it is at (train_llama.check_not_finished).
    cfg.command_line = {a[2:].partition("=")[0]: getattr(cfg, a[2:].partition("=")[0]) for a in args}
    return cfg


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
    spec.loader.exec_module(module)
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
            if node.target.id not in fields:  # a ClassVar: its comment is its own, not a group's
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
    for name, (group, sentence) in knob_help(kind).items():
        value = _shown(getattr(cfg, name))
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

    # fine-tuning data
    data: str = "yahma/alpaca-cleaned"  # .json/.jsonl file (alpaca or chat rows) or a hub dataset
    template: str = "vicuna"  # a name in chat_template.TEMPLATES or a .json file of Template's fields
    val_fraction: float = 0.02  # rows held out for validation (fixed split seed)
    overlong: str = "drop"  # examples over seq_len + 1 tokens: "drop" or "truncate"
    pad_multiple: int = 64  # pad batches to a multiple of this: few shapes for torch.compile
    epochs: float = 0.0  # > 0: max_steps = ceil(epochs x train examples / examples per step)
    # overrides of pretraining's defaults: the Alpaca recipe (see configs/sft_1p7b.py); --help shows
    # each under its pretraining group with the sentence written there
    total_batch_tokens: int = 128 * 1024  # 128 examples per step at seq_len 1024
    micro_batch: int = 16
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
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"--val_fraction={self.val_fraction} must be in [0, 1)")
        if self.eval_interval and not self.val_fraction:
            raise ConfigError("--val_fraction=0 leaves no validation examples: set it, or --eval_interval=0")
        if self.overlong not in ("drop", "truncate"):
            raise ConfigError(f"--overlong={self.overlong!r}: choose drop or truncate")
        if self.pad_multiple <= 0:
            raise ConfigError(f"--pad_multiple={self.pad_multiple} must be positive")
        if self.epochs < 0:
            raise ConfigError(f"--epochs={self.epochs} must be 0 (use max_steps) or more")
