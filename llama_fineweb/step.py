"""The optimizer step that training and benchmarks/gpu_check.py both take, and what it is built
from: the step's settings, the gradient accumulation a GPU count implies, and the optimizer (AdamW,
or Muon for the blocks' matrices beside AdamW for the rest)."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn as nn

from model import Transformer

from . import parallel
from .doc_mask import document_mask
from .stability import LossScaler
from .train_config import ConfigError, TrainConfig


@dataclass(frozen=True)
class StepSettings:
    """How optimizer_step runs, besides the model, the optimizer and the data."""

    accum_steps: int
    grad_clip: float = 1.0  # 0 = no clipping
    autocast_dtype: torch.dtype | None = None  # None: float32, no autocast
    sdpa_backend: str = "auto"  # parallel.attention_backend's names
    reduce_every_micro_step: bool = False  # FSDP: reduce-scatter after every micro-step
    world_size: int = 1
    z_loss: float = 0.0  # PaLM's z-loss coefficient (model.ChunkedCrossEntropy)
    device_type: str = "cuda"  # where autocast applies ("cpu" with --cpu_autocast)
    doc_mask: bool = False  # attention within each packed document only (doc_mask.py)

    def autocast(self):
        return (nullcontext() if self.autocast_dtype is None
                else torch.autocast(self.device_type, dtype=self.autocast_dtype))


def optimizer_step(model: Transformer, train_model: nn.Module, optimizer: torch.optim.Optimizer,
                   batches: Iterable[tuple[torch.Tensor, torch.Tensor]], settings: StepSettings,
                   step_targets: int | None = None,
                   agree: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[bool, bool]] | None = None,
                   after_update: Callable[[], None] | None = None,
                   scaler: LossScaler | None = None) -> tuple[torch.Tensor, torch.Tensor, bool, bool]:
    """One optimizer step, the one training and benchmarks/gpu_check.py both take: micro-steps over
    `batches` (accum_steps of them), gradients reduced on the last only -> clip -> AdamW (skipped
    if `agree` says so) -> gradients freed. `model` is the unwrapped module, `train_model` what
    parallel.parallelize made of it; `step_targets`: see step_target_count. `agree(grad_norm,
    loss_sum, z_loss_sum)` -> (apply the update?, stop after it?), by default this process's own
    finiteness check; `after_update` runs after the update, before the gradients are freed.
    `scaler` (float16): the loss is scaled for backward and the gradients unscaled before clipping;
    its update is the caller's, who knows whether a skip was an overflow.
    Returns (mean loss on this rank, gradient norm, applied, stop)."""
    s = settings
    loss_sum = z_sum = None
    with parallel.attention_backend(s.sdpa_backend):
        for micro_step, (x, y) in enumerate(batches):
            if loss_sum is None:
                loss_sum, z_sum = torch.zeros((), device=x.device), torch.zeros((), device=x.device)
            last = micro_step == s.accum_steps - 1
            parallel.set_gradient_sync(model, train_model, last or s.reduce_every_micro_step)
            # flex_attention's sparse BlockMask on CUDA; on the CPU it has no backward: a dense mask
            mask = document_mask(x, flex=x.device.type == "cuda") if s.doc_mask else None
            with s.autocast():
                loss, z = (train_model(x, y, z_loss=s.z_loss, mask=mask) if s.z_loss
                           else (train_model(x, y, mask=mask), None))
            # The micro-batch's mean loss times its share of the step's targets: the step's loss is
            # the mean over all its target tokens, whatever the micro-batch (DDP/FSDP average over ranks).
            share = 1 / s.accum_steps if step_targets is None else (y >= 0).sum() * s.world_size / step_targets
            loss = loss / s.accum_steps if step_targets is None else loss * share
            loss_sum += loss.detach()
            if z is not None:
                z_sum += z * share
            (loss if scaler is None else scaler.scaled(loss)).backward()
    if scaler is not None:
        scaler.unscale_(model.parameters())
    grad_norm = parallel.clip_grad_norm(model.parameters(), s.grad_clip or math.inf)
    if agree is None:
        applied, stopping = bool(torch.isfinite(grad_norm) & torch.isfinite(loss_sum)), False
    else:
        applied, stopping = agree(grad_norm, loss_sum, z_sum)
    if applied:
        optimizer.step()
        if after_update is not None:
            after_update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, grad_norm, applied, stopping


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


def build_optimizer(model: Transformer, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW | MuonAdamW:
    """AdamW with weight decay on 2-D weights only (not on norms), over the parameters that train
    (all of them, or a LoRA run's adapters); with --optimizer=muon, torch.optim.Muon takes the
    blocks' 2-D weights (muon_parameters) and AdamW the rest."""
    muon = muon_parameters(model) if cfg.optimizer == "muon" else []
    taken = {id(p) for p in muon}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    adamw = torch.optim.AdamW(groups, lr=cfg.max_lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                              fused=device.type == "cuda")
    if not muon:
        return adamw
    # lr_scale: set_lr gives this group muon_lr/max_lr times the schedule's LR (warmup, decay, WSD)
    return MuonAdamW(torch.optim.Muon(
        [{"params": muon, "lr_scale": cfg.muon_lr / cfg.max_lr}], lr=cfg.muon_lr,
        weight_decay=cfg.muon_weight_decay, momentum=cfg.muon_momentum, nesterov=True,
        ns_steps=cfg.muon_ns_steps, adjust_lr_fn=cfg.muon_adjust_lr), adamw)


def muon_parameters(model: Transformer) -> list[nn.Parameter]:
    """What Muon orthogonalizes: the trained 2-D weights inside the blocks (attention and SwiGLU
    projections). The embedding is a lookup and the output head a classifier, not hidden
    matrices, and norm gains are 1-D: those stay with AdamW, as Muon's authors advise."""
    return [p for block in model.layers for p in block.parameters() if p.requires_grad and p.dim() == 2]


class MuonAdamW:
    """torch.optim.Muon and torch.optim.AdamW stepped as one optimizer: what training, the planner
    and the checkpoint use of an optimizer (param_groups, state to read, step, zero_grad), Muon's first;
    `optimizers` for torch.distributed.checkpoint, which takes a list."""

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW):
        self.optimizers = (muon, adamw)

    @property
    def param_groups(self) -> list[dict]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    @property
    def state(self) -> dict:
        """Both optimizers' state, to read: each optimizer's own is a defaultdict, and a lookup
        through a view of both would plant empty entries in the first."""
        return {p: state for optimizer in self.optimizers for p, state in optimizer.state.items()}

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)


def optimizers_of(optimizer: torch.optim.Optimizer | MuonAdamW) -> tuple[torch.optim.Optimizer, ...]:
    return getattr(optimizer, "optimizers", (optimizer,))


def set_lr(optimizer: torch.optim.Optimizer | MuonAdamW, lr: float) -> None:
    """The schedule's LR on every group, times the group's lr_scale (Muon's muon_lr/max_lr)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def make_state(optimizer: torch.optim.Optimizer | MuonAdamW) -> None:
    """The state a first step makes (AdamW: step and two moments; Muon: one momentum buffer), so
    that memory is measured or tried as in a steady step."""
    for part in optimizers_of(optimizer):
        for group in part.param_groups:
            for p in group["params"]:
                part.state[p] = ({"momentum_buffer": torch.zeros_like(p)} if isinstance(part, torch.optim.Muon)
                                 else {"step": torch.zeros((), dtype=torch.float32, device=p.device),
                                       "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)})


def clear_state(optimizer: torch.optim.Optimizer | MuonAdamW) -> None:
    for part in optimizers_of(optimizer):
        part.state.clear()
