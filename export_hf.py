"""Our checkpoints <-> Hugging Face `LlamaForCausalLM` directories.

Export writes what `LlamaForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` read:
`model.safetensors`, `config.json`, `generation_config.json` and GPT-2 tokenizer files built from
the same local vocabulary files as `tokenizer.py` (nothing is downloaded). Import reads a Hugging
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

    python export_hf.py --checkpoint out/llama_1p7b/step_0001000 --out hf_out --dtype bfloat16
    python export_hf.py --from_hf path/to/DMaS-LLaMa-Lite --out out/imported
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model import ModelConfig, Transformer, rope_table
from tokenizer import EOT, N_VOCAB, vocab_file

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

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


def save_tokenizer(out_dir: str, model_max_length: int = 1024) -> None:
    """GPT-2 tokenizer files that `AutoTokenizer.from_pretrained(out_dir)` loads, built from the
    local, sha256-checked `encoder.json` and `vocab.bpe` (needs `transformers`, not the network)."""
    from transformers import GPT2TokenizerFast

    # Positional on purpose: transformers 4.x names them vocab_file/merges_file, 5.x vocab/merges.
    tok = GPT2TokenizerFast(
        str(vocab_file("encoder.json")), str(vocab_file("vocab.bpe")), model_max_length=model_max_length
    )
    tok.save_pretrained(out_dir)


def save_hf(
    model: Transformer, out_dir: str, vocab_size: int | None = None, dtype: torch.dtype = torch.float32
) -> None:
    """Write `model` as a Hugging Face Llama directory: model.safetensors, config.json,
    generation_config.json and the tokenizer files."""
    os.makedirs(out_dir, exist_ok=True)
    hf_state = to_hf_state_dict(model, vocab_size)
    state = {k: v.to(device="cpu", dtype=dtype).contiguous() for k, v in hf_state.items()}
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    config = hf_config(model.config, vocab_size, dtype)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        # pad = EOT: GPT-2 has no pad token, and without one generate() warns on every call.
        eot = config["eos_token_id"]
        json.dump({"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot}, f, indent=2)
    save_tokenizer(out_dir, model_max_length=model.config.max_seq_len)


def config_from_hf(config: dict, vocab_size: int | None = None) -> ModelConfig:
    """Our `ModelConfig` for a Hugging Face Llama `config.json` (as a dict); ValueError for the
    Llama variants our model does not implement."""
    if config.get("model_type") != "llama":
        raise ValueError(f"model_type={config.get('model_type')!r}: only 'llama' checkpoints can be imported")
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
    return ModelConfig(
        vocab_size=vocab_size or config["vocab_size"],
        n_layers=config["num_hidden_layers"],
        dim=config["hidden_size"],
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads,
        ffn_dim=config["intermediate_size"],
        max_seq_len=config["max_position_embeddings"],
        rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
        norm_eps=config.get("rms_norm_eps", 1e-6),
        init_std=config.get("initializer_range", 0.02),
    )


def _read_safetensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in hf_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors in {hf_dir}; pickled .bin checkpoints are not loaded (they can run "
            f"code): convert with `LlamaForCausalLM.from_pretrained(dir).save_pretrained(new_dir)`"
        )
    state = {}
    for name in files:
        with safe_open(str(hf_dir / name), framework="pt") as f:
            for key in f.keys():
                state[key] = f.get_tensor(key)
    return state


def load_hf(
    hf_dir: str, device: str | torch.device = "cpu", pad_vocab_to: int | None = 50304,
    dtype: torch.dtype | None = torch.float32,
) -> Transformer:
    """Our `Transformer` from a Hugging Face Llama directory, its vocabulary padded with zero rows
    up to `pad_vocab_to` (None, or a vocabulary already as large, keeps it as is); weights cast
    to `dtype` (None keeps the file's)."""
    hf_dir = Path(hf_dir)
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: point --from_hf at a Hugging Face model directory")
    hf_cfg = json.loads(config_path.read_text())
    vocab_size = max(hf_cfg["vocab_size"], pad_vocab_to or 0)
    cfg = config_from_hf(hf_cfg, vocab_size)
    hf_state = _read_safetensors(hf_dir)
    if "lm_head.weight" not in hf_state and hf_cfg.get("tie_word_embeddings"):
        # Our output head is untied: give it its own copy, or both parameters share one storage.
        hf_state["lm_head.weight"] = hf_state["model.embed_tokens.weight"].clone()

    with torch.device("meta"):
        model = Transformer(cfg)
    state = {}
    for name, param in model.state_dict().items():
        key = hf_name(name)
        if key not in hf_state:
            raise ValueError(f"{key} missing from {hf_dir}: not a LlamaForCausalLM checkpoint?")
        tensor = hf_state.pop(key).to(device=device, dtype=dtype)
        if name in _VOCAB_ROWS and tensor.size(0) < vocab_size:
            pad = tensor.new_zeros(vocab_size - tensor.size(0), tensor.size(1))
            tensor = torch.cat([tensor, pad])
        if tensor.shape != param.shape:
            raise ValueError(
                f"{key} has shape {tuple(tensor.shape)}, config.json implies {tuple(param.shape)}"
            )
        state[name] = tensor
    # rotary_emb.inv_freq appears in some older checkpoints; it is a function of the config.
    leftover = [k for k in hf_state if not k.endswith("rotary_emb.inv_freq")]
    if leftover:
        raise ValueError(f"{len(leftover)} unexpected tensors in {hf_dir}, e.g. {leftover[0]}")
    model.load_state_dict(state, assign=True)
    # The RoPE table is a non-persistent buffer, still on meta: compute it where the weights are.
    model.rope = rope_table(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta).to(device)
    return model


def save_weights(model: Transformer, out_dir: str) -> None:
    """Our model's weights (our names, model.safetensors) and its config (model_config.json):
    what `--from_hf` writes and `--checkpoint` also reads, to start a run from imported weights."""
    os.makedirs(out_dir, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "model_config.json"), "w") as f:
        json.dump(model.config.to_dict(), f, indent=2)


def load_weights(weights_dir: str, device: str | torch.device = "cpu") -> Transformer:
    """The model `save_weights` wrote."""
    cfg = ModelConfig(**json.loads((Path(weights_dir) / "model_config.json").read_text()))
    with torch.device("meta"):
        model = Transformer(cfg)
    state = load_file(os.path.join(weights_dir, "model.safetensors"), device=str(device))
    model.load_state_dict(state, assign=True)
    model.rope = rope_table(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta).to(device)
    return model


def _load_checkpoint(path: str, device: str) -> Transformer:
    if (Path(path) / "model_config.json").is_file():
        return load_weights(path, device)
    try:
        import checkpoint  # a training checkpoint directory (meta.json + DCP)
    except ImportError as e:
        raise SystemExit(f"export_hf: cannot read training checkpoints, checkpoint.py failed to import ({e})")
    try:
        return checkpoint.load_model(path, device)
    except checkpoint.CheckpointError as e:
        raise SystemExit(f"export_hf: {e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint",
                        help="our checkpoint directory (or one written by --from_hf) to export")
    source.add_argument("--from_hf", help="a Hugging Face Llama directory to import into our format")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="export: dtype of the saved weights; import: dtype of our weights")
    parser.add_argument("--vocab_size", type=int, default=None,
                        help=f"export: keep only the first N vocabulary rows ({N_VOCAB} = GPT-2's real "
                             "tokens); default keeps all")
    parser.add_argument("--pad_vocab_to", type=int, default=50304,
                        help="import: pad the vocabulary with zero rows to this size (0 keeps it)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    dtype = DTYPES[args.dtype]
    try:
        if args.checkpoint:
            model = _load_checkpoint(args.checkpoint, args.device)
            save_hf(model, args.out, vocab_size=args.vocab_size, dtype=dtype)
            print(f"exported {model.num_params():,} parameters from {args.checkpoint} to {args.out}")
        else:
            model = load_hf(args.from_hf, args.device, pad_vocab_to=args.pad_vocab_to or None, dtype=dtype)
            save_weights(model, args.out)
            print(f"imported {model.num_params():,} parameters (vocab {model.config.vocab_size}) "
                  f"from {args.from_hf} to {args.out}")
    except (OSError, ValueError) as e:  # bad paths or unsupported checkpoints: the message says which
        raise SystemExit(f"export_hf: {e}")


if __name__ == "__main__":
    main()
