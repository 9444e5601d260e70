"""Reading Hugging Face Llama directories and our weights directories, and the names and config
that map our model onto `LlamaForCausalLM`: the library half of export_hf.py, which chat.py,
eval_suite.py, hellaswag.py and train_llama.py (--init_from) use too.

Import reads a Hugging Face Llama directory (single or sharded safetensors) with `safetensors`
alone: no `transformers`, no pickle. Our RoPE uses Hugging Face's rotate-half convention, so wq/wk
are copied unpermuted. It reads exactly the files the directory names: `model.safetensors`, or the
shards that `model.safetensors.index.json` lists, each holding exactly the tensors the index puts
in it; anything else is refused as a leftover of another save (see _weight_files).

Every entry point that takes a Hugging Face directory calls check_vocabulary first: our tokenizer,
data and scripts speak GPT-2's token ids, so a model with another vocabulary is refused in one line
rather than padded and fed ids it never learned.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from model import ModelConfig, Transformer, build_model

from .tokenizer import EOT, N_VOCAB, vocab_file
from .utils import UserError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Tokenizer files whose vocabulary check_vocabulary compares with GPT-2's, in the order looked at.
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")



class HFDirError(UserError, ValueError):
    """A Hugging Face or weights directory that cannot be read as our model: one line naming the file
    (a ValueError too, as it was before it had a type of its own)."""


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
        raise HFDirError(
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



# ----------------------------------------------------------------------------- import

# What a Llama config.json must give; everything else has Hugging Face's default.
_REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "max_position_embeddings")


def config_from_hf(config: dict, vocab_size: int | None = None, where: str = "config.json") -> ModelConfig:
    """Our `ModelConfig` for a Hugging Face Llama `config.json` (as a dict; `where` names it in
    errors); HFDirError for a missing or bad key and for the Llama variants our model lacks."""
    if not isinstance(config, dict) or "model_type" not in config:
        raise HFDirError(f"{where} has no 'model_type' key: not a Hugging Face model config "
                         f"(a Llama's says \"model_type\": \"llama\")")
    if config["model_type"] != "llama":
        raise HFDirError(f"model_type={config['model_type']!r}: only 'llama' checkpoints can be imported")
    missing = [key for key in _REQUIRED_KEYS if key not in config]
    if missing:
        raise HFDirError(f"{where} lacks the key {missing[0]!r}" + (f" (and {missing[1:]})" if missing[1:] else "")
                         + ": a Llama config.json has it; re-save the model with save_pretrained")
    for key in _REQUIRED_KEYS:
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise HFDirError(f"{where}: {key}={value!r} must be a positive integer")
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
            raise HFDirError(f"{what}={got!r} is not supported (our model has {what}={ours!r})")
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
        raise HFDirError(f"{where}: {e}") from None


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise HFDirError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}): re-save or re-download it") from None


def _load_safetensors(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file; HFDirError naming it if it is truncated or corrupt."""
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as e:
        raise HFDirError(f"{path} is not a readable safetensors file ({e}): truncated or corrupt; "
                         f"copy or export it again") from None


def _weight_files(hf_dir: Path) -> dict[str, set[str] | None]:
    """The safetensors files to read -> the tensor names the index puts in each (None for a
    single, unindexed model.safetensors). Every other *.safetensors file is an error: it belongs to
    another save, and reading it (or ignoring the index) could mix two checkpoints silently."""
    present = sorted(p.name for p in hf_dir.glob("*.safetensors"))
    index = hf_dir / INDEX_FILE
    if index.is_file():
        if SINGLE_FILE in present:
            raise HFDirError(f"{hf_dir} holds both {SINGLE_FILE} and {INDEX_FILE}, so one is left over "
                             f"from another save: remove the stale one")
        weight_map = _read_json(index)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise HFDirError(f"{index} has no 'weight_map' of tensor name -> file name")
        expected: dict[str, set[str]] = {}
        for tensor, file in weight_map.items():
            if os.path.basename(file) != file:
                raise HFDirError(f"{index} puts {tensor} in {file!r}, not a file of {hf_dir}")
            expected.setdefault(file, set()).add(tensor)
        for file in expected:
            if not (hf_dir / file).is_file():
                raise FileNotFoundError(f"{index} lists {file}, which is not in {hf_dir}: copy it there")
        stray = [name for name in present if name not in expected]
        if stray:
            raise HFDirError(f"{hf_dir / stray[0]} is not listed in {INDEX_FILE} (left over from "
                             f"another save?): remove it")
        return expected
    if not present:
        raise FileNotFoundError(
            f"no *.safetensors in {hf_dir}; pickled .bin checkpoints are not loaded (they can run "
            f"code): convert with `LlamaForCausalLM.from_pretrained(dir).save_pretrained(new_dir)`"
        )
    stray = [name for name in present if name != SINGLE_FILE]
    if stray:
        raise HFDirError(f"{hf_dir} holds {stray[0]} but no {INDEX_FILE} saying what it holds"
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
                    raise HFDirError(f"{hf_dir / file} {problem} {names[0]}{more}, against what "
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
            raise HFDirError(f"{key} missing from {hf_dir}: not a LlamaForCausalLM checkpoint?")
        tensor = hf_state.pop(key).to(device=device, dtype=dtype)
        if name in _VOCAB_ROWS and tensor.size(0) < vocab_size:
            pad = tensor.new_zeros(vocab_size - tensor.size(0), tensor.size(1))
            tensor = torch.cat([tensor, pad])
        if tensor.shape != shape:
            raise HFDirError(f"{key} has shape {tuple(tensor.shape)}, {config_path} implies {tuple(shape)}")
        state[name] = tensor
    # rotary_emb.inv_freq appears in some older checkpoints; it is a function of the config.
    leftover = [k for k in hf_state if not k.endswith("rotary_emb.inv_freq")]
    if leftover:
        raise HFDirError(f"{len(leftover)} unexpected tensors in {hf_dir}, e.g. {leftover[0]}")
    return build_model(cfg, device, state_dict=state)



# ----------------------------------------------------------------------------- our weights


def load_weights(weights_dir: str | Path, device: str | torch.device = "cpu") -> Transformer:
    """The model export_hf.save_weights wrote; HFDirError naming the file that is bad."""
    config_path, weights_path = Path(weights_dir) / "model_config.json", Path(weights_dir) / SINGLE_FILE
    fields = _read_json(config_path)
    try:
        cfg = ModelConfig(**fields)
    except (TypeError, ValueError) as e:  # not a dict, a key ModelConfig lacks, or a bad value
        raise HFDirError(f"{config_path} is not a valid ModelConfig ({e})") from None
    state = _load_safetensors(weights_path, device)
    try:
        return build_model(cfg, device, state_dict=state)
    except RuntimeError as e:  # load_state_dict: missing, unexpected or mis-shaped tensors
        raise HFDirError(f"{weights_path} does not fit {config_path}: {str(e).strip().splitlines()[-1].strip()}") from None



# ----------------------------------------------------------------------------- vocabulary


def check_vocabulary(hf_dir: str | Path) -> None:
    """HFDirError unless the Hugging Face directory's model speaks GPT-2's token ids: config.json's
    vocab_size holds GPT-2's 50257 tokens and its tokenizer files, if any, map every token to
    GPT-2's id. Our tokenizer, shards, chat template and evaluations all produce GPT-2 ids: a model
    with another vocabulary would be padded and fed ids it never learned, and answer garbage."""
    hf_dir = Path(hf_dir)
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: pass a Hugging Face model directory")
    config = _read_json(config_path)
    # Any causal LM (eval_suite.py and hellaswag.py take more than Llamas); a config without a
    # vocab_size is left to the loader, which names what is missing.
    vocab_size = config.get("vocab_size") if isinstance(config, dict) else None
    if isinstance(vocab_size, int) and vocab_size < N_VOCAB:
        raise HFDirError(
            f"{hf_dir} has vocab_size={vocab_size!r}, not GPT-2's {N_VOCAB} tokens: this repo's tokenizer, data "
            f"and scripts use GPT-2's token ids, so the model would read ids it never learned; use a model "
            f"trained with the GPT-2 tokenizer (vocab_size >= {N_VOCAB})")
    for name in _TOKENIZER_FILES:
        if (hf_dir / name).is_file():
            _check_tokenizer_file(hf_dir / name)
            return


def _check_tokenizer_file(path: Path) -> None:
    tokens = _read_json(path)
    if path.name == "tokenizer.json":
        tokens = (tokens.get("model") or {}).get("vocab") if isinstance(tokens, dict) else None
    if not isinstance(tokens, dict):
        return  # a tokenizer kind without a token -> id table (e.g. a Unigram list): vocab_size decided
    gpt2 = json.loads(vocab_file("encoder.json").read_text(encoding="utf-8"))
    differ = [t for t, i in gpt2.items() if tokens.get(t) != i]
    if differ:
        raise HFDirError(
            f"{path} maps {len(differ):,} of GPT-2's {len(gpt2):,} tokens to other ids (e.g. {differ[0]!r}: "
            f"{tokens.get(differ[0])!r}, GPT-2 {gpt2[differ[0]]}): the model was trained with another tokenizer, "
            f"and this repo's tokenizer, data and scripts use GPT-2's ids; use a model trained with GPT-2's")
