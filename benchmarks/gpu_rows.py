"""The rows of benchmarks/gpu_check.py: what each one measures and how it judges the result.

Each row is a function of the Plan (the shapes and limits the parent fixed) that returns its JSON
line, verdict included; gpu_check.py runs it in a process of its own (`--worker NAME`), and
schedules, times out and reports it. ROWS is the table of them: their device call, their
estimated seconds on a cold H100 and their timeouts. The helpers first are what the rows share.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
FIXTURE = REPO / "tests" / "data" / "hellaswag_sample.jsonl"


# ----------------------------------------------------------------------------- the plan

@dataclass
class Plan:
    """What the rows measure: fixed once by the parent, read by every row's process."""
    device: str  # "cuda" or "cpu"
    model: str  # the measured preset: 1p7b, or tiny in quick/CPU mode
    seq_len: int
    micro_batch: int  # the headline's: TrainConfig's default
    other_micro_batch: int  # the second speed row's (their peaks' slope is the activations)
    long_seq_len: int  # the long-sequence row's, at long_micro_batch (the same tokens per micro-step)
    long_micro_batch: int
    accum: int  # micro-steps per optimizer step: what each GPU of the 8-GPU run takes
    steps: int  # timed optimizer steps after the first (compiling) one
    backend: str  # torch.compile backend
    mem_cap_gib: float  # the speed rows' memory cap, so a bigger card behaves like an 80 GB one
    peak_tflops: float  # 0 = metrics.PEAK_BF16_TFLOPS by device name
    small_seq_len: int  # the tiny model's sequence in the correctness rows
    ddp_model: str
    ddp_layers: int
    ddp_micro_batch: int
    ddp_seq_len: int
    out: str
    cache_dir: str

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def autocast_dtype(self) -> torch.dtype | None:
        # bf16 autocast on CUDA; the CPU runs float32, as train_llama.py does there.
        return torch.bfloat16 if self.cuda else None

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else nullcontext()


def make_plan(args: argparse.Namespace) -> Plan:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py: error: --device=cuda but no CUDA device is visible; drop --device")
    out = Path(args.out).resolve()
    common = dict(mem_cap_gib=args.mem_cap_gib, peak_tflops=args.peak_tflops, out=str(out),
                  cache_dir=str(Path(args.cache_dir).resolve()))
    if device == "cuda" and not args.quick:
        # 1p7b as configs/llama_1p7b.py trains it on 8 GPUs: 16 x 1024 tokens x 4 micro-steps per
        # GPU and optimizer step; MFU over 5 such steps. DDP on the 1p7b shapes with 2 of its 36
        # layers: real buckets, short compile.
        return Plan(device=device, model="1p7b", seq_len=1024, micro_batch=16, other_micro_batch=8,
                    long_seq_len=2048, long_micro_batch=8, accum=4, steps=5, backend=args.backend or "inductor",
                    small_seq_len=256, ddp_model="1p7b", ddp_layers=2, ddp_micro_batch=4, ddp_seq_len=1024, **common)
    if device == "cuda":
        return Plan(device=device, model="tiny", seq_len=256, micro_batch=16, other_micro_batch=8,
                    long_seq_len=512, long_micro_batch=8, accum=4, steps=5, backend=args.backend or "inductor",
                    small_seq_len=256, ddp_model="tiny", ddp_layers=4, ddp_micro_batch=4, ddp_seq_len=256, **common)
    # The CPU smoke run: every path once, at the least work that still accumulates and chunks.
    return Plan(device=device, model="tiny", seq_len=32, micro_batch=4, other_micro_batch=2, long_seq_len=64,
                long_micro_batch=2, accum=2, steps=1, backend=args.backend or "eager", small_seq_len=32,
                ddp_model="tiny", ddp_layers=4, ddp_micro_batch=2, ddp_seq_len=32, **common)


# ----------------------------------------------------------------------------- helpers

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def peak_reserved_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def is_oom(e: BaseException) -> bool:
    # inductor can wrap an allocation failure in its own exception; the message survives.
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def cap_memory(plan: Plan) -> float | None:
    """Cap this process's CUDA allocator at plan.mem_cap_gib when the card has more; the cap or None."""
    if not plan.cuda or plan.mem_cap_gib <= 0:
        return None
    total = torch.cuda.get_device_properties(0).total_memory
    cap = plan.mem_cap_gib * 2**30
    if total <= cap:
        return None
    torch.cuda.set_per_process_memory_fraction(cap / total)
    return plan.mem_cap_gib


def first_line(text: str, limit: int = 200) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[0][:limit] if lines else ""


# The line of a crash's output that names the error: a traceback's last line, the repo's one-line
# errors, a torchrun worker's "[rank0]: ValueError: ..."; not torchrun's own summary after it.
ERROR_LINE = re.compile(r"(Error|Exception|Exit|error)\w*: \S|exited \d+: ")


def error_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return next((line for line in reversed(lines) if ERROR_LINE.search(line)), lines[-1] if lines else "no output")


def make_optimizer(model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """train_llama's AdamW (decay on 2-D weights only; fused on CUDA) with TrainConfig's defaults."""
    from llama_fineweb.train_config import TrainConfig
    from train_llama import build_optimizer

    return build_optimizer(model, TrainConfig(), device)


def wrap_like_training(model: torch.nn.Module, plan: Plan, seq_len: int, d=None, **knobs) -> torch.nn.Module:
    """The training model as train_llama makes it: parallel.parallelize with TrainConfig's defaults
    but `knobs`, compiled on plan.backend. FSDP needs a process group: `d` from setup_distributed
    under torchrun."""
    from llama_fineweb import parallel
    from llama_fineweb.train_config import TrainConfig
    from llama_fineweb.utils import Dist

    cfg = TrainConfig(seq_len=seq_len, compile_cpu=True, **knobs)
    # plan.backend: inductor on CUDA; on the CPU dynamo's "eager", as inductor would build C++ for minutes.
    train_model, _ = parallel.parallelize(model, cfg, d or Dist(device=torch.device(plan.device)),
                                          backend=plan.backend)
    return train_model


def make_batches(vocab_size: int, micro_batch: int, seq_len: int, count: int, device: torch.device,
                 seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` (inputs, targets) pairs of random tokens, made on the device ahead of the timing."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        tokens = torch.randint(0, vocab_size, (micro_batch, seq_len + 1), generator=generator)
        batches.append((tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)))
    return batches


def train_step(train_model, model, optimizer, batches, plan: Plan, sdpa_backend: str = "auto",
               doc_mask: bool = False) -> float:
    """One optimizer step through train_llama.optimizer_step, the step training takes (accumulation
    over `batches`, gradients reduced on the last micro-step only, clip 1.0, AdamW); the mean loss."""
    from train_llama import StepSettings, optimizer_step

    settings = StepSettings(accum_steps=len(batches), autocast_dtype=plan.autocast_dtype(), sdpa_backend=sdpa_backend,
                            doc_mask=doc_mask)
    loss, _, _, _ = optimizer_step(model, train_model, optimizer, batches, settings)
    return loss.item()


def compile_stats() -> dict:
    """What dynamo compiled in this process so far, from its own bookkeeping: frames it compiled
    and skipped (a skipped frame runs eagerly and counts as no graph break: Transformer.forward
    under FSDP did), graph breaks, graphs, recompiles."""
    from torch._dynamo.utils import counters, get_compilation_metrics

    breaks = counters["graph_break"]
    compilations = get_compilation_metrics()
    reasons = [m.recompile_reason for m in compilations if getattr(m, "recompile_reason", None)]
    skipped = [f"{m.co_name} ({Path(m.co_filename or '?').name}:{m.co_firstlineno})" for m in compilations
               if getattr(m, "fail_type", None)]
    return {"frames_compiled": counters["frames"]["ok"],
            "frames_skipped": counters["frames"]["total"] - counters["frames"]["ok"],
            "skipped_frames": skipped[:5], "graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(breaks.values()), "graph_break_reasons": [first_line(r) for r in list(breaks)[:5]],
            "recompiles": len(reasons), "recompile_reasons": [first_line(r) for r in reasons[:5]]}


def compile_verdict(stats: dict) -> str:
    """ok, or a mismatch when dynamo skipped a frame (it ran eagerly though compile was asked for)."""
    counts = (f"{stats['graphs']} graphs, {stats['graph_breaks']} graph breaks, {stats['recompiles']} recompiles, "
              f"{stats['frames_skipped']} frames skipped")
    if stats["frames_skipped"]:
        return f"mismatch: {counts}: {', '.join(stats['skipped_frames']) or '?'}"
    return f"ok: {counts}"


def top_kernels(fn, device: torch.device, n: int = 10) -> list[dict]:
    """The n kernels (CUDA) or operators (CPU) that took the most time during fn()."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    events = prof.key_averages()
    if device.type == "cuda":
        def spent(e):
            return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        kernels = [e for e in events if getattr(e, "device_type", None) == DeviceType.CUDA and spent(e) > 0]
        events = kernels or [e for e in events if spent(e) > 0]
    else:
        def spent(e):
            return e.self_cpu_time_total
    total = sum(spent(e) for e in events) or 1
    ranked = sorted(events, key=spent, reverse=True)[:n]
    return [{"name": e.key[:120], "ms": round(spent(e) / 1000, 3), "calls": e.count,
             "share": round(spent(e) / total, 4)} for e in ranked]


def time_ms(fn, device: torch.device, repeats: int) -> float:
    """Median milliseconds of fn() over `repeats` calls after one warm-up call."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def make_shards(path: Path, tokens_per_shard: int = 50_000) -> Path:
    """Random uint16 shards under build-nanogpt's names: one val shard, then two train shards."""
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, split in enumerate(["val", "train", "train"]):
        tokens = rng.integers(0, 50257, size=tokens_per_shard, dtype=np.uint16)
        np.save(path / f"edufineweb_{split}_{i:06d}.npy", tokens)
    return path


def run_cli(*cmds: list[str]) -> list[str]:
    """Run some of the repo's commands side by side and return their stdouts; if one fails, show
    the end of its output and stop this row with one line saying which and why."""
    running = []
    for cmd in cmds:
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        running.append((cmd, subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=REPO), out, err))
    stdouts = []
    for cmd, proc, out, err in running:
        code = proc.wait()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
        if code != 0:
            sys.stderr.write("\n".join((stdout + stderr).splitlines()[-20:]) + "\n")
            script = next(Path(c).name for c in cmd if c.endswith(".py"))
            raise SystemExit(f"{script} exited {code}: {error_line(stdout + stderr)[:200]}")
        stdouts.append(stdout)
    return stdouts


def torchrun(script: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", script, *args]


def metric_losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) of every logged training step in run_dir/metrics.jsonl, in file order."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


# A train_llama command line for a row: each parameter is one of its flags.
def tiny_train_args(plan: Plan, data_dir: Path, out_dir: Path, seq_len: int, micro_batch: int, accum: int,
                    max_steps: int) -> list[str]:
    return ["train_llama.py", "--config", "configs/tiny.py", "--prepare_local_data=false",
            f"--data_dir={data_dir}", f"--out_dir={out_dir}", f"--seq_len={seq_len}",
            f"--micro_batch={micro_batch}", f"--total_batch_tokens={micro_batch * seq_len * accum}",
            f"--max_steps={max_steps}", "--warmup_steps=2", "--eval_interval=0", "--sample_interval=0",
            "--save_interval=0", f"--device={plan.device}"]


# ----------------------------------------------------------------------------- rows

def row_env(plan: Plan) -> dict:
    """Versions, the card and the peak its MFU uses, the GPT-2 vocabulary, and which SDPA backend
    runs the model's bf16 GQA attention."""
    import tiktoken

    from llama_fineweb import metrics, tokenizer
    from model import model_config

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "cpus": os.cpu_count(), "tiktoken": tiktoken.__version__}
    name = None
    if plan.cuda:
        props = torch.cuda.get_device_properties(0)
        name = torch.cuda.get_device_name(0)
        nccl = torch.cuda.nccl.version()  # a tuple in recent torch, an int in older ones
        info.update(device=name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version(),
                    nccl=".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl))
        try:
            import triton
            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = None
    else:
        info["device"] = f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    peak, note = metrics.peak_flops(name, plan.peak_tflops)
    info.update(peak_tflops=peak / 1e12 if peak else None, peak_note=note)
    try:
        info["gpt2_vocab"] = str(tokenizer.vocab_file("vocab.bpe").parent)
        tokenizer.vocab_file("encoder.json")
    except FileNotFoundError as e:
        info["gpt2_vocab"] = None
        info["gpt2_vocab_error"] = first_line(e)
    info.update(inductor_cache=os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
                cache_files_at_start=sum(1 for _ in Path(plan.cache_dir).rglob("*")),
                alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))
    cfg = model_config(plan.model, max_seq_len=plan.seq_len)
    info["sdpa"] = sdpa_backends(cfg, plan.micro_batch, plan.seq_len, torch.device(plan.device))
    available = [b for b in ("flash_attention", "cudnn_attention", "efficient_attention", "math")
                 if "ms" in info["sdpa"][b]]
    if info["gpt2_vocab"] is None:
        verdict = "warning: no GPT-2 vocabulary, so the hellaswag and recompile rows fail: see benchmarks/README.md"
    elif plan.cuda and peak is None:
        verdict = f"warning: no peak for {name!r}, so MFU is null: pass --peak_tflops"
    else:
        verdict = (f"ok: SDPA runs {', '.join(b.split('_')[0] for b in available)}, picks {info['sdpa']['default']}; "
                   f"{note}; {info['cache_files_at_start']} files in the inductor cache")
    return {**info, "config": f"{info['device']}, torch {torch.__version__}", "verdict": verdict}


def sdpa_backends(cfg, batch: int, seq_len: int, device: torch.device) -> dict:
    """Forward + backward of the model's attention shapes in bf16 with GQA, under each SDPA backend
    alone (ms, or why it refused), and the backend SDPA picks by itself."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    g = torch.Generator().manual_seed(0)
    shape_q = (batch, cfg.n_heads, seq_len, cfg.head_dim)  # (B, n_heads, T, head_dim)
    shape_kv = (batch, cfg.n_kv_heads, seq_len, cfg.head_dim)  # (B, n_kv_heads, T, head_dim)
    q, k, v = (torch.randn(s, generator=g).to(device, torch.bfloat16).requires_grad_()
               for s in (shape_q, shape_kv, shape_kv))

    def fwd_bwd():
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()

    result = {"shape": f"q {list(shape_q)}, kv {list(shape_kv)}, bf16, causal, enable_gqa"}
    for backend in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with sdpa_kernel(getattr(SDPBackend, backend)):
                    result[backend.lower()] = {"ms": round(time_ms(fwd_bwd, device, 5), 3)}
            except (RuntimeError, NotImplementedError) as e:
                # SDPA says why a backend refused in warnings; the error itself only says none ran.
                why = "; ".join(dict.fromkeys(first_line(w.message) for w in caught))
                result[backend.lower()] = {"error": (why or first_line(e))[:300]}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fwd_bwd()
        sync(device)
    ops = {e.key for e in prof.key_averages()}
    picked = [name for op, name in (("_scaled_dot_product_flash_attention", "flash"),
                                    ("_scaled_dot_product_efficient_attention", "efficient"),
                                    ("_scaled_dot_product_cudnn_attention", "cudnn"),
                                    ("_scaled_dot_product_attention_math", "math"))
              if any(o.startswith("aten::" + op) for o in ops)]
    result["default"] = "+".join(picked) or "unknown"
    return result


def row_speed(plan: Plan, micro_batch: int, compiled: bool, seq_len: int | None = None, profile: bool = False,
              **knobs) -> dict:
    """Optimizer steps of the measured model (plan.accum micro-steps, clip, fused AdamW) through
    train_llama.optimizer_step at one micro-batch, wrapped as train_llama wraps it with the
    TrainConfig `knobs` (parallel, activation_checkpointing, ac_every, compile_mode): tokens/s and
    MFU over plan.steps steps after the first, peak memory allocated and reserved, compile time,
    what dynamo compiled and skipped, the top kernels. FSDP applies under torchrun only (one
    rank: NCCL on CUDA, gloo on CPU). A frame dynamo skipped is a mismatch."""
    from llama_fineweb import metrics, parallel, planner
    from llama_fineweb.train_config import TrainConfig
    from llama_fineweb.utils import setup_distributed, teardown_distributed
    from model import build_model, model_config

    seq_len = seq_len or plan.seq_len
    d = setup_distributed(plan.device)
    device = d.device
    if plan.cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cap = cap_memory(plan)
    cfg = model_config(plan.model, max_seq_len=seq_len)
    mode = parallel.compile_mode(TrainConfig(compile=compiled, compile_cpu=True, **knobs), d)
    how = f"compiled {mode} ({plan.backend})" if compiled else "eager"
    flags = "".join(f" --{k}={v}" for k, v in knobs.items() if k != "compile_mode")
    result = {"config": f"{plan.model} {how}{flags}, seq {seq_len} x {plan.accum} accum"
                        + (f", cap {cap:g} GiB" if cap else ""), "micro_batch": micro_batch, "seq_len": seq_len,
              "compile_mode": mode}
    try:
        torch.manual_seed(0)
        model = build_model(cfg, device)
        train_model = wrap_like_training(model, plan, seq_len, d, compile=compiled, **knobs)
        optimizer = make_optimizer(model, device)  # after wrapping: FSDP replaces parameters by shards
        batches = make_batches(cfg.vocab_size, micro_batch, seq_len, plan.accum, device)

        def step():
            return train_step(train_model, model, optimizer, batches, plan)

        t0 = time.perf_counter()
        step()
        first_step_s = time.perf_counter() - t0
        # The peaks after the first step: the optimizer state exists, compilation's memory is gone.
        reset_peak(device)
        times, loss = [], None
        for _ in range(plan.steps):
            t0 = time.perf_counter()
            loss = step()
            times.append(time.perf_counter() - t0)
        peak, reserved = peak_gib(device), peak_reserved_gib(device)
        # On the CPU, where a profiled step takes seconds, the headline alone covers the profiler.
        kernels = top_kernels(step, device) if plan.cuda or profile else []
    except Exception as e:  # an OOM is this row's answer; anything else is a crash
        if not is_oom(e):
            raise
        return {**result, "peak_gib": peak_gib(device), "peak_reserved_gib": peak_reserved_gib(device),
                "verdict": "out of memory", "error": first_line(e)}
    finally:
        teardown_distributed()
    step_s = statistics.median(times)
    tokens_per_s = micro_batch * seq_len * plan.accum / step_s
    flops, note = metrics.peak_flops(torch.cuda.get_device_name(device) if plan.cuda else None, plan.peak_tflops)
    flops_per_token = metrics.flops_per_token(model, seq_len)
    mfu = flops_per_token * tokens_per_s / flops if flops else None
    stats = compile_stats() if compiled else {}
    verdict = compile_verdict(stats) if compiled else "ok"
    if not np.isfinite(loss):
        verdict = f"mismatch: loss {loss}"
    return {**result, "tokens_per_s": tokens_per_s, "mfu": mfu, "mfu_note": note, "flops_per_token": flops_per_token,
            "peak_gib": peak, "peak_reserved_gib": reserved, "ms_per_step": step_s * 1000,
            "step_ms_all": [t * 1000 for t in times], "steps_timed": len(times), "first_step_s": first_step_s,
            "compile_s": first_step_s - step_s if compiled else None, "loss": loss, "n_params": model.num_params(),
            "tokens_per_step": micro_batch * seq_len * plan.accum, "sharded": parallel.is_sharded(model),
            **planner.gpu_check_projection(cfg, seq_len, micro_batch, plan.accum, compiled, knobs, peak),
            **stats, "top_kernels": kernels, "verdict": verdict}


def row_attention(plan: Plan) -> dict:
    """The model's training step (eager, so that no backend waits on a compile; one micro-step)
    under each SDPA backend that --sdpa_backend offers, at seq_len x micro_batch and at
    long_seq_len x long_micro_batch (the same tokens): ms per step, and the attention op the
    profiler saw run, so that a backend which was not used cannot pass for one that was."""
    from torch.profiler import ProfilerActivity, profile

    from model import build_model, model_config

    device = torch.device(plan.device)
    if plan.cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    cap = cap_memory(plan)
    # Eager keeps every activation a compiled step frees: half the headline's micro-batch fits.
    shapes = [(plan.seq_len, max(1, plan.micro_batch // 2)), (plan.long_seq_len, max(1, plan.long_micro_batch // 2))]
    torch.manual_seed(0)
    model = build_model(model_config(plan.model, max_seq_len=plan.long_seq_len), device)
    optimizer = make_optimizer(model, device)
    report: dict[str, dict] = {}
    for seq_len, micro_batch in shapes:
        batches = make_batches(model.config.vocab_size, micro_batch, seq_len, 1, device)
        for backend in ("flash", "cudnn", "efficient", "math" if not plan.cuda else None):
            if backend is None:
                continue
            key = f"{backend}_seq{seq_len}_mb{micro_batch}"
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    ms = time_ms(lambda: train_step(model, model, optimizer, batches, plan, backend), device,
                                 plan.steps)
                    with profile(activities=[ProfilerActivity.CPU]) as prof:
                        train_step(model, model, optimizer, batches, plan, backend)
                        sync(device)
                    ops = sorted({e.key.removeprefix("aten::_scaled_dot_product_") for e in prof.key_averages()
                                  if e.key.startswith("aten::_scaled_dot_product_")})
                    report[key] = {"ms": ms, "ops": ops}
                except Exception as e:  # a backend that refuses the shape (or the card): that is its answer
                    # SDPA says why a backend refused in warnings; the error itself only says none ran.
                    why = "; ".join(dict.fromkeys(first_line(w.message) for w in caught
                                                  if "sdp" in str(w.message).lower()))
                    report[key] = {"error": ("out of memory: " if is_oom(e) else "") + (why or first_line(e))[:300]}
                optimizer.zero_grad(set_to_none=True)
                if plan.cuda:
                    torch.cuda.empty_cache()
    ran = {k: v for k, v in report.items() if "ms" in v}
    wrong = [k for k, v in ran.items() if not any(k.split("_")[0] in op for op in v["ops"])]
    parts = []
    for seq_len, micro_batch in shapes:
        times = [f"{k.split('_')[0]} {v['ms']:.0f}" for k, v in ran.items()
                 if k.endswith(f"_seq{seq_len}_mb{micro_batch}")]
        parts.append(f"seq {seq_len}: " + (", ".join(times) or "none ran") + " ms")
    summary = "; ".join(parts)
    if wrong:
        verdict = f"mismatch: {', '.join(wrong)} ran another kernel ({summary})"
    elif not any(k.startswith("flash") for k in ran):
        verdict = f"failed: flash attention ran at no shape ({summary})"
    else:
        verdict = f"ok: {summary}"
    return {"config": f"{plan.model} eager step, 1 micro-step, per SDPA backend"
                      + (f", cap {cap:g} GiB" if cap else ""),
            "variants": report, "verdict": verdict}


def row_doc_mask(plan: Plan) -> dict:
    """The compiled training step at the default micro-batch with --doc_mask and without, on the same
    batches of ~700-token documents (FineWeb-Edu's order of size), timed alternately in one process:
    what document-aware attention costs (flex_attention on CUDA, a dense SDPA mask on the CPU)."""
    from llama_fineweb.tokenizer import EOT
    from llama_fineweb.utils import Dist
    from model import build_model, model_config

    device, micro_batch = torch.device(plan.device), plan.micro_batch
    cfg = model_config(plan.model, max_seq_len=plan.seq_len)
    torch.manual_seed(0)
    model = build_model(cfg, device)
    train_model = wrap_like_training(model, plan, plan.seq_len, Dist(device=device), compile=True)
    optimizer = make_optimizer(model, device)
    batches = make_batches(cfg.vocab_size, micro_batch, plan.seq_len, plan.accum, device)
    generator = torch.Generator().manual_seed(1)
    for x, _ in batches:  # documents begin at EOT; their lengths exponential around 700 tokens
        starts = torch.rand(x.shape, generator=generator) < 1 / min(700, plan.seq_len // 4)
        x[starts.to(device)] = EOT

    def step(with_mask: bool) -> float:  # the mask built per micro-batch, as training builds it
        return train_step(train_model, model, optimizer, batches, plan, doc_mask=with_mask)

    first = {}
    for with_mask in (False, True):  # compiles each graph
        t0 = time.perf_counter()
        step(with_mask)
        first[with_mask] = time.perf_counter() - t0
    times, losses = {False: [], True: []}, {}
    for _ in range(plan.steps + 1):
        for with_mask in (False, True):
            t0 = time.perf_counter()
            losses[with_mask] = step(with_mask)
            sync(device)
            times[with_mask].append(time.perf_counter() - t0)
    plain, doc = (statistics.median(times[m]) * 1000 for m in (False, True))
    finite = all(np.isfinite(v) for v in losses.values())
    return {"config": f"{plan.model} compiled ({plan.backend}), --doc_mask vs without, seq {plan.seq_len} x "
                      f"{plan.accum} accum", "micro_batch": micro_batch, "ms_per_step": doc, "ms_per_step_plain": plain,
            "ratio": doc / plain, "tokens_per_s": micro_batch * plan.seq_len * plan.accum / doc * 1000,
            "first_step_s": first[True], "first_step_s_plain": first[False], "peak_gib": peak_gib(device),
            "verdict": f"ok: {doc / plain:.2f}x the plain step" if finite else f"mismatch: losses {losses}"}


def row_muon(plan: Plan) -> dict:
    """The compiled training step with --optimizer=muon and with AdamW, on the same model and batches,
    timed alternately in one process, and each optimizer's step alone on fixed gradients: what
    Muon's Newton-Schulz costs per step at the measured preset (bf16 matmuls of each block matrix)."""
    from llama_fineweb.step import build_optimizer
    from llama_fineweb.train_config import TrainConfig
    from llama_fineweb.utils import Dist
    from model import build_model, model_config

    device, micro_batch = torch.device(plan.device), plan.micro_batch
    cfg = model_config(plan.model, max_seq_len=plan.seq_len)
    torch.manual_seed(0)
    model = build_model(cfg, device)
    train_model = wrap_like_training(model, plan, plan.seq_len, Dist(device=device), compile=True,
                                     compile_mode="blocks")
    optimizers = {name: build_optimizer(model, TrainConfig(optimizer=name), device) for name in ("adamw", "muon")}
    batches = make_batches(cfg.vocab_size, micro_batch, plan.seq_len, plan.accum, device)
    for name in optimizers:  # compiles, and makes each optimizer's state
        train_step(train_model, model, optimizers[name], batches, plan)
    times, losses = {name: [] for name in optimizers}, {}
    for _ in range(plan.steps):
        for name, optimizer in optimizers.items():
            t0 = time.perf_counter()
            losses[name] = train_step(train_model, model, optimizer, batches, plan)
            sync(device)
            times[name].append(time.perf_counter() - t0)
    grads = [torch.randn_like(p) * 1e-3 for p in model.parameters()]

    def optimizer_only(optimizer):
        def fn():
            for p, g in zip(model.parameters(), grads):
                p.grad = g
            optimizer.step()
        return fn

    alone = {name: time_ms(optimizer_only(optimizer), device, plan.steps) for name, optimizer in optimizers.items()}
    step = {name: statistics.median(t) * 1000 for name, t in times.items()}
    finite = all(np.isfinite(v) for v in losses.values())
    ratio = step["muon"] / step["adamw"]
    return {"config": f"{plan.model} compiled per block, --optimizer=muon vs adamw, seq {plan.seq_len} x "
                      f"{plan.accum} accum", "micro_batch": micro_batch, "ms_per_step": step["muon"],
            "ms_per_step_adamw": step["adamw"], "ratio": ratio, "optimizer_ms": alone,
            "newton_schulz_ms": alone["muon"] - alone["adamw"],
            "tokens_per_s": micro_batch * plan.seq_len * plan.accum / step["muon"] * 1000, "peak_gib": peak_gib(device),
            "verdict": f"ok: {ratio:.2f}x AdamW's step" if finite else f"mismatch: losses {losses}"}


def row_train_llama(plan: Plan) -> dict:
    """The real script's --benchmark path (synthetic tokens, nothing written), as a user runs it,
    at the headline's shape and compile mode: the same graph, loaded from the inductor cache."""
    mb = plan.micro_batch
    config = "configs/llama_1p7b.py" if plan.model == "1p7b" else "configs/tiny.py"
    # HellaSwag off: the benchmark never evaluates, and its data may not be on this machine.
    args = ["--config", config, f"--benchmark={8 if plan.model == '1p7b' else 3}", f"--seq_len={plan.seq_len}",
            f"--micro_batch={mb}", f"--total_batch_tokens={mb * plan.seq_len * plan.accum}", "--compile_mode=blocks",
            f"--device={plan.device}", "--hellaswag_interval=0", f"--out_dir={Path(plan.out) / 'train_llama'}"]
    if plan.peak_tflops:
        args.append(f"--peak_tflops={plan.peak_tflops}")
    [stdout] = run_cli([sys.executable, "train_llama.py", *args])
    bench = parse_benchmark(stdout)
    first = bench.get("first_step_s")
    ms = bench.get("ms_per_step")
    peak = bench.get("peak_mem_gib")
    verdict = "ok"
    if peak is not None and plan.mem_cap_gib and peak > plan.mem_cap_gib:
        verdict = f"warning: peak {peak:.1f} GiB is above an 80 GB card's {plan.mem_cap_gib:g} GiB"
    compiled = plan.cuda  # train_llama compiles on CUDA only, unless --compile_cpu
    return {"config": f"train_llama.py --config {Path(config).name}, no cap", "micro_batch": mb,
            "tokens_per_s": bench.get("tokens_per_s"), "mfu": bench.get("mfu"), "peak_gib": peak,
            "ms_per_step": ms, "first_step_s": first,
            "compile_s": first - ms / 1000 if compiled and first is not None and ms is not None else None,
            "benchmark": bench, "command": " ".join(["python train_llama.py", *args]), "verdict": verdict}


def parse_benchmark(stdout: str) -> dict:
    """train_llama's result: its `benchmark_json: {...}` line, else the older `benchmark: ...` line."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("benchmark_json:"):
            return json.loads(line.partition(":")[2])
    m = re.search(r"benchmark: ([\d,.]+) tokens/s \| MFU (?:([\d.]+)%|-)[^|]*\| ([\d.]+) ms/step \| "
                  r"peak memory (?:([\d.]+) GiB|-)", stdout)
    if m is None:
        raise SystemExit("train_llama.py printed neither a 'benchmark_json:' nor a 'benchmark:' line")
    return {"tokens_per_s": float(m[1].replace(",", "")), "mfu": float(m[2]) / 100 if m[2] else None,
            "ms_per_step": float(m[3]), "peak_mem_gib": float(m[4]) if m[4] else None}


def row_ddp(plan: Plan) -> dict:
    """Under torchrun (one rank; NCCL on CUDA, gloo on CPU): DDP around the compiled model, as
    train_llama wraps it, trains the same steps as the plain eager model with the same losses."""
    from llama_fineweb import parallel
    from llama_fineweb.train_config import TrainConfig
    from llama_fineweb.utils import setup_distributed, teardown_distributed
    from model import build_model, model_config

    d = setup_distributed(plan.device)  # NCCL on CUDA, gloo on the CPU, as train_llama sets it up
    device = d.device
    try:
        cfg = model_config(plan.ddp_model, n_layers=plan.ddp_layers, max_seq_len=plan.ddp_seq_len)
        steps, accum = 3, 2
        batches = make_batches(cfg.vocab_size, plan.ddp_micro_batch, plan.ddp_seq_len, steps * accum, device)
        losses, seconds = {}, {}
        for variant in ("eager", "ddp_compiled"):
            torch.manual_seed(0)
            model = build_model(cfg, device)
            optimizer = make_optimizer(model, device)
            train_model = model
            if variant == "ddp_compiled":
                # train_llama skips DDP on one process; here it wraps anyway, the way it does on many.
                compiled = wrap_like_training(model, plan, plan.ddp_seq_len, d)
                train_model = parallel.replicate(compiled, TrainConfig(seq_len=plan.ddp_seq_len), d)
            t0 = time.perf_counter()
            losses[variant] = [train_step(train_model, model, optimizer, batches[s * accum:(s + 1) * accum], plan)
                               for s in range(steps)]
            seconds[variant] = time.perf_counter() - t0
            del model, optimizer, train_model
        stats = compile_stats()
    finally:
        teardown_distributed()
    diff = max(abs(a - b) for a, b in zip(losses["eager"], losses["ddp_compiled"], strict=True))
    # float32 on CPU agrees to rounding; on CUDA, bf16 autocast with kernels fused differently does not.
    tol = 2e-2 if plan.cuda else 1e-4
    # DDP's optimizer splits the whole-model graph at its bucket boundaries: `graphs` counts them.
    verdict = compile_verdict(stats)
    if diff > tol:
        verdict = f"mismatch: losses differ from eager by {diff:.2e} (> {tol:g})"
    elif verdict.startswith("ok"):
        verdict = f"ok: |loss - eager| <= {diff:.1e}, " + verdict.removeprefix("ok: ")
    return {"config": f"{plan.ddp_model} {plan.ddp_layers} layers, DDP(compile model), torchrun 1 x "
                      f"{'nccl' if plan.cuda else 'gloo'}",
            "micro_batch": plan.ddp_micro_batch, "losses": losses, "seconds_per_variant": seconds,
            "max_loss_diff": diff, "tolerance": tol, **stats, "verdict": verdict}


def row_loss(plan: Plan) -> dict:
    """The chunked loss against compiled F.cross_entropy on the full logits, both checked against a
    float32 reference: time of forward + backward, peak memory above the inputs, gradient error."""
    from model import chunked_cross_entropy, model_config

    device = torch.device(plan.device)
    cfg = model_config(plan.model)
    n = plan.micro_batch * plan.seq_len  # the rows of one micro-batch
    chunk = min(cfg.loss_chunk_size, n // 4)
    g = torch.Generator().manual_seed(0)
    h0 = torch.randn(n, cfg.dim, generator=g).to(device)  # like the final norm's output: unit RMS
    w0 = (torch.randn(cfg.vocab_size, cfg.dim, generator=g) * cfg.init_std).to(device)
    targets = torch.randint(0, 50257, (n,), generator=g).to(device)

    def grads(fn, autocast):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        with autocast:
            loss = fn(h, w, targets)
        loss.backward()
        return loss.detach().float(), h.grad, w.grad

    if plan.cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # a true float32 reference
    ref = grads(lambda h, w, t: F.cross_entropy(h @ w.t(), t), nullcontext())
    if plan.cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    variants = {
        "chunked": torch.compile(lambda h, w, t: chunked_cross_entropy(h, w, t, chunk), backend=plan.backend),
        "full_ce": torch.compile(lambda h, w, t: F.cross_entropy(F.linear(h, w), t), backend=plan.backend),
    }
    report = {}
    for name, fn in variants.items():
        t0 = time.perf_counter()
        loss, grad_h, grad_w = grads(fn, plan.autocast())
        sync(device)
        first_s = time.perf_counter() - t0
        ms = time_ms(lambda fn=fn: grads(fn, plan.autocast()), device, plan.steps + 2)
        reset_peak(device)
        base = torch.cuda.memory_allocated(device) if plan.cuda else 0
        grads(fn, plan.autocast())
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30 if plan.cuda else None
        report[name] = {
            "ms": ms, "first_s": first_s, "peak_gib": peak,
            "loss_err": abs(loss - ref[0]).item(),
            "grad_h_err": ((grad_h - ref[1]).abs().max() / ref[1].abs().max()).item(),
            "grad_w_err": ((grad_w - ref[2]).abs().max() / ref[2].abs().max()).item()}
    ours, theirs = report["chunked"], report["full_ce"]
    err_ours = max(ours["grad_h_err"], ours["grad_w_err"])
    err_theirs = max(theirs["grad_h_err"], theirs["grad_w_err"])
    def mem(r: dict) -> str:
        return f", {r['peak_gib']:.2f} GiB" if r["peak_gib"] is not None else ""

    summary = (f"chunked {ours['ms']:.1f} ms{mem(ours)}, grad err {err_ours:.1e} | "
               f"full CE {theirs['ms']:.1f} ms{mem(theirs)}, grad err {err_theirs:.1e}")
    # Both round through the same bf16 matmuls; chunking must not add error of its own.
    verdict = f"ok: {summary}" if err_ours <= 2 * max(err_theirs, 1e-4) else f"mismatch: {summary}"
    return {"config": f"loss {n} rows x {cfg.dim} -> {cfg.vocab_size}, chunk {chunk}",
            "micro_batch": plan.micro_batch, "tokens_per_s": n / (ours["ms"] / 1000),
            "peak_gib": ours["peak_gib"], "ms_per_step": ours["ms"],
            "compile_s": ours["first_s"] - ours["ms"] / 1000, "variants": report, "verdict": verdict}


def row_save_async(plan: Plan) -> dict:
    """The seconds the loop is blocked by one save of the model's whole state (weights and AdamW
    moments, float32): synchronous checkpoint.save vs --async_save (staged in pinned memory), side
    by side (bench_checkpoint.blocked_seconds); the disk is the machine's local one."""
    from bench_checkpoint import blocked_seconds  # noqa: PLC0415 - a script beside this one, not a package

    device = torch.device(plan.device)
    Path(plan.out).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=plan.out) as tmp:
        result = blocked_seconds(plan.model, device, tmp, rounds=1)
    verdict = (f"ok: async blocks {result['async_blocked_s']:.2f}s vs sync {result['sync_s']:.2f}s "
               f"({result['ratio']:.1f}x less)" if result["async_blocked_s"] < result["sync_s"] else
               f"warning: async blocks {result['async_blocked_s']:.2f}s, not less than sync {result['sync_s']:.2f}s")
    return {"config": f"{plan.model} state ({result['state_gb']:.1f} GB) on {device}", **result, "verdict": verdict}


def row_resume(plan: Plan) -> dict:
    """Under torchrun: N steps straight vs N/2 steps, save, stop, resume for the rest; same losses."""
    work = Path(plan.out) / "resume"
    shutil.rmtree(work, ignore_errors=True)
    data = make_shards(work / "data")
    steps = 6 if plan.cuda else 4
    seq_len, micro_batch, accum = plan.small_seq_len, 4, 2

    def args(out_dir: Path, *extra: str) -> list[str]:
        return [*tiny_train_args(plan, data, out_dir, seq_len, micro_batch, accum, steps), *extra]

    t0 = time.perf_counter()
    run_cli(torchrun(*args(work / "straight")), torchrun(*args(work / "split", f"--stop_step={steps // 2}")))
    run_cli(torchrun(*args(work / "split")))
    seconds = time.perf_counter() - t0
    straight, split = metric_losses(work / "straight"), metric_losses(work / "split")
    tol = 1e-3 if plan.cuda else 0.0  # CPU is bitwise; CUDA's atomics may differ in the last bits
    config = f"tiny, torchrun 1 x {'nccl' if plan.cuda else 'gloo'}, {steps} steps vs {steps // 2} + resume"
    logged = [s for s, _ in split]
    if logged != list(range(1, steps + 1)):
        # A resume that restarted from step 0 logs the first steps twice.
        return {"config": config, "steps_logged": logged,
                "verdict": f"mismatch: the split run logged steps {logged}, not 1-{steps} once each"}
    if [s for s, _ in straight] != logged:
        return {"config": config, "verdict": f"mismatch: the straight run logged steps {[s for s, _ in straight]}"}
    diff = max(abs(a - b) for (_, a), (_, b) in zip(straight, split, strict=True))
    verdict = (f"ok: max |loss diff| {diff:.1e}" if diff <= tol
               else f"mismatch: losses differ by {diff:.2e} (> {tol:g})")
    return {"config": config, "micro_batch": micro_batch, "straight": straight, "resumed": split,
            "max_loss_diff": diff, "seconds_all_runs": seconds, "verdict": verdict}


def row_generate(plan: Plan) -> dict:
    """benchmarks/bench_generate.py: greedy decoding tokens/s of our eager decode, our compiled decode
    (one graph over a static KV cache; CUDA graphs on a GPU) and transformers' generate on our own
    export of the same weights. On CUDA the measured preset; on the CPU the tiny model, 8 tokens,
    dynamo's eager backend (a smoke run). Every way must produce the eager decode's tokens."""
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_generate", REPO / "benchmarks" / "bench_generate.py")
    bench_generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_generate)
    args = argparse.Namespace(model=plan.model, prompt_tokens=32, new_tokens=128 if plan.cuda else 8,
                              repeats=3 if plan.cuda else 1, device=plan.device, dtype=None,
                              backend="inductor" if plan.cuda else "eager")
    result = bench_generate.bench(args)
    speeds, ratio = result["tokens_per_s"], result["compiled_vs_eager"]
    summary = (f"tokens/s eager {speeds['ours_eager']:,.1f}, compiled {speeds['ours_compiled']:,.1f}, "
               f"transformers {speeds['transformers']:,.1f}; compiled {ratio:.2f}x eager")
    wrong = [name for name, same in result["match"].items() if not same]
    if wrong:
        verdict = f"mismatch: {', '.join(wrong)} decoded other tokens ({summary})"
    elif plan.cuda and ratio < 2:
        verdict = f"ok, below the 2x target: {summary}"
    else:
        verdict = f"ok: {summary}"
    return {"config": f"{plan.model} greedy decode, 32 + {args.new_tokens} tokens, {result['dtype']}",
            "tokens_per_s": speeds["ours_compiled"], "compile_s": result["compile_s"], "generate": result,
            "verdict": verdict}


def row_hellaswag(plan: Plan) -> dict:
    """hellaswag.py on the test fixture with a checkpoint freshly saved by train_llama.py: eager,
    and on CUDA also --compile (on CPU inductor's C++ build would take most of the smoke run)."""
    work = Path(plan.out) / "hellaswag"
    shutil.rmtree(work, ignore_errors=True)
    data = make_shards(work / "data")
    run_dir = work / "run"
    # One step and a save: seq 256 leaves HellaSwag's contexts room on the tiny model.
    run_cli([sys.executable, *tiny_train_args(plan, data, run_dir, 256, 2, 1, 1), "--compile=false"])
    n_expected = sum(1 for line in FIXTURE.read_text().splitlines() if line.strip())
    if not plan.cuda:
        n_expected = 8  # a quarter of the fixture keeps the CPU smoke run short
    limit = [] if plan.cuda else ["--limit", str(n_expected)]
    modes = ["eager", "compiled"] if plan.cuda else ["eager"]
    results = {}
    for mode in modes:
        out = work / f"{mode}.json"
        run_cli([sys.executable, "hellaswag.py", "--checkpoint", str(run_dir), "--data", str(FIXTURE),
                 "--device", plan.device, "--out", str(out), *limit, *(["--compile"] if mode == "compiled" else [])])
        results[mode] = json.loads(out.read_text())
    bad = [m for m in modes if results[m]["n"] != n_expected]
    first = results[modes[0]]
    summary = f"acc {first['acc']:.3f} acc_norm {first['acc_norm']:.3f} on {first['n']}"
    if "compiled" in results:
        same = all(results["compiled"][k] == first[k] for k in ("acc", "acc_norm"))
        summary += f"; compiled {'same' if same else 'differs: acc ' + format(results['compiled']['acc'], '.3f')}"
    verdict = (f"mismatch: scored {[results[m]['n'] for m in bad]} of {n_expected} examples" if bad
               else f"ok: {summary}")
    compile_s = results["compiled"]["seconds"] - first["seconds"] if "compiled" in results else None
    return {"config": f"hellaswag.py {'eager, --compile' if plan.cuda else 'eager'}, tiny ckpt, fixture",
            "results": results, "compile_s": compile_s, "verdict": verdict}


def row_recompile(plan: Plan) -> dict:
    """In one process, as in training: a compiled train step, a validation pass (no_grad, targets),
    a HellaSwag call (logits, other shapes), then a train step again, which must not recompile."""
    import torch._dynamo.config as dynamo_config
    from torch._dynamo.utils import counters, get_compilation_metrics

    import hellaswag
    from model import build_model, model_config

    device = torch.device(plan.device)
    cfg = model_config("tiny", max_seq_len=256)
    torch.manual_seed(0)
    model = build_model(cfg, device)
    optimizer = make_optimizer(model, device)
    compiled = wrap_like_training(model, plan, plan.small_seq_len)
    batches = make_batches(cfg.vocab_size, 4, plan.small_seq_len, 2, device)

    def frames() -> int:
        return counters["frames"]["ok"]

    train_step(compiled, model, optimizer, batches, plan)
    after = {"train": frames()}
    with torch.no_grad(), plan.autocast():
        for x, y in batches:
            compiled(x, y)
    after["validation"] = frames()
    examples = hellaswag.load_examples(str(FIXTURE), limit=None if plan.cuda else 8)
    hellaswag.evaluate(compiled, examples, device, batch_size=4,
                       autocast_dtype=torch.bfloat16 if plan.cuda else None, progress=False)
    after["hellaswag"] = frames()
    before_metrics = len(get_compilation_metrics())
    train_step(compiled, model, optimizer, batches, plan)
    after["train_again"] = frames()
    new = after["train_again"] - after["hellaswag"]
    reasons = [first_line(getattr(m, "recompile_reason", "") or "")
               for m in get_compilation_metrics()[before_metrics:]]
    limit = getattr(dynamo_config, "recompile_limit", getattr(dynamo_config, "cache_size_limit", None))
    counts = (f"graphs: train {after['train']}, +validation {after['validation'] - after['train']}, "
              f"+hellaswag {after['hellaswag'] - after['validation']}")
    if new:
        verdict = f"mismatch: the train step after eval recompiled {new}x: {reasons[0] if reasons else '?'}"
    elif limit is not None and after["hellaswag"] >= limit:
        verdict = f"warning: {after['hellaswag']} graphs reach dynamo's recompile limit {limit}"
    else:
        verdict = f"ok: no recompile after eval ({counts})"
    return {"config": "tiny compiled: train, val, hellaswag, train",
            "micro_batch": 4, "frames_after": after, "recompile_limit": limit, "new_reasons": reasons,
            **compile_stats(), "verdict": verdict}


@dataclass
class Row:
    run: object  # fn(plan) -> dict
    doc: str
    call: int  # 1: the first device call (the headline); 2: the second
    cold_s: float  # estimated seconds on a cold H100 (process start and compile included): the plan's time model
    timeout_s: float = 300  # this row's limit on CUDA (--timeout overrides every row's)
    torchrun: bool = False  # launched under torchrun --nproc_per_node=1
    beside_others: bool = False  # a correctness row: may share the machine with other such rows


HEADLINE = "blocks_mb16"

# In the order they run. The estimates (cold_s) are not measurements: no row has run on a GPU yet.
# They assume ~45-60 s for inductor's cold compile of one block graph (forward and backward) on a
# 16-core machine, ~15 s of process start and CUDA set-up, and steps at ~40% MFU. On CUDA a row
# that the budget left cannot hold by its estimate is skipped and the next one tried; results.jsonl's
# `seconds` replace the estimates after the first GPU run. By them, all rows take more than two calls:
# each call puts first what matters most, and a row it skipped is run later with --rows.
ROWS: dict[str, Row] = {
    # ---- call 1: the headline first, with nothing before it but the environment
    "env": Row(row_env, "versions, card, peak FLOP/s, GPT-2 vocabulary, which SDPA backends run bf16 GQA",
               call=1, cold_s=30, timeout_s=120),
    HEADLINE: Row(lambda plan: row_speed(plan, plan.micro_batch, compiled=True, profile=True, compile_mode="blocks"),
                  "THE HEADLINE: 1p7b compiled per block, default micro-batch, 4 micro-steps, MFU over 5 steps",
                  call=1, cold_s=120, timeout_s=420),
    "train_llama": Row(row_train_llama, "train_llama.py --benchmark, the real script, the headline's shape",
                       call=1, cold_s=60, timeout_s=240),
    "loss": Row(row_loss, "chunked loss vs compiled F.cross_entropy on full logits", call=1, cold_s=40,
                timeout_s=180),
    "blocks_mb8": Row(lambda plan: row_speed(plan, plan.other_micro_batch, compiled=True, compile_mode="blocks"),
                      "the headline at the other micro-batch (with it: activation memory per sample)",
                      call=1, cold_s=100),
    "eager_mb8": Row(lambda plan: row_speed(plan, plan.other_micro_batch, compiled=False),
                     "eager training step at the other micro-batch", call=1, cold_s=40),
    # ---- call 2: the rest, most wanted first
    "seq2048_mb8": Row(lambda plan: row_speed(plan, plan.long_micro_batch, compiled=True, compile_mode="blocks",
                                              seq_len=plan.long_seq_len),
                       "the headline at seq 2048, micro-batch 8 (the same tokens per micro-step)", call=2, cold_s=100),
    "fsdp_mb16": Row(lambda plan: row_speed(plan, plan.micro_batch, compiled=True, parallel="fsdp"),
                     "FSDP2 (torchrun, one rank), compiled per block; a frame dynamo skips is a mismatch",
                     call=2, cold_s=110, torchrun=True),
    "attention": Row(row_attention, "the model's step under each SDPA backend (flash, cudnn, efficient), seq 1024 "
                                    "and 2048", call=2, cold_s=60),
    "ddp": Row(row_ddp, "DDP around the whole-model compile, torchrun one rank (NCCL): losses vs eager, graph splits",
               call=2, cold_s=80, torchrun=True),
    "ac_full_mb32": Row(lambda plan: row_speed(plan, 2 * plan.micro_batch, compiled=True, compile_mode="blocks",
                                               activation_checkpointing="full"),
                        "compiled per block, every block checkpointed, at twice the default micro-batch",
                        call=2, cold_s=110),
    "ac_selective_mb16": Row(lambda plan: row_speed(plan, plan.micro_batch, compiled=True, compile_mode="blocks",
                                                    activation_checkpointing="selective", ac_every=2),
                             "compiled per block, every 2nd block checkpointed, default micro-batch",
                             call=2, cold_s=110),
    "model_mb16": Row(lambda plan: row_speed(plan, plan.micro_batch, compiled=True, compile_mode="model"),
                      "the headline with whole-model compile (train_llama's default --compile_mode=model)",
                      call=2, cold_s=300, timeout_s=480),
    "resume": Row(row_resume, "train_llama save/stop/resume under torchrun vs straight", call=2, cold_s=90,
                  beside_others=True),
    "doc_mask_mb16": Row(row_doc_mask, "compiled step with --doc_mask vs without (flex_attention on CUDA)",
                         call=2, cold_s=150),
    "muon_mb16": Row(row_muon, "compiled step with --optimizer=muon vs adamw, and the optimizer steps alone",
                     call=2, cold_s=150),
    "hellaswag": Row(row_hellaswag, "hellaswag.py (--compile on CUDA) on the fixture, fresh checkpoint",
                     call=2, cold_s=90, beside_others=True),
    "recompile": Row(row_recompile, "no recompile of the train step after validation and HellaSwag",
                     call=2, cold_s=60, beside_others=True),
    "generate": Row(row_generate, "greedy decode: ours eager vs compiled (static KV cache) vs transformers",
                    call=2, cold_s=120),
    "save_async": Row(row_save_async, "loop-blocked seconds per save of the 1p7b state: sync vs --async_save",
                      call=2, cold_s=150, timeout_s=480),
}
CALLS = {1: [n for n, r in ROWS.items() if r.call == 1], 2: [n for n, r in ROWS.items() if r.call == 2]}
DERIVED = "activations"  # computed from the two per-block compiled rows, not run


def activations_row(results: dict[str, dict], plan: Plan) -> dict:
    """Activation memory per sample as the slope of the per-block compiled rows' peaks, and the
    peaks it projects for micro-batches 24 and 32."""
    a, b = results.get("blocks_mb8", {}), results.get(HEADLINE, {})
    row = {"row": DERIVED, "config": f"{plan.model} compiled per block, peak(mb) = fixed + mb x per-sample"}
    if a.get("peak_gib") is None or b.get("peak_gib") is None:
        why = "needs CUDA (peak memory)" if not plan.cuda else f"needs the peaks of blocks_mb8 and {HEADLINE}"
        return {**row, "verdict": f"skipped: {why}"}
    small, large = plan.other_micro_batch, plan.micro_batch
    per_sample = (b["peak_gib"] - a["peak_gib"]) / (large - small)
    fixed = a["peak_gib"] - small * per_sample
    projected = {mb: fixed + mb * per_sample for mb in (24, 32)}
    fits = ", ".join(f"mb{mb} {gib:.1f} GiB{'' if gib <= plan.mem_cap_gib else ' (over the cap)'}"
                     for mb, gib in projected.items())
    return {**row, "activation_bytes_per_sample": per_sample * 2**30, "fixed_gib": fixed,
            "projected_gib": projected, "verdict": f"ok: {per_sample:.2f} GiB/sample; {fits}"}
