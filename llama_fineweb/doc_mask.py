"""Document-aware attention for packed training sequences (--doc_mask).

A training window cuts through several documents, each of which begins with the end-of-text token
(fineweb_edu.py writes [EOT] + tokens per document). With the mask a token attends only to the
earlier tokens of its own document, as if each document were run alone; RoPE scores depend only on
the distance between positions, so no position reset is needed. Built once per micro-batch,
outside the model, which takes it as its `mask` argument.

Two forms of the same mask: a flex_attention BlockMask (sparse: fully masked blocks are skipped; what
CUDA trains with) and a dense boolean (B, 1, T, T) mask for scaled_dot_product_attention (the CPU's:
flex_attention has no backward on the CPU in torch 2.13).
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

from .tokenizer import EOT


def document_ids(idx: torch.Tensor, eot: int = EOT) -> torch.Tensor:
    """(B, T) int32: which document of its window each token belongs to; an EOT starts the next one."""
    return (idx == eot).cumsum(dim=1, dtype=torch.int32)


def dense_document_mask(idx: torch.Tensor, eot: int = EOT) -> torch.Tensor:
    """(B, 1, T, T) bool, True where query i may attend to key j: j <= i in the same document."""
    doc = document_ids(idx, eot)
    T = idx.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]  # (B, 1, T, T)


def block_document_mask(idx: torch.Tensor, eot: int = EOT) -> BlockMask:
    """The same mask as a flex_attention BlockMask (one for all heads)."""
    doc = document_ids(idx, eot)

    def same_document_causal(b, h, q, k):  # noqa: ANN001, ANN202 - flex_attention's mask_mod signature
        return (k <= q) & (doc[b, q] == doc[b, k])

    B, T = idx.shape
    return create_block_mask(same_document_causal, B, None, T, T, device=idx.device)


def document_mask(idx: torch.Tensor, flex: bool, eot: int = EOT) -> BlockMask | torch.Tensor:
    """The mask the model takes for the packed batch idx: (B, T); flex picks the BlockMask form."""
    return block_document_mask(idx, eot) if flex else dense_document_mask(idx, eot)
