"""The LLaMa decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention.

Pure model code: no optimizer, no distributed code, no device strings, no printing. Build on the
meta device and materialize where it will run (what `build_model` does):

    with torch.device("meta"):
        model = Transformer(model_config("1p7b"))
    model.to_empty(device="cuda")
    model.init_weights()
    logits = model(idx)            # (B, T, vocab)
    loss = model(idx, targets)     # the mean loss alone, logits never held in full
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention


_RUNTIME = {"runtime": True}


@dataclass
class ModelConfig:
    vocab_size: int = 50304  # GPT-2's 50257 padded to a multiple of 64 for faster matmuls
    n_layers: int = 36
    dim: int = 2048
    n_heads: int = 32
    n_kv_heads: int = 8
    ffn_dim: int = 5120
    # Fields marked `_RUNTIME` do not change what the weights compute: a checkpoint's weights load
    # into a model that differs from it only there (a longer context, another loss chunk).
    max_seq_len: int = field(default=1024, metadata=_RUNTIME)
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5
    init_std: float = field(default=0.02, metadata=_RUNTIME)
    # Scale the init of each block's output projections (wo, w2) by 1/sqrt(2 * n_layers), as in
    # GPT-2, so the residual stream's variance does not grow with depth. Off in the paper's run.
    depth_scaled_init: bool = field(default=False, metadata=_RUNTIME)
    loss_chunk_size: int = field(default=4096, metadata=_RUNTIME)  # rows of logits at a time in the loss

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not value > 0:
                raise ValueError(f"ModelConfig.{f.name} must be positive, got {value}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} (dim / n_heads) must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)

    def differences(self, other: dict | ModelConfig, weights_only: bool = False) -> list[str]:
        """'name: ours vs theirs' for each field that differs; with weights_only, only the fields
        that decide what the weights mean (not max_seq_len, init or the loss's chunking)."""
        theirs = other.to_dict() if isinstance(other, ModelConfig) else other
        return [f"{f.name}: {getattr(self, f.name)!r} vs {theirs.get(f.name)!r}" for f in fields(self)
                if not (weights_only and f.metadata.get("runtime")) and theirs.get(f.name) != getattr(self, f.name)]


PRESETS: dict[str, dict] = {
    # For tests and the CPU demo: ~200k parameters outside the 50304-token embeddings.
    "tiny": dict(n_layers=4, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=192, max_seq_len=256),
    "124m": dict(n_layers=12, dim=768, n_heads=12, n_kv_heads=12, ffn_dim=3072),
    "978m": dict(n_layers=36, dim=1280, n_heads=20, n_kv_heads=4, ffn_dim=5120),
    "1p7b": dict(n_layers=36, dim=2048, n_heads=32, n_kv_heads=8, ffn_dim=5120),  # the paper's
}


def model_config(name: str, **overrides) -> ModelConfig:
    """A named preset, optionally with some fields replaced."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu",
                state_dict: dict[str, torch.Tensor] | None = None) -> Transformer:
    """The model built on the meta device, then materialized on `device` (never a full CPU copy
    first): freshly initialized, or holding `state_dict`'s tensors as they are (assign)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    if state_dict is None:
        model.to_empty(device=device)
        model.init_weights()
    else:
        model.load_state_dict(state_dict, assign=True)
        # The RoPE table is a non-persistent buffer, still on meta: compute it where the weights are.
        model.rope = rope_table(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta).to(device)
    return model


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Computed in float32 whatever the autocast dtype: bf16 loses too much in the mean square.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).type_as(x)


def rope_table(head_dim: int, max_seq_len: int, theta: float) -> torch.Tensor:
    """cos and sin of every (position, frequency) pair: (max_seq_len, 2, head_dim // 2), float32;
    [:, 0] the cosines, [:, 1] the sines, each contiguous over the frequencies (a strided operand
    makes the rotation's broadcast products ~1.7x slower on the CPU, forward and backward)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    return torch.stack([angles.cos(), angles.sin()], dim=1)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate x: (B, T, n, head_dim) by rope: (T, 2, head_dim // 2), rotate-half convention.

    The first and second halves of each head are the two coordinates of each rotated pair; this
    is Hugging Face's convention, so their checkpoints load without permuting wq/wk.
    """
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, T, n, head_dim // 2) each
    cos = rope[None, :, None, 0]  # (1, T, 1, head_dim // 2)
    sin = rope[None, :, None, 1]
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.type_as(x)


def _sdpa_supports_gqa() -> bool:
    try:
        q = torch.zeros(1, 2, 1, 2)
        F.scaled_dot_product_attention(q, q[:, :1], q[:, :1], enable_gqa=True)
        return True
    except TypeError:
        return False


_SDPA_GQA = _sdpa_supports_gqa()


class KVCache(nn.Module):
    """Preallocated keys and values, written in place at the decoded positions. A prompt writes a
    prefix and attends to it (`update`); a decoded token at a tensor position writes one slot and
    attends to the whole buffer under a mask (`write_at`): shapes that never change, so one
    compiled decode graph serves every position."""

    def __init__(self, batch: int, max_seq_len: int, n_kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.size(2)
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def write_at(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k.index_copy_(2, pos, k)
        self.v.index_copy_(2, pos, v)
        return self.k, self.v

    def fits(self, batch: int, max_seq_len: int, dtype: torch.dtype, device: torch.device) -> bool:
        return self.k.shape[0] == batch and self.k.shape[2] == max_seq_len and self.k.dtype == dtype \
            and self.k.device == device


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.cache: KVCache | None = None

    def forward(self, x: torch.Tensor, rope: torch.Tensor, start_pos: int | torch.Tensor = 0,
                mask: BlockMask | torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, n_heads or n_kv_heads, T, head_dim)
        if isinstance(start_pos, torch.Tensor):  # one decoded token (Transformer.decode)
            k, v = self.cache.write_at(start_pos, k, v)  # (B, n_kv_heads, cache length, head_dim)
            # (1, 1, 1, cache length): the slots written so far
            mask = (torch.arange(k.size(2), device=k.device) <= start_pos).view(1, 1, 1, -1)
            causal = False
        else:
            if self.cache is not None:
                k, v = self.cache.update(start_pos, k, v)  # (B, n_kv_heads, start_pos + T, head_dim)
            # The prompt (start_pos 0) gets the usual causal mask; a decoded token may see every cached
            # key, and SDPA's top-left-aligned mask would be wrong for several new tokens at once. The
            # choice depends on start_pos, a Python int, never on T: under torch.compile T can be
            # symbolic, and SDPA rejects a symbolic is_causal (the whole graph would fall back).
            causal = start_pos == 0
            if not causal and T != 1:
                raise ValueError(f"after the prompt, decode one token at a time (got {T} at position {start_pos})")
            # A given mask (a boolean (B, 1, T, T) one holds the causal part itself) replaces is_causal.
            causal = causal and mask is None
        if isinstance(mask, BlockMask):
            y = flex_attention(q, k, v, block_mask=mask, enable_gqa=True)
        elif _SDPA_GQA:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
        else:
            repeat = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(repeat, dim=1)  # (B, n_heads, S, head_dim)
            v = v.repeat_interleave(repeat, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, dim)
        return self.wo(y)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, start_pos: int | torch.Tensor = 0,
                mask: BlockMask | torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), rope, start_pos, mask)
        return x + self.feed_forward(self.ffn_norm(x))


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `h @ weight.T` without ever holding the full logits, plus PaLM's
    z-loss: z_loss x the mean of log(Z)^2, Z the softmax normalizer, which keeps log(Z) near 0.

    The logits of `chunk` rows at a time are computed, turned into float32 loss and (when
    gradients are needed) into their gradient, then dropped: at micro-batch 16 x 1024 and vocab
    50304 a float32 copy of the full logits alone would be 3.3 GB. Targets < 0 are ignored.
    Returns (cross-entropy + z_loss x mean log(Z)^2, mean log(Z)^2); the second is a readout for
    the logs, not differentiable.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int, z_loss: float):
        input_dtype = h.dtype
        if torch.is_autocast_enabled(h.device.type):
            dtype = torch.get_autocast_dtype(h.device.type)
            h, w = h.to(dtype), weight.to(dtype)
        else:
            w = weight.to(h.dtype)
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        n_valid = (targets >= 0).sum().clamp(min=1)
        # float16's range ends near 6e-8: entries of softmax / n_valid (1e-10 at 16k targets) would
        # flush to zero before the loss scale reaches them in backward. Under float16 the 1/n_valid
        # is applied after the matmuls, in float32, and grad_h stays float32 until backward.
        late_mean = w.dtype == torch.float16
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        z_sum = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_dtype = torch.float32 if late_mean else input_dtype
        grad_h = torch.empty(h.shape, dtype=grad_dtype, device=h.device) if needs_grad else None
        # A frozen output layer (LoRA) needs no weight gradient: 4 bytes per weight and a matmul per chunk saved.
        # The first chunk's product becomes the float32 sum (no zero-filled vocab x dim buffer to add to).
        grad_w = None
        for start in range(0, h.size(0), chunk):
            h_c, t_c = h[start : start + chunk], targets[start : start + chunk]
            logits = (h_c @ w.t()).float()  # (chunk, vocab)
            valid = t_c >= 0
            safe_t = t_c.clamp(min=0)
            picked = logits.gather(1, safe_t[:, None]).squeeze(1)
            # exp and softmax are built in place in the logits buffer, the largest tensor here:
            # one (chunk, vocab) float32 buffer per chunk instead of three.
            row_max = logits.amax(dim=-1, keepdim=True)
            exp = logits.sub_(row_max).exp_()
            sum_exp = exp.sum(dim=-1, keepdim=True)
            lse = (row_max + sum_exp.log()).squeeze(1)  # log(Z) per row
            loss = loss + ((lse - picked) * valid).sum()
            if z_loss:
                z_sum = z_sum + (lse.square() * valid).sum()
            if needs_grad:
                # d(loss)/d(logits) = softmax - one_hot, over the valid rows, / n_valid; the z-loss
                # adds z_loss x 2 log(Z) x softmax (d log(Z) / d logits = softmax).
                g = exp.div_(sum_exp)
                if z_loss:
                    g.mul_((1 + 2 * z_loss * lse)[:, None])
                g.scatter_add_(1, safe_t[:, None], -torch.ones_like(g[:, :1]))
                if late_mean:
                    g = g.mul_(valid[:, None]).to(w.dtype)
                    grad_h[start : start + chunk] = (g @ w).float().div_(n_valid)
                    if ctx.needs_input_grad[1]:
                        grad_w = _accumulate(grad_w, (g.t() @ h_c).float().div_(n_valid))
                    continue
                g = g.mul_(valid[:, None] / n_valid).to(w.dtype)
                grad_h[start : start + chunk] = g @ w
                if ctx.needs_input_grad[1]:
                    grad_w = _accumulate(grad_w, (g.t() @ h_c).float())
        if needs_grad:
            ctx.save_for_backward(grad_h, grad_w)
            ctx.input_dtype = input_dtype
        z_mean = z_sum / n_valid
        ctx.mark_non_differentiable(z_mean)
        return (loss + z_loss * z_sum) / n_valid, z_mean

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, grad_z: torch.Tensor | None):
        grad_h, grad_w = ctx.saved_tensors
        # Scaled in place: no second vocab x dim buffer (a fresh 154 MB allocation at 124m, page
        # faults included, cost more than the product on the CPU). A second backward through the
        # same loss (retain_graph) is refused by autograd's version check on the saved tensor.
        grad_w = grad_w.mul_(grad_loss) if grad_w is not None else None
        grad_h = (grad_h * grad_loss.to(grad_h.dtype)).to(ctx.input_dtype) if ctx.needs_input_grad[0] else None
        return grad_h, grad_w, None, None, None


def _accumulate(total: torch.Tensor | None, part: torch.Tensor) -> torch.Tensor:
    return part if total is None else total.add_(part)


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 4096,
                          z_loss: float = 0.0) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`F.cross_entropy(h @ weight.T, targets, ignore_index=-1)` for h: (N, dim), targets: (N,).
    With z_loss > 0: (that + z_loss x mean log(Z)^2, mean log(Z)^2), the second for the logs."""
    if not torch.is_grad_enabled():
        # Inside forward() the Function sees neither no_grad nor inference_mode, only
        # requires_grad: detach, or evaluation computes (and drops) every gradient, ~3x the time.
        h, weight = h.detach(), weight.detach()
    loss, z = ChunkedCrossEntropy.apply(h, weight, targets, chunk, z_loss)
    return (loss, z) if z_loss else loss


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)  # untied from the embeddings
        # Computed once, moved with the model, never saved: it is a function of the config.
        self.register_buffer("rope", rope_table(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta), persistent=False)
        self.compiled_decode = None  # torch.compile of decode, made on first use (generate(compile=True))

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialize every parameter and buffer in place (also after `to_empty`)."""
        cfg = self.config
        self.rope.copy_(rope_table(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta))
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers) if cfg.depth_scaled_init else cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                nn.init.normal_(p, mean=0.0, std=out_std)
            else:
                nn.init.normal_(p, mean=0.0, std=cfg.init_std)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def check_input(self, idx: torch.Tensor, start_pos: int = 0) -> None:
        """ValueError when idx does not fit the model (length or token ids)."""
        cfg = self.config
        if idx.dim() != 2:
            raise ValueError(f"input must be (batch, seq_len) token ids, got shape {tuple(idx.shape)}")
        if start_pos + idx.size(1) > cfg.max_seq_len:
            raise ValueError(
                f"sequence of {start_pos + idx.size(1)} tokens exceeds max_seq_len={cfg.max_seq_len}"
            )
        # Only where it is free: on an accelerator this would wait for the device. Training data
        # is checked against the vocabulary where the loader opens each shard.
        if idx.numel() and idx.device.type == "cpu":
            top, low = int(idx.max()), int(idx.min())
            if top >= cfg.vocab_size or low < 0:
                bad = top if top >= cfg.vocab_size else low
                raise ValueError(f"token id {bad} is outside the vocabulary [0, {cfg.vocab_size})")

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, start_pos: int = 0, z_loss: float = 0.0,
        mask: BlockMask | torch.Tensor | None = None, last_only: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """idx: (B, T) token ids. Without targets: the logits (B, T, vocab). With targets (B, T;
        -1 = ignore): the mean loss alone, the logits never materialized in full; with z_loss > 0,
        (loss + z-loss term, mean log(Z)^2) (see ChunkedCrossEntropy). One entry point for all,
        so DDP/FSDP and torch.compile wrap a single call. `mask` replaces the causal mask of a
        prompt (doc_mask.py: attention within each packed document only). `last_only`: the
        logits (B, vocab) of the last position alone (decoding)."""
        if not torch.compiler.is_compiling():
            self.check_input(idx, start_pos)
        h = self.hidden(idx, start_pos, mask)
        if targets is None:
            return self.output(h[:, -1, :] if last_only else h)
        return chunked_cross_entropy(
            h.flatten(0, 1), self.output.weight, targets.flatten(), self.config.loss_chunk_size, z_loss
        )

    def hidden(self, idx: torch.Tensor, start_pos: int = 0, mask: BlockMask | torch.Tensor | None = None
               ) -> torch.Tensor:
        """The final normed hidden states (B, T, dim) of idx: (B, T) at start_pos, before the output head."""
        T = idx.size(1)
        rope = self.rope[start_pos : start_pos + T]
        h = self.tok_embeddings(idx)  # (B, T, dim)
        for layer in self.layers:
            h = layer(h, rope, start_pos, mask)
        return self.norm(h)

    def step(self, idx: torch.Tensor, start_pos: int) -> torch.Tensor:
        """Logits (B, vocab) of the last position of idx: (B, T) at start_pos (a prompt at 0, then one
        token at a time), through the KV cache. The eager decode: keys and values of the filled
        part of the cache only, no mask; the output head on the last position only (a prompt's other
        positions would cost T - 1 more head products, the largest matrix of a small model)."""
        # Through __call__, so that wrappers' hooks run (FSDP2 gathers the root's own weights there).
        return self(idx, start_pos=start_pos, last_only=True)

    def setup_cache(self, batch: int, max_seq_len: int | None = None) -> None:
        """Allocate a KV cache per layer for generation (kept if one of that shape is already
        there: a compiled decode keeps its graph); `clear_cache()` frees it."""
        max_seq_len = max_seq_len or self.config.max_seq_len
        dtype, device = self.output.weight.dtype, self.output.weight.device
        for layer in self.layers:
            att = layer.attention
            if att.cache is None or not att.cache.fits(batch, max_seq_len, dtype, device):
                att.cache = KVCache(batch, max_seq_len, att.n_kv_heads, att.head_dim, dtype, device)

    def cache_length(self, needed: int, compile: bool | str = False) -> int:
        """Cache slots for a request of `needed` positions (prompt + new tokens). Eager: exactly
        those. Compiled: the next power of two from 64 (capped at max_seq_len), so the compiled
        decode, one graph per cache length, attends over at most twice the positions it needs, from
        a handful of graphs (64 ... 1,024 at 124m: 5), instead of over the whole context always."""
        if not compile:
            return needed
        length = 64
        while length < needed:
            length *= 2
        return min(length, self.config.max_seq_len)

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.attention.cache = None

    def decode(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Logits (B, vocab) after token: (B, 1) at position pos: (1,) long, a tensor so that one
        compiled graph serves every position; the earlier positions come from the KV cache."""
        rope = self.rope.index_select(0, pos)  # (1, 2, head_dim // 2)
        h = self.tok_embeddings(token)  # (B, 1, dim)
        for layer in self.layers:
            h = layer(h, rope, pos)
        return self.output(self.norm(h))[:, -1, :]

    def decoder(self, compile: bool | str = False):
        """A function (token: (B, 1), pos: int) -> logits (B, vocab) after the prompt is in the cache.
        Eager: `step`, over the filled part of the cache. Compiled: `decode`'s graph (static shapes
        over the whole cache, whose length `cache_length` picks from a few: no recompile per token,
        one graph per cache length; CUDA graphs on a GPU, where launching kernels one by one is the
        cost). `compile` True means inductor; a string names another torch.compile backend."""
        if not compile:
            return self.step
        if self.compiled_decode is None:
            cuda = self.output.weight.device.type == "cuda"
            backend = "inductor" if compile is True else compile
            graph = torch.compile(self.decode, backend=backend, fullgraph=True, dynamic=False,
                                  mode="reduce-overhead" if cuda and backend == "inductor" else None)
            # A CUDA graph's output is overwritten by its next replay: callers get their own copy.
            self.compiled_decode = (lambda token, pos: graph(token, pos).clone()) if cuda else graph
        compiled, device = self.compiled_decode, self.output.weight.device
        return lambda token, pos: compiled(token, torch.tensor([pos], device=device))

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        compile: bool | str = False,
    ) -> torch.Tensor:
        """Continue idx: (B, T) by max_new_tokens. temperature 0 is greedy; otherwise sample from
        the top_k most likely tokens (all if None), drawing from `generator` for reproducibility.
        The prompt is one forward pass into the KV cache, then one `decode` per token; with
        compile, a compiled decode over a cache of `cache_length` slots, kept for the next call."""
        T = idx.size(1)
        if T + max_new_tokens > self.config.max_seq_len:
            raise ValueError(
                f"prompt of {T} tokens + {max_new_tokens} new exceeds max_seq_len={self.config.max_seq_len}"
            )
        self.check_input(idx)
        if not use_cache:
            out = idx
            for _ in range(max_new_tokens):
                logits = self(out)[:, -1, :]
                out = torch.cat([out, pick_next_token(logits.float(), temperature, top_k, generator)], dim=1)
            return out
        self.setup_cache(idx.size(0), self.cache_length(T + max_new_tokens, compile))
        decode = self.decoder(compile)
        try:
            logits = self.step(idx, 0)  # the prompt: (B, vocab)
            tokens = []
            for i in range(max_new_tokens):
                tokens.append(pick_next_token(logits.float(), temperature, top_k, generator))
                if i < max_new_tokens - 1:
                    logits = decode(tokens[-1], T + i)
        finally:
            if not compile:
                self.clear_cache()
        return torch.cat([idx, *tokens], dim=1)


def pick_next_token(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    """Next token per row (B, 1) from last-position logits (B, vocab)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)
