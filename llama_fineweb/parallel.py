"""How the model is spread over the ranks and compiled, applied to it from outside model.py.

    train_model, eval_model = parallelize(model, cfg, dist)

does, in this order, what the config asks. train_llama.build_run calls it before it builds the
optimizer and loads a checkpoint, so that under FSDP both exist only as shards:

1. Activation checkpointing (`--activation_checkpointing`): chosen TransformerBlocks are wrapped
   so that backward recomputes their activations instead of keeping them. `full` wraps every
   block, `selective` every `ac_every`-th (see checkpoint_blocks for why blocks and not ops).
2. torch.compile (`--compile_mode`): `blocks` compiles each TransformerBlock in place; they share
   one graph, so compile time does not grow with depth. The embedding, the last norm and the
   chunked loss stay eager. `model` compiles the whole forward as one graph. Under FSDP the
   blocks are compiled one by one whatever `--compile_mode` says (see compile_mode).
3. DDP or FSDP (`--parallel`). DDP: every rank holds the whole model, gradients are all-reduced in
   buckets while backward runs. FSDP2 (`fully_shard` on each block and on the root): each rank
   holds 1/world_size of the parameters, gradients and AdamW moments; a block's parameters are
   all-gathered just before its forward and its backward, its gradients reduce-scattered after.

The model is changed in place (its state dict keys stay the same: checkpoint_wrapper and
Module.compile add no prefix), so `run.model` remains what checkpoints save: with FSDP its
parameters are DTensor shards, and torch.distributed.checkpoint writes the same format as DDP.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
import torch._dynamo.config
import torch._functorch.config
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel as DDP

from model import Transformer

from .train_config import ConfigError, TrainConfig
from .utils import DTYPES, Dist


def parallelize(model: Transformer, cfg: TrainConfig, d: Dist,
                backend: str = "inductor") -> tuple[nn.Module, nn.Module]:
    """(train_model, eval_model) for `model`, which is wrapped in place. eval_model never needs
    the other ranks once an evaluation has started (see GatheredForEval). `backend` is
    torch.compile's (benchmarks/gpu_check.py uses dynamo's "eager" on the CPU)."""
    checkpoint_blocks(model, cfg.activation_checkpointing, cfg.ac_every)
    mode = compile_mode(cfg, d)
    whole = mode == "model"
    if mode != "off":
        configure_compiler(cfg)
    if mode == "blocks":
        for block in model.layers:
            block.compile(backend=backend)
    if sharding(cfg):
        shard(model, cfg, d)
        return model, GatheredForEval(model)
    compiled = torch.compile(model, backend=backend) if whole else model
    return (replicate(compiled, cfg, d) if d.world_size > 1 else compiled), compiled


def compiling(cfg: TrainConfig, d: Dist) -> bool:
    return cfg.compile and (d.device.type == "cuda" or cfg.compile_cpu)


def sharding(cfg: TrainConfig) -> bool:
    return cfg.parallel == "fsdp" and dist.is_initialized()


def compile_mode(cfg: TrainConfig, d: Dist) -> str:
    """What parallelize compiles: "off", "blocks" or "model" (the setup line prints it).

    Under FSDP always "blocks", as torchtitan does: FSDP2's hooks are excluded from dynamo, and
    the graph break they make inside the loop over the blocks makes dynamo skip
    Transformer.forward altogether, so "model" would compile the blocks, the last norm and the
    loss one by one and run the loop eagerly while counting no graph break."""
    if not compiling(cfg, d):
        return "off"
    return "blocks" if sharding(cfg) else cfg.compile_mode


def configure_compiler(cfg: TrainConfig) -> None:
    # Backward runs outside autocast (as in eager): trace it that way.
    torch._functorch.config.backward_pass_autocast = "off"
    # One compiled entry per shape family: training, validation (no grad; a last partial batch)
    # and HellaSwag's padded lengths (up to seq_len / 64, each with a partial last batch). Past
    # the default limit of 8 new shapes would silently run eagerly.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                               8 + 2 * (cfg.seq_len // 64))


def checkpoint_blocks(model: Transformer, mode: str, every: int) -> None:
    """Wrap blocks so that backward recomputes their forward: all (`full`) or every `every`-th
    (`selective`). Whole blocks rather than op-level selective checkpointing: the saving is
    exactly the checkpointed blocks' share of the activations (what benchmarks/bench_parallel.py
    measures and the memory table of docs/parallelism.md projects), it composes unchanged with
    per-block compile and FSDP, and it is one knob."""
    if mode == "none":
        return
    for i, block in enumerate(model.layers):
        if mode == "full" or i % every == 0:
            # No dropout in a block: there is no random state to replay on recomputation.
            model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=False)


# ----------------------------------------------------------------------------- FSDP

def shard(model: Transformer, cfg: TrainConfig, d: Dist) -> None:
    """fully_shard each block, then the root (embeddings, last norm, output): each group's
    parameters are gathered together, one block at a time. With fsdp_shard_size < world size the
    mesh is 2-D (HSDP): sharded within groups of that many ranks, replicated across them."""
    group = cfg.fsdp_shard_size or d.world_size
    if d.world_size % group:
        raise ConfigError(f"--fsdp_shard_size={cfg.fsdp_shard_size} does not divide the {d.world_size} "
                          f"processes: use a divisor, e.g. the GPUs per node, or 0 for all")
    mesh = (init_device_mesh(d.device.type, (d.world_size,)) if group == d.world_size else
            init_device_mesh(d.device.type, (d.world_size // group, group),
                             mesh_dim_names=("replicate", "shard")))
    # With autocast (CUDA, or CPU with cpu_autocast) the gathered parameters and the compute are in
    # --dtype (float16 with train_llama's loss scaling); the sharded float32 parameters stay the
    # master weights, and gradients are reduced in float32.
    low = (d.device.type == "cuda" or cfg.cpu_autocast) and cfg.dtype != "float32"
    policy = MixedPrecisionPolicy(param_dtype=DTYPES[cfg.dtype] if low else None, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=cfg.reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy)


class GatheredForEval(nn.Module):
    """The FSDP model for validation and HellaSwag. Ranks get unequal numbers of their batches,
    and every FSDP forward all-gathers, so per-forward gathering would leave some ranks waiting
    for the others forever. Instead the first forward after a training step gathers each block
    (every rank makes it: each has at least one batch) and the blocks stay gathered, so the later
    forwards need no other rank; the next training step frees them (`release`)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module  # the FSDP model, or torch.compile of it
        self.gathered = False

    def blocks(self) -> list[FSDPModule]:
        root = getattr(self.module, "_orig_mod", self.module)
        return [block for block in root.layers if isinstance(block, FSDPModule)]

    def forward(self, *args, **kwargs):
        self.keep_gathered()
        return self.module(*args, **kwargs)

    def keep_gathered(self) -> None:
        if not self.gathered:
            for block in self.blocks():
                block.set_reshard_after_forward(False)
            self.gathered = True

    def join(self, device: torch.device) -> None:
        """For a rank with nothing to evaluate (fewer validation batches or HellaSwag examples
        than ranks): one throwaway forward makes the all-gathers the other ranks' first forward
        makes, so they do not wait for it forever. Call it before the evaluation's all-reduce."""
        if not self.gathered:
            self.keep_gathered()
            # Eager, also where blocks are compiled in place: a (1, 1) shape compiled here would
            # make this rank's training graph dynamic in the sequence length, and slower.
            with torch.no_grad(), torch.compiler.set_stance("force_eager"):
                self.module(torch.zeros(1, 1, dtype=torch.long, device=device))

    def release(self, reshard_after_forward: bool) -> None:
        if self.gathered:
            for block in self.blocks():
                block.reshard()
                block.set_reshard_after_forward(reshard_after_forward)
            self.gathered = False


def join_eval(eval_model: nn.Module, device: torch.device) -> None:
    """A rank that has nothing to evaluate calls this (a no-op except under FSDP)."""
    if isinstance(eval_model, GatheredForEval):
        eval_model.join(device)


def release_eval(eval_model: nn.Module, cfg: TrainConfig) -> None:
    """Free the parameters an FSDP evaluation gathered (a no-op otherwise)."""
    if isinstance(eval_model, GatheredForEval):
        eval_model.release(cfg.reshard_after_forward)


# ----------------------------------------------------------------------------- DDP

def replicate(module: nn.Module, cfg: TrainConfig, d: Dist) -> DDP:
    """DDP: gradients all-reduced in buckets of ddp_bucket_mb while backward runs. The gradients
    are views into the buckets (no second copy); rope is a function of the config, so there is
    no buffer to broadcast."""
    ddp = DDP(module, device_ids=[d.local_rank] if d.device.type == "cuda" else None, broadcast_buffers=False,
              bucket_cap_mb=cfg.ddp_bucket_mb, gradient_as_bucket_view=True)
    if cfg.ddp_bf16_compress:
        ddp.register_comm_hook(None, all_reduce_bf16)
    return ddp


# No annotations: DDP checks the hook's `bucket` annotation against dist.GradBucket, and here
# (`from __future__ import annotations`) it would be a string.
def all_reduce_bf16(process_group, bucket):  # noqa: ANN001, ANN201
    """All-reduce a gradient bucket in bfloat16: half the bytes on the wire, gradients rounded to
    8 significant bits before the mean. torch's bf16_compress_hook refuses anything but NCCL
    (DDP checks it by name); this one runs on gloo too, so the tests cover it."""
    group = process_group or dist.group.WORLD
    compressed = bucket.buffer().to(torch.bfloat16).div_(group.size())
    future = dist.all_reduce(compressed, group=group, async_op=True).get_future()

    def decompress(future: torch.futures.Future) -> torch.Tensor:
        return bucket.buffer().copy_(future.value()[0])

    return future.then(decompress)


# ----------------------------------------------------------------------------- the training step

def attention_backend(name: str) -> AbstractContextManager:
    """The context the training step runs in for `--sdpa_backend`: "auto" leaves SDPA to pick
    per call; "flash", "cudnn", "efficient" or "math" allows that backend alone (a shape it
    cannot take is then an error, not a silent fallback). From outside the model, so model.py
    keeps no device code; under torch.compile the backend is fixed when the graph is traced."""
    if name == "auto":
        return nullcontext()
    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]
    return sdpa_kernel(backend)


def set_gradient_sync(model: nn.Module, train_model: nn.Module, sync: bool) -> None:
    """Reduce gradients over the ranks on this micro-step, or only accumulate them locally.

    DDP: the flag is toggled instead of `no_sync()` so the loop reads the same with or without
    DDP. FSDP: without sync each rank keeps the full (unsharded, float32) gradients and the
    gathered parameters until the last micro-step, which reduce-scatters once and reshards."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)
        model.set_reshard_after_backward(sync)
    elif isinstance(train_model, DDP):
        train_model.require_backward_grad_sync = sync


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """Scale gradients to a total norm of at most max_norm; returns the norm before scaling, a
    plain tensor equal on every rank. Under FSDP the gradients are shards, their norm a DTensor
    until full_tensor() completes it."""
    parameters = [p for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm


def local_bytes(tensors) -> int:
    """Bytes this rank holds of `tensors` (of a DTensor: its local shard)."""
    total = 0
    for t in tensors:
        t = t.to_local() if isinstance(t, DTensor) else t
        total += t.numel() * t.element_size()
    return total


def memory_per_rank(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, list[int]]:
    """{"param_bytes", "grad_bytes", "optim_bytes"}: each a list over ranks of what that rank
    holds (collective). Taken after an optimizer step, before the gradients are freed."""
    params = list(model.parameters())
    mine = [local_bytes(params), local_bytes(p.grad for p in params if p.grad is not None),
            local_bytes(v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))]
    everyone = [mine]
    if dist.is_initialized():
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
    return {name: [rank[i] for rank in everyone]
            for i, name in enumerate(("param_bytes", "grad_bytes", "optim_bytes"))}


def describe_memory(sizes: dict[str, list[int]]) -> str:
    def mib(values: list[int]) -> str:
        return "/".join(f"{v / 2**20:.1f}" for v in values)

    return (f"held per rank (MiB, rank 0/1/...): parameters {mib(sizes['param_bytes'])}, gradients "
            f"{mib(sizes['grad_bytes'])}, AdamW state {mib(sizes['optim_bytes'])}")


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)
