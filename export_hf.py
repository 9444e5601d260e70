"""Our checkpoints <-> Hugging Face `LlamaForCausalLM` directories.

Export writes what `LlamaForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` read:
`model.safetensors`, `config.json`, `generation_config.json` and GPT-2 tokenizer files built from
the same local vocabulary files as `tokenizer.py` (nothing is downloaded); a model fine-tuned by
finetune.py gets its chat template too (`tokenizer.apply_chat_template(messages,
add_generation_prompt=True)` then builds finetune.py's prompt tokens). Import reads a Hugging
Face Llama directory (single or sharded safetensors) with `safetensors` alone: no `transformers`,
no pickle. Our RoPE uses Hugging Face's rotate-half convention, so wq/wk are copied unpermuted.

The vocabulary: GPT-2 has 50257 tokens, our model pads to 50304 for faster matmuls.
- Export keeps all rows unless asked (`vocab_size=50257` / `--vocab_size 50257`): the real
  tokens' logits are identical either way; slicing only drops the padding tokens, which training
  never targets, from the softmax.
- Import pads to `pad_vocab_to` (50304) with zero rows. Zero embedding rows are never read (no
  GPT-2 id reaches them). Zero output rows give the padding tokens a logit of exactly 0: the real
  tokens' logits are unchanged, but the softmax now includes 47 extra terms of e^0 (negligible
  when the best real logit is large, as in a trained model) and a padding token can win the
  argmax when every real logit is negative. That is the right start for continued training
  (the first steps push those logits down, as in training from scratch); to evaluate an imported
  checkpoint exactly, import with `pad_vocab_to=None` to keep its own vocabulary.

The output directory (`--out`, both directions) is written whole or not at all: the files go to a
hidden sibling directory that replaces `--out` only when complete (an atomic swap on Linux), so a
crash leaves the previous export, and no file of an earlier export survives next to the new one.
Every output carries `export_info.json` (what was exported, from where, in which dtype). An
existing `--out` is replaced when it is empty or holds that file; any other non-empty directory is
refused unless `--force`. The output is checked before the checkpoint is read.

Import reads exactly the files the directory names: `model.safetensors`, or the shards that
`model.safetensors.index.json` lists, each holding exactly the tensors the index puts in it. Both
a single file and an index, a `*.safetensors` file the index does not list, or shards without an
index are refused as leftovers of another save rather than silently chosen between. A missing
`config.json` key or an unreadable (truncated) file is one line naming it.

    python export_hf.py --checkpoint out/llama_1p7b/step_0001000 --out hf_out --dtype bfloat16
    python export_hf.py --from_hf path/to/DMaS-LLaMa-Lite --out out/imported
    python export_hf.py --checkpoint out/llama_1p7b --out some_dir --force   # replace a foreign dir
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import errno
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model import ModelConfig, Transformer, build_model
from tokenizer import EOT, N_VOCAB, vocab_file
from utils import DTYPES, UserError, cli_errors, fsync_dir

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
EXPORT_INFO = "export_info.json"  # written last into every output: "this directory is an export"
_WRITTEN_BY = "export_hf.py"

# our name (after "layers.{i}.") -> Hugging Face name (after "model.layers.{i}.")
_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_VOCAB_ROWS = ("tok_embeddings.weight", "output.weight")  # the tensors with one row per token


def hf_name(name: str) -> str:
    """Hugging Face's name for one of our parameter names."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    prefix, i, rest = name.split(".", 2)
    if prefix != "layers" or rest not in _LAYER_NAMES:
        raise KeyError(f"no Hugging Face name for parameter {name!r}")
    return f"model.layers.{i}.{_LAYER_NAMES[rest]}"


def _check_vocab_size(cfg: ModelConfig, vocab_size: int | None) -> int:
    vocab_size = vocab_size or cfg.vocab_size
    if not 0 < vocab_size <= cfg.vocab_size:
        raise ValueError(
            f"vocab_size={vocab_size} must be in [1, {cfg.vocab_size}] (the model's vocab_size); "
            f"use {N_VOCAB} to keep GPT-2's real tokens only"
        )
    return vocab_size


def to_hf_state_dict(model: Transformer, vocab_size: int | None = None) -> dict[str, torch.Tensor]:
    """Our weights under Hugging Face Llama names, the vocabulary rows sliced to `vocab_size`
    (None keeps all of the model's rows). Tensors keep their dtype and device."""
    vocab_size = _check_vocab_size(model.config, vocab_size)
    out = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach()
        if name in _VOCAB_ROWS:
            tensor = tensor[:vocab_size]
        out[hf_name(name)] = tensor
    return out


def hf_config(cfg: ModelConfig, vocab_size: int | None = None, dtype: torch.dtype = torch.float32) -> dict:
    """`config.json` of the `LlamaForCausalLM` equivalent to `cfg`."""
    vocab_size = _check_vocab_size(cfg, vocab_size)
    dtype_name = str(dtype).removeprefix("torch.")
    eot = EOT if vocab_size > EOT else None  # a small test vocabulary has no <|endoftext|>
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        # transformers 4.x reads rope_theta, 5.x reads rope_parameters: write both.
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": cfg.init_std,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "torch_dtype": dtype_name,
    }


# ----------------------------------------------------------------------------- output directory


def export_info(path: str | Path) -> dict | None:
    """The EXPORT_INFO of a directory this module wrote, else None."""
    try:
        info = json.loads((Path(path) / EXPORT_INFO).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("written_by") == _WRITTEN_BY else None


def check_output_dir(out: str | Path, force: bool = False, source: str | Path | None = None) -> Path:
    """`out` as a Path if an export may replace it: absent, empty, an earlier export (it holds
    EXPORT_INFO), or any directory with `force`. UserError otherwise, and for the `source` itself
    or a directory holding it: called before the checkpoint is read, so a bad --out costs nothing."""
    out = Path(out)
    if source is not None:
        src, dst = Path(source).resolve(), out.resolve()
        if dst == src or dst in src.parents:
            raise UserError(f"--out {out} would replace the source {source}: choose another output directory")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UserError(f"output {out} exists and is not a directory: remove it or choose another directory")
    if out.is_dir() and not force and export_info(out) is None and any(out.iterdir()):
        raise UserError(
            f"output directory {out} is not empty and holds no {EXPORT_INFO} (it is not an earlier "
            f"export): choose another directory, or pass --force (force=True) to replace it"
        )
    return out


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # old kernel, or the filesystem lacks it
        return False
    raise OSError(err, os.strerror(err), str(b))


def _move_into_place(tmp: Path, out: Path) -> None:
    """Make the complete directory `tmp` be `out`, replacing what was there."""
    if not out.exists():
        os.rename(tmp, out)
    else:
        if _exchange(tmp, out):
            old = tmp  # now holds the previous export
        else:
            # Two renames: a crash between them leaves both complete directories as hidden siblings.
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except OSError:
                os.rename(old, out)
                raise
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(out.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _writing(out: str | Path, force: bool, info: dict) -> Iterator[Path]:
    """A fresh sibling directory of `out` to write into: when the block completes it gets
    EXPORT_INFO (with `info` and its file list) and replaces `out` whole; if the block fails it is
    deleted and `out` is untouched."""
    out = check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")  # same filesystem: the rename is atomic
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        files = sorted(p.name for p in tmp.iterdir())
        info = {"written_by": _WRITTEN_BY, **info, "files": files + [EXPORT_INFO]}
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
        mode = 0o666 & ~_umask()  # safetensors writes 0600: every file gets what a plain open() gives
        for path in tmp.iterdir():  # durable before the rename makes them the export
            if path.is_file():
                os.chmod(path, mode)
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        fsync_dir(tmp)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------- export


def save_tokenizer(out_dir: str | Path, model_max_length: int = 1024, chat_template: str | None = None) -> None:
    """GPT-2 tokenizer files that `AutoTokenizer.from_pretrained(out_dir)` loads, built from the
    local, sha256-checked `encoder.json` and `vocab.bpe` (needs `transformers`, not the network);
    with `chat_template` (Jinja, finetune.Template.jinja()) for `apply_chat_template`."""
    from transformers import GPT2TokenizerFast

    # Positional on purpose: transformers 4.x names them vocab_file/merges_file, 5.x vocab/merges.
    tok = GPT2TokenizerFast(
        str(vocab_file("encoder.json")), str(vocab_file("vocab.bpe")), model_max_length=model_max_length
    )
    tok.chat_template = chat_template
    tok.save_pretrained(str(out_dir))
    if chat_template is not None:
        # Recent transformers write chat_template.jinja; older ones read tokenizer_config.json only.
        config_path = Path(out_dir) / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config["chat_template"] = chat_template
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


# Keywords with defaults, one per export option of the CLI.
def save_hf(
    model: Transformer, out_dir: str | Path, vocab_size: int | None = None,
    dtype: torch.dtype = torch.float32, force: bool = False, source: str | None = None,
    chat_template: str | None = None,
) -> None:
    """Write `model` as a Hugging Face Llama directory (model.safetensors, config.json,
    generation_config.json, the tokenizer files, EXPORT_INFO), replacing `out_dir` whole when
    complete; see check_output_dir for what may be replaced. `source` is recorded in EXPORT_INFO;
    `chat_template` (Jinja) goes to the tokenizer files."""
    config = hf_config(model.config, vocab_size, dtype)
    info = {"format": "hf_llama", "source": source, "dtype": config["torch_dtype"],
            "vocab_size": config["vocab_size"], "model_config": model.config.to_dict()}
    with _writing(out_dir, force, info) as tmp:
        hf_state = to_hf_state_dict(model, vocab_size)
        state = {k: v.to(device="cpu", dtype=dtype).contiguous() for k, v in hf_state.items()}
        save_file(state, str(tmp / SINGLE_FILE), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        # pad = EOT: GPT-2 has no pad token, and without one generate() warns on every call.
        eot = config["eos_token_id"]
        generation = {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
        save_tokenizer(tmp, model_max_length=model.config.max_seq_len, chat_template=chat_template)


# ----------------------------------------------------------------------------- import

# What a Llama config.json must give; everything else has Hugging Face's default.
_REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "max_position_embeddings")


def config_from_hf(config: dict, vocab_size: int | None = None, where: str = "config.json") -> ModelConfig:
    """Our `ModelConfig` for a Hugging Face Llama `config.json` (as a dict; `where` names it in
    errors); ValueError for a missing or bad key and for the Llama variants our model lacks."""
    if not isinstance(config, dict) or "model_type" not in config:
        raise ValueError(f"{where} has no 'model_type' key: not a Hugging Face model config "
                         f"(a Llama's says \"model_type\": \"llama\")")
    if config["model_type"] != "llama":
        raise ValueError(f"model_type={config['model_type']!r}: only 'llama' checkpoints can be imported")
    missing = [key for key in _REQUIRED_KEYS if key not in config]
    if missing:
        raise ValueError(f"{where} lacks the key {missing[0]!r}" + (f" (and {missing[1:]})" if missing[1:] else "")
                         + ": a Llama config.json has it; re-save the model with save_pretrained")
    for key in _REQUIRED_KEYS:
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}: {key}={value!r} must be a positive integer")
    n_heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_heads
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    unsupported = {
        "hidden_act": (config.get("hidden_act", "silu"), "silu"),
        "attention_bias": (config.get("attention_bias", False), False),
        "mlp_bias": (config.get("mlp_bias", False), False),
        "rope type": (rope_type, "default"),
        "head_dim": (head_dim, config["hidden_size"] // n_heads),
    }
    for what, (got, ours) in unsupported.items():
        if got != ours:
            raise ValueError(f"{what}={got!r} is not supported (our model has {what}={ours!r})")
    try:
        return ModelConfig(
            vocab_size=vocab_size or config["vocab_size"],
            n_layers=config["num_hidden_layers"],
            dim=config["hidden_size"],
            n_heads=n_heads,
            n_kv_heads=config.get("num_key_value_heads") or n_heads,
            ffn_dim=config["intermediate_size"],
            max_seq_len=config["max_position_embeddings"],
            rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            init_std=float(config.get("initializer_range", 0.02)),
        )
    except (TypeError, ValueError) as e:  # a value of the wrong type, or shapes that do not fit
        raise ValueError(f"{where}: {e}") from None


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}): re-save or re-download it") from None


def _load_safetensors(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file; ValueError naming it if it is truncated or corrupt."""
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}): truncated or corrupt; "
                         f"copy or export it again") from None


def _weight_files(hf_dir: Path) -> dict[str, set[str] | None]:
    """The safetensors files to read -> the tensor names the index puts in each (None for a
    single, unindexed model.safetensors). Every other *.safetensors file is an error: it belongs to
    another save, and reading it (or ignoring the index) could mix two checkpoints silently."""
    present = sorted(p.name for p in hf_dir.glob("*.safetensors"))
    index = hf_dir / INDEX_FILE
    if index.is_file():
        if SINGLE_FILE in present:
            raise ValueError(f"{hf_dir} holds both {SINGLE_FILE} and {INDEX_FILE}, so one is left over "
                             f"from another save: remove the stale one")
        weight_map = _read_json(index)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index} has no 'weight_map' of tensor name -> file name")
        expected: dict[str, set[str]] = {}
        for tensor, file in weight_map.items():
            if os.path.basename(file) != file:
                raise ValueError(f"{index} puts {tensor} in {file!r}, not a file of {hf_dir}")
            expected.setdefault(file, set()).add(tensor)
        for file in expected:
            if not (hf_dir / file).is_file():
                raise FileNotFoundError(f"{index} lists {file}, which is not in {hf_dir}: copy it there")
        stray = [name for name in present if name not in expected]
        if stray:
            raise ValueError(f"{hf_dir / stray[0]} is not listed in {INDEX_FILE} (left over from "
                             f"another save?): remove it")
        return expected
    if not present:
        raise FileNotFoundError(
            f"no *.safetensors in {hf_dir}; pickled .bin checkpoints are not loaded (they can run "
            f"code): convert with `LlamaForCausalLM.from_pretrained(dir).save_pretrained(new_dir)`"
        )
    stray = [name for name in present if name != SINGLE_FILE]
    if stray:
        raise ValueError(f"{hf_dir} holds {stray[0]} but no {INDEX_FILE} saying what it holds"
                         f"{' beside ' + SINGLE_FILE if SINGLE_FILE in present else ''}: restore the "
                         f"index, or remove the files that are left over from another save")
    return {SINGLE_FILE: None}


def _read_safetensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    """The tensors of the files `_weight_files` names, each file holding exactly what its index says."""
    state = {}
    for file, expected in _weight_files(hf_dir).items():
        tensors = _load_safetensors(hf_dir / file)
        if expected is not None:
            for names, problem in ((sorted(expected - tensors.keys()), "lacks"),
                                   (sorted(tensors.keys() - expected), "holds")):
                if names:
                    more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
                    raise ValueError(f"{hf_dir / file} {problem} {names[0]}{more}, against what "
                                     f"{INDEX_FILE} says: the index and the shards come from different saves")
        state.update(tensors)
    return state


def load_hf(
    hf_dir: str | Path, device: str | torch.device = "cpu", pad_vocab_to: int | None = 50304,
    dtype: torch.dtype | None = torch.float32,
) -> Transformer:
    """Our `Transformer` from a Hugging Face Llama directory, its vocabulary padded with zero rows
    up to `pad_vocab_to` (None, or a vocabulary already as large, keeps it as is); weights cast
    to `dtype` (None keeps the file's). Reads exactly the files config.json and the index name."""
    hf_dir = Path(hf_dir)
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: point --from_hf at a Hugging Face model directory")
    hf_cfg = _read_json(config_path)
    cfg = config_from_hf(hf_cfg, where=str(config_path))
    vocab_size = max(cfg.vocab_size, pad_vocab_to or 0)
    cfg = dataclasses.replace(cfg, vocab_size=vocab_size)
    hf_state = _read_safetensors(hf_dir)
    if "lm_head.weight" not in hf_state and hf_cfg.get("tie_word_embeddings") and "model.embed_tokens.weight" in hf_state:
        # Our output head is untied: give it its own copy, or both parameters share one storage.
        hf_state["lm_head.weight"] = hf_state["model.embed_tokens.weight"].clone()

    with torch.device("meta"):
        shapes = {name: p.shape for name, p in Transformer(cfg).state_dict().items()}
    state = {}
    for name, shape in shapes.items():
        key = hf_name(name)
        if key not in hf_state:
            raise ValueError(f"{key} missing from {hf_dir}: not a LlamaForCausalLM checkpoint?")
        tensor = hf_state.pop(key).to(device=device, dtype=dtype)
        if name in _VOCAB_ROWS and tensor.size(0) < vocab_size:
            pad = tensor.new_zeros(vocab_size - tensor.size(0), tensor.size(1))
            tensor = torch.cat([tensor, pad])
        if tensor.shape != shape:
            raise ValueError(f"{key} has shape {tuple(tensor.shape)}, {config_path} implies {tuple(shape)}")
        state[name] = tensor
    # rotary_emb.inv_freq appears in some older checkpoints; it is a function of the config.
    leftover = [k for k in hf_state if not k.endswith("rotary_emb.inv_freq")]
    if leftover:
        raise ValueError(f"{len(leftover)} unexpected tensors in {hf_dir}, e.g. {leftover[0]}")
    return build_model(cfg, device, state_dict=state)


# ----------------------------------------------------------------------------- our weights


def save_weights(model: Transformer, out_dir: str | Path, force: bool = False, source: str | None = None) -> None:
    """Our model's weights (our names, model.safetensors) and its config (model_config.json):
    what `--from_hf` writes and `--checkpoint` also reads, to start a run from imported weights.
    `out_dir` is replaced whole when complete, as by save_hf."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in state.values()})
    info = {"format": "ours", "source": source, "dtype": ",".join(dtypes),
            "vocab_size": model.config.vocab_size, "model_config": model.config.to_dict()}
    with _writing(out_dir, force, info) as tmp:
        save_file(state, str(tmp / SINGLE_FILE), metadata={"format": "pt"})
        (tmp / "model_config.json").write_text(json.dumps(model.config.to_dict(), indent=2))


def load_weights(weights_dir: str | Path, device: str | torch.device = "cpu") -> Transformer:
    """The model `save_weights` wrote; ValueError naming the file that is bad."""
    config_path, weights_path = Path(weights_dir) / "model_config.json", Path(weights_dir) / SINGLE_FILE
    fields = _read_json(config_path)
    try:
        cfg = ModelConfig(**fields)
    except (TypeError, ValueError) as e:  # not a dict, a key ModelConfig lacks, or a bad value
        raise ValueError(f"{config_path} is not a valid ModelConfig ({e})") from None
    state = _load_safetensors(weights_path, device)
    try:
        return build_model(cfg, device, state_dict=state)
    except RuntimeError as e:  # load_state_dict: missing, unexpected or mis-shaped tensors
        raise ValueError(f"{weights_path} does not fit {config_path}: {str(e).strip().splitlines()[-1].strip()}") from None


def _load_checkpoint(path: str, device: str) -> Transformer:
    if (Path(path) / "model_config.json").is_file():
        return load_weights(path, device)
    import checkpoint  # a training checkpoint directory (meta.json + DCP); heavier imports

    try:
        return checkpoint.load_model(path, device)
    except checkpoint.CheckpointError as e:
        raise UserError(str(e)) from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint",
                        help="our checkpoint directory (or one written by --from_hf) to export")
    source.add_argument("--from_hf", help="a Hugging Face Llama directory to import into our format")
    parser.add_argument("--out", required=True,
                        help="output directory, replaced whole when complete (if it exists: empty or an earlier export)")
    parser.add_argument("--force", action="store_true",
                        help=f"replace --out even if it is a non-empty directory without {EXPORT_INFO}")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="export: dtype of the saved weights; import: dtype of our weights")
    parser.add_argument("--vocab_size", type=int, default=None,
                        help=f"export: keep only the first N vocabulary rows ({N_VOCAB} = GPT-2's real "
                             "tokens); default keeps all")
    parser.add_argument("--pad_vocab_to", type=int, default=50304,
                        help="import: pad the vocabulary with zero rows to this size (0 keeps it)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    with cli_errors("export_hf.py"):
        dtype = DTYPES[args.dtype]
        source_dir = args.checkpoint or args.from_hf
        check_output_dir(args.out, args.force, source_dir)  # before the checkpoint is read: fail fast
        if args.checkpoint:
            model = _load_checkpoint(args.checkpoint, args.device)
            from finetune import checkpoint_template  # noqa: PLC0415 - the template finetune.py recorded

            template = checkpoint_template(args.checkpoint)
            save_hf(model, args.out, vocab_size=args.vocab_size, dtype=dtype, force=args.force, source=source_dir,
                    chat_template=template.jinja() if template else None)
            print(f"exported {model.num_params():,} parameters from {args.checkpoint} to {args.out}"
                  + (f" with the {template.name} chat template" if template else ""))
        else:
            model = load_hf(args.from_hf, args.device, pad_vocab_to=args.pad_vocab_to or None, dtype=dtype)
            save_weights(model, args.out, force=args.force, source=source_dir)
            print(f"imported {model.num_params():,} parameters (vocab {model.config.vocab_size}) "
                  f"from {args.from_hf} to {args.out}")


if __name__ == "__main__":
    main()
