"""LoRA adapters on our Transformer, through PEFT: attach, freeze the base, merge, and the PEFT
adapter format under Hugging Face Llama names.

`attach(model, spec)` replaces the targeted nn.Linear layers in place with PEFT's LoRA layers
(`peft.inject_adapter_in_model`: our model is a plain nn.Module, not a transformers one), each
computing W x + (alpha / r) B A dropout(x), B zero at the start, so a fresh adapter leaves the
model's output unchanged. Only A and B train; every other parameter is frozen. A checkpoint of a
LoRA run holds those (and their AdamW state) and a reference to the base model (checkpoint.py).

`merge(model)` folds each adapter into its weight and puts the plain nn.Linear back: the model is
then our ordinary Transformer again (export, chat and evaluation run it at full speed).

The PEFT adapter format (`export_hf.py --adapter`) is what `peft.PeftModel.from_pretrained(<a
LlamaForCausalLM>, <dir>)` reads: adapter_config.json and adapter_model.safetensors with keys
`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`. Our RoPE has Hugging Face's
rotate-half layout (model.apply_rope), so wq/wk export unpermuted and so do their B matrices.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from .hf_io import hf_name

# Our projection names, the Linear layers LoRA may target, and their Hugging Face names.
HF_TARGETS = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj",
              "w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
ADAPTER = "default"  # PEFT's adapter name: it appears in our parameter names, not in PEFT's files


@dataclass
class LoraSpec:
    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return {**asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: dict) -> LoraSpec:
        return cls(int(d["rank"]), float(d["alpha"]), float(d["dropout"]), tuple(d["targets"]))


def adapter_parameters(spec: LoraSpec, c) -> int:
    """Parameters of the adapters `spec` puts on a model of ModelConfig `c`: rank x (in + out) per
    targeted projection and block (planner.py's LoRA memory)."""
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    shapes = {"wq": (c.dim, q), "wk": (c.dim, kv), "wv": (c.dim, kv), "wo": (q, c.dim),
              "w1": (c.dim, c.ffn_dim), "w2": (c.ffn_dim, c.dim), "w3": (c.dim, c.ffn_dim)}
    return c.n_layers * sum(spec.rank * sum(shapes[t]) for t in spec.targets)


def parse_targets(text: str) -> tuple[str, ...]:
    """`wq,wv` -> ("wq", "wv"); ValueError naming an unknown one."""
    targets = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in targets if t not in HF_TARGETS]
    if unknown or not targets:
        raise ValueError(f"{unknown or text!r}: choose among {', '.join(HF_TARGETS)} (comma-separated)")
    return targets


def _peft_config(spec: LoraSpec, target_names: list[str], **extra):
    # peft imports transformers (seconds): only LoRA runs pay for it.
    from peft import LoraConfig  # noqa: PLC0415

    return LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                      target_modules=target_names, bias="none", **extra)


def attach(model: nn.Module, spec: LoraSpec) -> nn.Module:
    """Add adapters to `model` in place (A drawn from torch's RNG, B zero) and freeze the rest."""
    from peft import inject_adapter_in_model  # noqa: PLC0415

    inject_adapter_in_model(_peft_config(spec, list(spec.targets)), model, adapter_name=ADAPTER)
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter(name))
    return model


@torch.no_grad()
def hold_frozen_linears_in(model: nn.Module, dtype: torch.dtype) -> None:
    """The frozen nn.Linear weights (the base projections, the output head) held in `dtype`: half
    the memory, and autocast casts them to it for every matmul anyway. Embeddings and norms keep
    float32, so the residual stream is the merged model's; the adapters stay float32 for AdamW."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and not module.weight.requires_grad:
            module.weight.data = module.weight.data.to(dtype)


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def has_adapters(model: nn.Module) -> bool:
    return any(is_adapter(name) for name, _ in model.named_parameters())


def _lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer  # noqa: PLC0415

    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (W + alpha / r * B A) and restore plain nn.Linear layers."""
    for name, layer in _lora_layers(model):
        layer.merge(adapter_names=[ADAPTER])
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.get_base_layer())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def peft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' A and B under the names PEFT saves for a LlamaForCausalLM (adapter name dropped)."""
    out = {}
    for name, p in model.named_parameters():
        if not is_adapter(name):
            continue
        module, _, rest = name.partition(f".lora_")  # "layers.0.attention.wq", "A.default.weight"
        which = rest.split(".")[0]  # A or B
        hf_module = hf_name(f"{module}.weight").removesuffix(".weight")
        out[f"base_model.model.{hf_module}.lora_{which}.weight"] = p.detach()
    return out


def save_peft_config(spec: LoraSpec, out_dir, base_model: str) -> None:
    """adapter_config.json, written by PEFT itself, with Hugging Face's module names."""
    config = _peft_config(spec, sorted(HF_TARGETS[t] for t in spec.targets), task_type="CAUSAL_LM",
                          base_model_name_or_path=base_model)
    config.save_pretrained(str(out_dir))
