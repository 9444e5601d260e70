"""The memory and time model behind plan.py, `--micro_batch=auto` and docs/parallelism.md's table.

Peak memory per rank is counted from the code, term by term (what each op keeps for backward),
and checked against torch's MemTracker on the CPU (benchmarks/bench_plan.py, tests/test_plan.py):

    peak = max(start of backward: parameters, AdamW moments, the gradients that exist then,
               gathered or bf16 copies of weights, activations, the loss's buffers, transients;
               end of an FSDP backward that accumulates: every block gathered, all gradients
               unsharded; inside AdamW.step: parameters, gradients, moments, its temporaries)

with float32 parameters, gradients and two AdamW moments (16 B per parameter, / shard group
under FSDP). Time: FLOPs per token (PaLM's 6N + 12LTd with N the parameters that take part in
matmuls, i.e. without the input embedding) over the card's dense bf16 peak (metrics.py) at an
assumed MFU, plus the recomputation of checkpointed blocks; communication per step at the
interconnect's datasheet bandwidth. Not modelled: the caching allocator's fragmentation (the CUDA
reserve covers it), SDPA's math backend (it keeps the attention matrix), --doc_mask's masks.
"""

from __future__ import annotations

import gc
import math
import os
import re
from dataclasses import asdict, dataclass, replace

import torch

from model import ModelConfig, Transformer

from . import lora, metrics, parallel
from .lora import LoraSpec
from .step import clear_state, make_state
from .train_config import TrainConfig
from .utils import UserError

GiB = 2**30
# Left free on a CUDA card: the CUDA context and cuBLAS/NCCL workspaces (~0.5-1 GiB) and the
# caching allocator's fragmentation, which this model does not count.
CUDA_RESERVE_GIB = 2.0
# The MFU a run is assumed to reach when no measurement is given: a round figure below what
# compiled LLaMa training of this size reports on A100/H100 (torchtitan, llm.c: 40-50%).
DEFAULT_MFU = 0.40
# Compile's activation saving (block_bytes_per_token) is measured on the CPU only: until a GPU
# measures it, a row that fits only with it is marked and not recommended (plan.py).
COMPILE_SAVING_MEASURED_ON_GPU = False


# ----------------------------------------------------------------------------- cards and links

@dataclass(frozen=True)
class Card:
    name: str  # the key of metrics.PEAK_BF16_TFLOPS (torch.cuda.get_device_name())
    memory_gib: float
    link: str  # the usual link between two cards of a node: a key of LINKS
    aliases: tuple[str, ...] = ()
    tflops: float = 0.0  # dense bf16 peak when not metrics.PEAK_BF16_TFLOPS[name] (--peak_tflops)

    @property
    def peak_tflops(self) -> float:
        return self.tflops or metrics.PEAK_BF16_TFLOPS[self.name]


def gb(datasheet_gb: float) -> float:
    """A datasheet's GB (10^9 bytes) in GiB (2^30): 80 GB is 74.5 GiB. A lower bound of what torch
    reports (an RTX A6000's 48 GB shows as 47.5 GiB), so a row that fits the table fits the card."""
    return datasheet_gb * 1e9 / GiB


# Memory from each card's datasheet (the same datasheets as metrics.PEAK_BF16_TFLOPS), in GB as
# printed there, converted to GiB by gb().
CARDS = [
    # 48 GB GDDR6; pairs are often bridged (--link nvlink_a6000), PCIe is the safe assumption
    Card("NVIDIA RTX A6000", gb(48), "pcie4", ("RTX A6000", "A6000")),
    Card("NVIDIA A40", gb(48), "pcie4", ("A40",)),  # 48 GB GDDR6
    Card("NVIDIA RTX 6000 Ada Generation", gb(48), "pcie4", ("RTX 6000 Ada", "6000 Ada")),  # 48 GB GDDR6
    Card("NVIDIA L40S", gb(48), "pcie4", ("L40S",)),  # 48 GB GDDR6
    Card("NVIDIA L40", gb(48), "pcie4", ("L40",)),
    Card("NVIDIA A100-SXM4-40GB", gb(40), "nvlink3", ("A100 40GB", "A100 SXM 40GB")),  # 40 GB HBM2
    Card("NVIDIA A100-SXM4-80GB", gb(80), "nvlink3", ("A100", "A100 80GB", "A100 SXM", "A100 SXM 80GB")),  # 80 GB HBM2e
    Card("NVIDIA A100-PCIE-40GB", gb(40), "pcie4", ("A100 PCIe 40GB",)),
    Card("NVIDIA A100 80GB PCIe", gb(80), "pcie4", ("A100 PCIe", "A100 PCIe 80GB")),
    Card("NVIDIA A800-SXM4-80GB", gb(80), "nvlink3", ("A800",)),
    Card("NVIDIA H100 80GB HBM3", gb(80), "nvlink4", ("H100", "H100 SXM", "H100 80GB")),  # 80 GB HBM3
    Card("NVIDIA H100 PCIe", gb(80), "pcie5", ("H100 PCIe",)),  # 80 GB HBM2e
    Card("NVIDIA H100 NVL", gb(94), "pcie5", ("H100 NVL",)),  # 94 GB HBM3
    Card("NVIDIA H800", gb(80), "nvlink4", ("H800",)),
    Card("NVIDIA H200", gb(141), "nvlink4", ("H200", "H200 SXM")),  # 141 GB HBM3e
    Card("NVIDIA H200 NVL", gb(141), "pcie5", ("H200 NVL",)),
    Card("NVIDIA B200", gb(180), "nvlink5", ("B200",)),  # HGX B200: 1,440 GB for 8 GPUs
]

# Bandwidth per GPU in one direction, GB/s, as the datasheets print it (a ring all-reduce in
# NCCL reaches roughly 70-85% of it: the times below are lower bounds).
LINKS = {
    "pcie4": (32.0, "PCIe 4.0 x16: 16 GT/s x 16 lanes, 128b/130b = 31.5 GB/s per direction (PCI-SIG)"),
    "pcie5": (64.0, "PCIe 5.0 x16: 63 GB/s per direction (PCI-SIG)"),
    "nvlink_a6000": (56.25, "RTX A6000 NVLink bridge: 112.5 GB/s bidirectional (RTX A6000 datasheet)"),
    "nvlink3": (300.0, "NVLink 3 (A100 SXM): 600 GB/s bidirectional per GPU (A100 datasheet)"),
    "nvlink4": (450.0, "NVLink 4 (H100/H200 SXM): 900 GB/s bidirectional per GPU (H100 datasheet)"),
    "nvlink5": (900.0, "NVLink 5 (B200): 1.8 TB/s bidirectional per GPU (HGX B200 datasheet)"),
    "ib_hdr": (25.0, "InfiniBand HDR, one 200 Gb/s NIC per GPU (NVIDIA ConnectX-6 datasheet)"),
    "ib_ndr": (50.0, "InfiniBand NDR, one 400 Gb/s NIC per GPU (NVIDIA ConnectX-7 datasheet)"),
}


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower().replace("nvidia", ""))


def find_card(name: str) -> Card:
    """The card a user names ("RTX A6000", "H100", "A100 80GB", or torch's device name)."""
    wanted = _key(name)
    for card in CARDS:
        if wanted in {_key(card.name), *(_key(a) for a in card.aliases)}:
            return card
    known = ", ".join(card.aliases[0] for card in CARDS)
    raise UserError(f"unknown card {name!r}: choose one of {known}, or describe it with "
                    f"--gpu_mem GIB --peak_tflops TFLOPS")


def custom_card(memory_gib: float, peak_tflops: float, link: str = "pcie4") -> Card:
    """A card the table does not know, from its memory and dense bf16 peak."""
    return Card(f"custom card ({memory_gib:g} GiB, {peak_tflops:g} TFLOP/s)", memory_gib, link, tflops=peak_tflops)


# ----------------------------------------------------------------------------- what a run is

@dataclass(frozen=True)
class Setting:
    """One way to run a config: what decides memory and time."""

    parallel: str = "ddp"  # "ddp" or "fsdp"
    reduce_every_micro_step: bool = False  # fsdp only
    activation_checkpointing: str = "none"  # none, selective, full
    ac_every: int = 2
    micro_batch: int = 1
    world_size: int = 1  # processes (GPUs) in all
    shard_size: int = 0  # fsdp: ranks one copy is sharded over; 0 = all
    accum: int = 1  # micro-steps per optimizer step
    device: str = "cuda"  # "cuda": autocast (FSDP gathers bf16 parameters); "cpu": float32
    dtype: str = "bfloat16"
    compiled: bool = True  # CUDA compiles by default; the CPU does not
    cpu_autocast: bool = False  # --cpu_autocast: the CPU steps under autocast too
    lora_params: int = 0  # > 0: only these adapter parameters train, the base is frozen (LoRA)
    muon_params: int = 0  # --optimizer=muon: parameters with one momentum buffer instead of AdamW's two

    @property
    def low_precision(self) -> bool:
        """Under autocast (train_llama's Run.autocast_dtype)."""
        return self.dtype != "float32" and (self.device == "cuda" or self.cpu_autocast)

    @property
    def low_precision_params(self) -> bool:
        """FSDP's MixedPrecisionPolicy gathers bf16 parameters (on CUDA only, parallel.shard)."""
        return self.sharded and self.device == "cuda" and self.dtype != "float32"

    @property
    def sharded(self) -> bool:
        return self.parallel == "fsdp" and self.world_size > 1

    @property
    def group(self) -> int:
        return (self.shard_size or self.world_size) if self.sharded else 1

    def label(self) -> str:
        if self.parallel == "fsdp" and self.reduce_every_micro_step:
            return "FSDP, reduce every micro-step"
        return self.parallel.upper()


def setting_from_config(cfg: TrainConfig, world_size: int, device: str, micro_batch: int | None = None) -> Setting:
    """The Setting a TrainConfig describes (micro_batch given when cfg's is "auto")."""
    mb = micro_batch if micro_batch is not None else cfg.micro_batch
    per_step = mb * cfg.seq_len * world_size
    return Setting(parallel=cfg.parallel, reduce_every_micro_step=cfg.fsdp_reduce_every_micro_step,
                   activation_checkpointing=cfg.activation_checkpointing, ac_every=cfg.ac_every,
                   micro_batch=mb, world_size=world_size, shard_size=cfg.fsdp_shard_size,
                   accum=max(1, cfg.total_batch_tokens // per_step), device=device, dtype=cfg.dtype,
                   compiled=cfg.compile and (device == "cuda" or cfg.compile_cpu), cpu_autocast=cfg.cpu_autocast,
                   lora_params=lora_parameters(cfg.model_config(), cfg.lora_spec()),
                   muon_params=muon_parameter_count(cfg.model_config()) if cfg.optimizer == "muon" else 0)


# ----------------------------------------------------------------------------- parameters

def parameter_counts(c: ModelConfig) -> dict[str, int]:
    """{"block", "root", "total", "embedding"}: parameters per block, outside the blocks, in all."""
    kv = c.n_kv_heads * c.head_dim
    block = 2 * c.dim + c.dim * (c.dim + 2 * kv) + c.dim * c.dim + 3 * c.dim * c.ffn_dim
    root = 2 * c.vocab_size * c.dim + c.dim
    return {"block": block, "root": root, "total": c.n_layers * block + root, "embedding": c.vocab_size * c.dim}


def muon_parameter_count(c: ModelConfig) -> int:
    """The blocks' 2-D weights, which --optimizer=muon gives to Muon (step.muon_parameters)."""
    return c.n_layers * (parameter_counts(c)["block"] - 2 * c.dim)


def lora_parameters(c: ModelConfig, spec: LoraSpec | None) -> int:
    """Parameters of LoRA adapters (lora.adapter_parameters), 0 without LoRA."""
    return lora.adapter_parameters(spec, c) if spec is not None else 0


def flops_per_token(c: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token as metrics.py counts them for MFU, of the model built on the meta
    device (no memory; built once per config)."""
    key = repr(c)
    if key not in _META_MODELS:
        with torch.device("meta"):
            _META_MODELS[key] = Transformer(c)
    return metrics.flops_per_token(_META_MODELS[key], seq_len)


_META_MODELS: dict[str, Transformer] = {}


# ----------------------------------------------------------------------------- activations

def block_bytes_per_token(c: ModelConfig, s: Setting) -> float:
    """What one TransformerBlock keeps for backward per token, counted from model.py's ops.

    float32 (CPU), eager: the block input, x*rsqrt and the normed input of each RMSNorm (3d each),
    RoPE'd q and k, v, the attention output (d + 2 kv), SiLU's input, its output and the gate,
    and w2's input (4 ffn), plus the log-sum-exp per head and an rsqrt per norm.
    bf16 autocast (CUDA, float32 weights): the norms run in float32 (x, x*rsqrt: 8d each) and
    every linear casts its input to bf16 on its own (3 casts for q/k/v, 2 for w1/w3); q, k, v,
    the attention output and the FFN in bf16. bf16 parameters (FSDP): the residual stream is
    bf16, each norm keeps its float32 copy and x*rsqrt (8d) and one bf16 output (2d).
    Checked to the byte on the CPU with MemTracker (bench_parallel.py's bytes_after_forward on
    124m and tiny in float32, autocast and bf16 parameters; 1p7b autocast eager = 51.07 x dim).
    """
    d, kv, f, h = c.dim, c.n_kv_heads * c.head_dim, c.ffn_dim, c.n_heads
    small = 4 * h + 8  # log-sum-exp per head, one rsqrt per norm (float32)
    if not s.low_precision:
        return 4 * (8 * d + 2 * kv + 4 * f) + small
    if s.low_precision_params:
        eager = 24 * d + 4 * kv + 8 * f + small
    else:
        eager = 30 * d + 4 * kv + 8 * f + small
    # inductor's partitioner recomputes the cheap pointwise ops in backward instead of saving
    # them: 32.07 x dim instead of 51.07 x dim for the 1p7b block under autocast (measured by
    # bench_parallel.py's compiled_activations); the same ratio is assumed for other shapes.
    return eager * (32.07 / 51.07) if s.compiled else eager


def checkpoint_input_bytes(c: ModelConfig, s: Setting) -> float:
    """A checkpointed block keeps only its input: the residual stream (float32, or bf16 when the
    parameters are)."""
    return c.dim * (2 if s.low_precision_params else 4)


def outside_bytes_per_token(c: ModelConfig, s: Setting) -> float:
    """Kept per token outside the blocks: the last norm (its input and x*rsqrt) and the chunked
    loss's saved gradient with respect to the hidden states."""
    # bf16 parameters: the norm's float32 copy of its input, x*rsqrt, a bf16 gradient
    return (10 if s.low_precision_params else 12) * c.dim


def activation_bytes(c: ModelConfig, s: Setting, seq_len: int) -> float:
    """Bytes kept for backward by one micro-batch at the end of its forward, plus the block that
    checkpointing recomputes in backward."""
    tokens = s.micro_batch * seq_len
    full = block_bytes_per_token(c, s)
    if s.activation_checkpointing == "full":
        checkpointed = c.n_layers
    elif s.activation_checkpointing == "selective":
        checkpointed = math.ceil(c.n_layers / s.ac_every)  # blocks 0, every, 2 x every, ...
    else:
        checkpointed = 0
    per_token = (c.n_layers - checkpointed) * full + checkpointed * checkpoint_input_bytes(c, s)
    per_token += full if checkpointed else 0  # the block being recomputed
    return tokens * (per_token + outside_bytes_per_token(c, s))


def loss_bytes(c: ModelConfig, s: Setting, seq_len: int) -> float:
    """The chunked loss at its peak (model.ChunkedCrossEntropy's forward): one chunk of float32
    logits (and their bf16 gradient under autocast), the output weight's float32 gradient it
    saves, the (vocab, dim) product being added to it and, under autocast, the weight's bf16 copy."""
    rows = min(s.micro_batch * seq_len, c.loss_chunk_size)
    vd = c.vocab_size * c.dim
    if s.low_precision:
        return rows * c.vocab_size * (4 + 2) + vd * (4 + 4) + (0 if s.low_precision_params else 2 * vd)
    return rows * c.vocab_size * 4 + vd * (4 + 4)


def backward_transient_bytes(c: ModelConfig, s: Setting, seq_len: int) -> float:
    """Gradients of a block's activations that live while its backward runs (the FFN's are the
    largest: three of (tokens, ffn))."""
    return s.micro_batch * seq_len * 3 * c.ffn_dim * (2 if s.low_precision else 4)


# ----------------------------------------------------------------------------- peak memory

def memory(c: ModelConfig, s: Setting, seq_len: int) -> dict[str, float]:
    """Projected peak bytes per rank and its terms: {"params", "grads", "optimizer", "weights_extra",
    "activations", "loss", "transient", "optimizer_transient", "accumulated", "peak"}."""
    n = parameter_counts(c)
    total, block, root = n["total"], n["block"], n["root"]
    g = s.group
    gathered = 2 if s.low_precision_params else 4  # bytes of a parameter FSDP gathers
    deferred = s.sharded and s.accum > 1 and not s.reduce_every_micro_step
    if s.lora_params:
        return lora_memory(c, s, seq_len)
    # AdamW: two float32 moments a parameter; Muon: one momentum buffer for its matrices
    terms = {"params": 4 * total / g, "grads": 4 * total / g, "optimizer": (8 * total - 4 * s.muon_params) / g}
    if not s.sharded:
        # autocast keeps a bf16 copy of every weight from its first use to backward
        terms["weights_extra"] = 2 * total if s.low_precision else 0
    else:
        # The root (embeddings, output) stays gathered through backward; one block gathered and
        # the next prefetched. Until the last micro-step syncs, the unsharded float32 gradients
        # accumulate (all of them); else a block's unsharded gradients and the output weight's,
        # which lives until the root reduce-scatters at the end of backward.
        grads = 4 * total if deferred else 4 * c.vocab_size * c.dim + 4 * block
        terms["weights_extra"] = gathered * (root + 2 * block) + grads
    terms["activations"] = activation_bytes(c, s, seq_len)
    terms["loss"] = loss_bytes(c, s, seq_len)
    terms["transient"] = backward_transient_bytes(c, s, seq_len)
    # CUDA runs fused AdamW (no temporaries); the CPU's foreach AdamW makes sqrt(v), one float32
    # copy of the (local) parameters. With Muon beside it the CPU's step peaks as high (measured
    # with benchmarks/bench_plan.py --optimizer=muon), though Muon itself steps one matrix at a time.
    terms["optimizer_transient"] = 0 if s.device == "cuda" else 4 * total / g
    # Gradients alive when backward starts: DDP's buckets always; under FSDP the sharded ones
    # only once a micro-step has reduce-scattered (zero_grad frees them after each step); one
    # process without DDP has only the output weight's, which the loss makes first.
    if s.sharded:
        grads_in_backward = terms["grads"] if s.reduce_every_micro_step and s.accum > 1 else 0
    elif s.world_size > 1:
        grads_in_backward = terms["grads"]
    else:
        grads_in_backward = 4 * c.vocab_size * c.dim
    backward = (terms["params"] + terms["optimizer"] + grads_in_backward + terms["weights_extra"]
                + terms["activations"] + terms["loss"] + terms["transient"])
    # A backward that does not sync leaves every block gathered (reshard_after_backward is off
    # while accumulating) beside all the unsharded gradients; its activations are gone by then.
    terms["accumulated"] = terms["params"] + terms["optimizer"] + (gathered + 4) * total if deferred else 0
    terms["peak"] = max(backward, terms["accumulated"],
                        terms["params"] + terms["grads"] + terms["optimizer"] + terms["optimizer_transient"])
    return terms


def lora_memory(c: ModelConfig, s: Setting, seq_len: int) -> dict[str, float]:
    """LoRA (train_llama.attach_adapters): the frozen linear weights in the autocast dtype on CUDA
    (float32 on the CPU; embeddings and norms float32 always), float32 adapters with their
    gradients and AdamW moments; no autocast copies of frozen weights and no output-weight
    gradient in the loss. Activations as for full training
    (backward still runs through every block); sharding is not modelled."""
    total, adapters = parameter_counts(c)["total"], s.lora_params
    float32 = c.vocab_size * c.dim + (2 * c.n_layers + 1) * c.dim  # embeddings and norms stay float32
    frozen = (2 if s.low_precision else 4) * (total - float32) + 4 * float32
    terms = {"params": frozen + 4 * adapters, "grads": 4 * adapters,
             "optimizer": 8 * adapters, "weights_extra": 0.0, "activations": activation_bytes(c, s, seq_len),
             "loss": min(s.micro_batch * seq_len, c.loss_chunk_size) * c.vocab_size * (6 if s.low_precision else 4),
             "transient": backward_transient_bytes(c, s, seq_len),
             "optimizer_transient": 0 if s.device == "cuda" else 4 * adapters, "accumulated": 0.0}
    static = terms["params"] + terms["grads"] + terms["optimizer"]
    terms["peak"] = max(static + terms["activations"] + terms["loss"] + terms["transient"],
                        static + terms["optimizer_transient"])
    return terms


def peak_bytes(c: ModelConfig, s: Setting, seq_len: int) -> float:
    return memory(c, s, seq_len)["peak"]


# ----------------------------------------------------------------------------- time and traffic

def communication_bytes(c: ModelConfig, s: Setting) -> float:
    """Bytes each GPU sends per optimizer step (ring collectives: (W-1)/W of the buffer per
    all-gather or reduce-scatter, twice that per all-reduce)."""
    w = s.world_size
    if w == 1:
        return 0.0
    total = parameter_counts(c)["total"]
    share = (w - 1) / w
    if s.lora_params:
        return 2 * share * 4 * s.lora_params  # only the adapters' gradients are all-reduced
    if not s.sharded:
        return 2 * share * 4 * total  # one float32 all-reduce of the gradients
    gw = s.group
    gshare = (gw - 1) / gw
    param_bytes = 2 if s.low_precision_params else 4
    syncs = s.accum if s.reduce_every_micro_step else 1
    # forward and backward all-gathers on every micro-step, float32 reduce-scatter per sync
    traffic = s.accum * 2 * gshare * param_bytes * total + syncs * gshare * 4 * total
    if gw < w:  # HSDP: the shards' gradients are all-reduced across the replicas
        traffic += 2 * ((w // gw - 1) / (w // gw)) * 4 * total / gw
    return traffic


def link_bandwidth(link: str, nodes: int, network: str) -> float:
    """Bytes/s a GPU sends at, the slowest hop of its ring."""
    bandwidth = LINKS[link][0]
    if nodes > 1:
        bandwidth = min(bandwidth, LINKS[network][0])
    return bandwidth * 1e9


def recompute_factor(c: ModelConfig, s: Setting) -> float:
    """FLOPs with checkpointed blocks' forwards run twice, relative to without (a block's
    forward is a third of its forward + backward)."""
    if s.activation_checkpointing == "none":
        return 1.0
    checkpointed = c.n_layers if s.activation_checkpointing == "full" else math.ceil(c.n_layers / s.ac_every)
    return 1.0 + checkpointed / c.n_layers / 3 * blocks_share(c)


def blocks_share(c: ModelConfig) -> float:
    """The blocks' share of the training FLOPs (the rest is the output layer)."""
    n = parameter_counts(c)
    blocks = 6 * c.n_layers * n["block"]
    return blocks / (blocks + 6 * c.vocab_size * c.dim)


@dataclass
class Projection:
    setting: Setting
    peak_gib: float
    fits: bool
    fits_eager: bool  # fits without compile's activation saving (COMPILE_SAVING_MEASURED_ON_GPU)
    tokens_per_s: float
    step_s: float
    comm_gb: float
    comm_s: float
    total_s: float
    gpu_hours: float

    def to_dict(self) -> dict:
        return {**asdict(self), "setting": asdict(self.setting)}


def project(c: ModelConfig, s: Setting, seq_len: int, total_batch_tokens: int, card: Card, mfu: float,
            tokens: float, nodes: int = 1, network: str = "ib_ndr",
            reserve_gib: float = CUDA_RESERVE_GIB) -> Projection:
    """Memory, speed, traffic and the time to `tokens` of one setting on `world_size` cards."""
    peak = peak_bytes(c, s, seq_len) / GiB
    eager_peak = peak_bytes(c, replace(s, compiled=False), seq_len) / GiB if s.compiled else peak
    flops = flops_per_token(c, seq_len) * recompute_factor(c, s)
    compute_s = total_batch_tokens * flops / (mfu * card.peak_tflops * 1e12 * s.world_size)
    comm = communication_bytes(c, s)
    comm_s = comm / link_bandwidth(card.link, nodes, network)
    # DDP's bucketed all-reduce and FSDP's prefetched gathers overlap the compute; a step is as
    # slow as the slower of the two.
    step_s = max(compute_s, comm_s)
    total_s = tokens / total_batch_tokens * step_s
    room = card.memory_gib - reserve_gib
    return Projection(s, peak, peak <= room, eager_peak <= room, total_batch_tokens / step_s, step_s,
                      comm / 1e9, comm_s, total_s, total_s * s.world_size / 3600)


# ----------------------------------------------------------------------------- micro-batches

def micro_batch_choices(total_batch_tokens: int, seq_len: int, world_size: int) -> list[int]:
    """Micro-batches that keep the global batch exact: divisors of the sequences per rank per step."""
    per_rank, rest = divmod(total_batch_tokens // seq_len, world_size)
    if rest or per_rank == 0:
        return []
    return [m for m in range(1, per_rank + 1) if per_rank % m == 0]


def largest_fitting_micro_batch(c: ModelConfig, base: Setting, seq_len: int, total_batch_tokens: int,
                                budget_bytes: float) -> tuple[int | None, float]:
    """(the largest micro-batch whose projected peak fits `budget_bytes`, its peak bytes), or
    (None, the smallest one's peak) when none fits."""
    best, best_peak = None, math.inf
    for mb in micro_batch_choices(total_batch_tokens, seq_len, base.world_size):
        s = _with(base, mb, total_batch_tokens, seq_len)
        peak = peak_bytes(c, s, seq_len)
        if peak <= budget_bytes:
            best, best_peak = mb, peak
        elif best is None:
            best_peak = min(best_peak, peak)
    return best, best_peak


def _with(base: Setting, micro_batch: int, total_batch_tokens: int, seq_len: int) -> Setting:
    accum = max(1, total_batch_tokens // (micro_batch * seq_len * base.world_size))
    return Setting(**{**asdict(base), "micro_batch": micro_batch, "accum": accum})


def next_smaller(choices: list[int], micro_batch: int) -> int | None:
    """The next micro-batch to try after `micro_batch` ran out of memory: the largest divisor at
    most half of it (halving, kept exact)."""
    smaller = [m for m in choices if m <= micro_batch // 2]
    return max(smaller) if smaller else None


# ----------------------------------------------------------------------------- checks against runs

def compare_measured(c: ModelConfig, s: Setting, seq_len: int, measured_bytes: float) -> dict:
    """The projection for a measured run (e.g. a gpu_check row's torch.cuda.max_memory_allocated):
    {"projected_gib", "measured_gib", "error"}, error = projected / measured - 1."""
    projected = peak_bytes(c, s, seq_len)
    return {"projected_gib": projected / GiB, "measured_gib": measured_bytes / GiB,
            "error": projected / measured_bytes - 1 if measured_bytes else None}


# ----------------------------------------------------------------------------- --micro_batch=auto

def memory_budget(device: torch.device, local_processes: int = 1) -> tuple[float, str]:
    """(bytes one rank may use, how that was found). CUDA: the device's free memory less the
    reserve. CPU: 80% of the memory the kernel says is available (/proc/meminfo MemAvailable,
    else all physical memory), shared by this machine's processes."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return free - CUDA_RESERVE_GIB * GiB, (f"{free / GiB:.1f} GiB free of {total / GiB:.1f} GiB on "
                                               f"{torch.cuda.get_device_name(device)}, less {CUDA_RESERVE_GIB:g} GiB")
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    share = 0.8 * available / max(1, local_processes)
    return share, f"80% of {available / GiB:.1f} GiB available RAM / {local_processes} process(es)"


def auto_micro_batch(cfg: TrainConfig, world_size: int, device: torch.device, budget_bytes: float) -> tuple[int, str]:
    """(micro-batch, why): the largest micro-batch that keeps cfg's global batch exact and whose
    projected peak fits `budget_bytes`; the smallest one (with a warning in `why`) when none does."""
    choices = micro_batch_choices(cfg.total_batch_tokens, cfg.seq_len, world_size)
    if not choices:
        raise UserError(f"--micro_batch=auto: total_batch_tokens={cfg.total_batch_tokens:,} / seq_len={cfg.seq_len} "
                        f"sequences do not divide over {world_size} processes")
    base = setting_from_config(cfg, world_size, device.type, micro_batch=1)
    c = cfg.model_config()
    best, peak = largest_fitting_micro_batch(c, base, cfg.seq_len, cfg.total_batch_tokens, budget_bytes)
    if best is None:
        return 1, (f"no micro-batch fits: even 1 is projected at {peak / GiB:.1f} GiB of {budget_bytes / GiB:.1f} GiB "
                   f"(see plan.py for FSDP and activation checkpointing); trying 1")
    bigger = [m for m in choices if m > best]
    note = ""
    if bigger:
        s = _with(base, bigger[0], cfg.total_batch_tokens, cfg.seq_len)
        note = f"; {bigger[0]} would need {peak_bytes(c, s, cfg.seq_len) / GiB:.1f} GiB"
    return best, (f"the largest of {choices} projected to fit: {peak / GiB:.1f} GiB of {budget_bytes / GiB:.1f} GiB"
                  f"{note}")


def confirm_micro_batch(micro_batch: int, choices: list[int], fits) -> tuple[int, list[int]]:
    """Try `fits(micro_batch)` (one real step: False when it ran out of memory) and halve, within
    `choices`, until one fits: (the micro-batch, those that did not fit)."""
    failed = []
    while not fits(micro_batch):
        failed.append(micro_batch)
        smaller = next_smaller(choices, micro_batch)
        if smaller is None:
            raise UserError(f"--micro_batch=auto: even micro_batch={micro_batch} runs out of memory; see "
                            f"plan.py for FSDP and activation checkpointing")
        micro_batch = smaller
    return micro_batch, failed


def fits_one_step(model: torch.nn.Module, train_model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  micro_batch: int, seq_len: int, autocast, sdpa_backend: str = "auto") -> bool:
    """Whether one training micro-step at `micro_batch` (forward, backward, AdamW's moments
    present) runs without running out of CUDA memory, on every rank. Nothing changes: no
    optimizer step is taken, moments made here are dropped, and what a failed try held is freed
    before returning. Every rank must call it.

    The backward runs without gradient sync, as an accumulation micro-step does: an out-of-memory
    error on some ranks then leaves no gradient all-reduce half done (DDP's reducer would refuse
    the next step, and the ranks' collectives would pair wrongly); the ranks agree afterwards."""
    made = not optimizer.state
    device = next(model.parameters()).device
    ok = True
    try:
        if made:  # as the first step makes them
            make_state(optimizer)
        tokens = torch.randint(0, model.config.vocab_size, (micro_batch, seq_len + 1), device=device)
        parallel.set_gradient_sync(model, train_model, False)
        with parallel.attention_backend(sdpa_backend), autocast:
            loss = train_model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        del loss, tokens
    except torch.OutOfMemoryError:
        ok = False  # the exception (and the frames holding the failed try's tensors) ends here
    finally:
        parallel.set_gradient_sync(model, train_model, True)
        optimizer.zero_grad(set_to_none=True)
        if made:
            clear_state(optimizer)
    gc.collect()
    torch.cuda.empty_cache()
    if torch.distributed.is_initialized():  # one rank out of memory: all take the smaller micro-batch
        flag = torch.tensor(float(ok), device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        ok = bool(flag.item())
    return ok


def gpu_check_projection(c: ModelConfig, seq_len: int, micro_batch: int, accum: int, compiled: bool,
                         knobs: dict, measured_gib: float | None) -> dict:
    """For a benchmarks/gpu_check.py speed row (one process, bf16 on CUDA, TrainConfig `knobs`):
    {"projected_gib", "projection_error"} against its torch.cuda.max_memory_allocated; {} without
    a measurement (the CPU)."""
    if measured_gib is None:
        return {}
    s = Setting(parallel=knobs.get("parallel", "ddp"),
                activation_checkpointing=knobs.get("activation_checkpointing", "none"),
                ac_every=knobs.get("ac_every", 2), micro_batch=micro_batch, world_size=1, accum=accum,
                device="cuda", compiled=compiled)
    found = compare_measured(c, s, seq_len, measured_gib * GiB)
    return {"projected_gib": found["projected_gib"], "projection_error": found["error"]}
