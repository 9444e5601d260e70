"""Per-block statistics every --layer_stats_interval steps (docs/at-scale.md): each transformer
block's gradient norm (before clipping), weight norm, update-to-weight ratio (the norm of what
AdamW changed over the weight norm) and the RMS of its output activation over the step's
micro-batches; and, for a spike's forensics, which block's gradient jumped most.

Off (interval 0) it adds nothing: no hooks, no tensors, no sync. On a statistics step the forward
hooks accumulate on the device, the block weights are copied once before the update (the update
ratio needs them), and one all-reduce brings the figures to the host."""

from __future__ import annotations

import statistics
from collections import deque

import torch
import torch.distributed as dist
import torch.nn as nn

from .utils import Dist

HISTORY = 8  # statistics steps whose gradient norms a spike is compared with


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _sharded(blocks: list[nn.Module]) -> bool:
    return any(hasattr(p, "to_local") for block in blocks for p in block.parameters())


def block_sums(blocks: list[nn.Module], grads: bool) -> torch.Tensor:
    """(blocks,) sums of squares of each block's gradients (grads) or weights, on this rank's
    shard under FSDP; one device tensor, no sync."""
    sums = []
    for block in blocks:
        parts = [_local(p.grad if grads else p.detach()).float().pow(2).sum() for p in block.parameters()
                 if (p.grad is not None or not grads) and p.requires_grad]
        sums.append(torch.stack(parts).sum() if parts else torch.zeros(()))
    return torch.stack(sums)


def _all_ranks(values: torch.Tensor, d: Dist, summed: bool) -> torch.Tensor:
    """Sum over ranks (summed: each rank holds a part), else the mean (each holds the same)."""
    if d.world_size == 1:
        return values
    dist.all_reduce(values)
    return values if summed else values / d.world_size


def block_grad_norms(blocks: list[nn.Module], d: Dist) -> list[float]:
    """Each block's gradient norm now, the same on every rank (collective when distributed)."""
    return _all_ranks(block_sums(blocks, grads=True), d, _sharded(blocks)).sqrt().tolist()


def gradient_jump(norms: list[float], history: list[list[float]]) -> dict:
    """The block whose gradient norm rose most over its median in `history` (earlier statistics
    steps); with no history, the block with the largest gradient norm."""
    if not history:
        layer = max(range(len(norms)), key=lambda i: norms[i])
        return {"layer": layer, "grad_norm": norms[layer], "against": "no per-layer history: the largest norm"}
    medians = [statistics.median(step[i] for step in history) for i in range(len(norms))]
    ratios = [n / m if m > 0 else float("inf") for n, m in zip(norms, medians)]
    layer = max(range(len(norms)), key=lambda i: ratios[i])
    return {"layer": layer, "grad_norm": norms[layer], "ratio": ratios[layer],
            "against": f"the median of the last {len(history)} statistics steps"}


class LayerStats:
    """The statistics of one run: begin() before a step's micro-batches, gradients() once the
    gradients are reduced (before the update), updated() after it, finish() for the row."""

    def __init__(self, blocks: list[nn.Module], interval: int, d: Dist):
        self.blocks, self.interval, self.dist = list(blocks), interval, d
        self.history: deque[list[float]] = deque(maxlen=HISTORY)
        self.active = False
        self.activations: torch.Tensor | None = None  # (blocks, 2): sum of squares, elements
        self.before: list[list[torch.Tensor]] | None = None
        self.grad_sums: torch.Tensor | None = None
        self.param_sums: torch.Tensor | None = None
        self.update_sums: torch.Tensor | None = None
        # Registered once, gated by `active`: a compiled model sees the same hooks every step.
        self.hooks = [block.register_forward_hook(self._hook(i)) for i, block in enumerate(self.blocks)] \
            if interval else []

    def _hook(self, index: int):
        def record(module, inputs, output) -> None:
            if self.active and torch.is_grad_enabled():
                out = output.detach().float()
                self.activations[index, 0] += out.pow(2).sum()
                self.activations[index, 1] += out.numel()
        return record

    def begin(self, step: int) -> None:
        """Record this step if it is a statistics step."""
        self.active = bool(self.interval) and step % self.interval == 0
        if self.active:
            self.activations = torch.zeros(len(self.blocks), 2, device=self.dist.device)

    def gradients(self, clip_scale: float) -> None:
        """The gradients as reduced (clipped by `clip_scale`, undone here) and the weights before
        the update. No sync."""
        if not self.active:
            return
        self.grad_sums = block_sums(self.blocks, grads=True) / clip_scale ** 2
        self.param_sums = block_sums(self.blocks, grads=False)
        self.before = [[p.detach().clone() for p in block.parameters() if p.requires_grad] for block in self.blocks]

    def updated(self) -> None:
        if not self.active or self.before is None:
            return
        self.update_sums = torch.stack([
            torch.stack([(_local(p.detach()) - _local(old)).float().pow(2).sum()
                         for p, old in zip((q for q in block.parameters() if q.requires_grad), olds)]).sum()
            for block, olds in zip(self.blocks, self.before)])
        self.before = None

    def finish(self) -> dict:
        """The statistics step's figures ({} on other steps): lists with one value per block."""
        if not self.active:
            return {}
        self.active = False
        n = len(self.blocks)
        shard = _sharded(self.blocks)
        applied = self.update_sums is not None
        update = self.update_sums if applied else torch.zeros(n, device=self.dist.device)
        weights = torch.cat([self.grad_sums, self.param_sums, update]).float()
        weights = _all_ranks(weights, self.dist, summed=shard)
        activations = _all_ranks(self.activations.clone(), self.dist, summed=True)
        grad, param, upd = weights.view(3, n).sqrt().tolist()
        act = (activations[:, 0] / activations[:, 1].clamp(min=1)).sqrt().tolist()
        self.history.append(grad)
        self.grad_sums = self.param_sums = self.update_sums = self.activations = None
        row = {"layer_grad_norm": grad, "layer_param_norm": param, "layer_act_rms": act}
        if applied:
            row["layer_update_ratio"] = [u / p if p > 0 else 0.0 for u, p in zip(upd, param)]
        return row

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
