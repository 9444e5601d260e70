"""Our model vs transformers' `LlamaForCausalLM`: forward+backward time and peak memory.

CPU: for each preset, both models get the same config, the same weights (ours, converted by
export_hf) and the same tokens. Each measurement runs in a fresh subprocess so that one model's
allocations cannot hide the other's peak; the peak is the high-water mark of resident memory
during the timed steps, above what the process held just before them (weights, and on the HF
side also whatever it keeps between steps). Runs alternate ours/HF so drift hits both alike; the
load is printed first, and a winner is named per case only where the medians differ by more than
either spread (benchmarks/compare.py).
With CUDA, a second table: the 1p7b preset, bf16 autocast, torch.compile, one training step
(forward, backward, fused AdamW) at micro-batches 8 and 16 x 1024: tokens/s, MFU, peak memory
and the attention kernel that ran.

    python benchmarks/bench_model.py
    python benchmarks/bench_model.py --cases tiny:4x256 124m:2x256 --steps 5 --rounds 2
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import load_line, summary, verdict  # noqa: E402
from export_hf import save_weights  # noqa: E402
from llama_fineweb import metrics  # noqa: E402
from llama_fineweb.hf_io import hf_config, load_weights, to_hf_state_dict  # noqa: E402
from model import Transformer, model_config  # noqa: E402


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-memory high-water mark to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes(reset_worked: bool) -> int:
    if reset_worked:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak since process start


def _build(impl: str, weights_dir: str):
    """(step function returning the loss, parameters) for `impl` with the saved weights."""
    ours = load_weights(weights_dir)
    if impl == "ours":
        return (lambda idx, targets: ours(idx, targets)), ours
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**hf_config(ours.config), attn_implementation="sdpa")
    hf = LlamaForCausalLM(config)
    hf.load_state_dict(to_hf_state_dict(ours))
    del ours

    def step(idx, targets):
        # shift_labels: the targets are already shifted, as ours are; the loss is HF's own.
        return hf(input_ids=idx, labels=targets, shift_labels=targets).loss

    return step, hf


def run_case(impl: str, weights_dir: str, batch: int, seq_len: int, steps: int) -> dict:
    """One measurement (run in a fresh process): seconds per forward+backward and peak memory."""
    torch.manual_seed(0)
    step, module = _build(impl, weights_dir)
    module.train()
    vocab = 50257  # real GPT-2 ids, valid for both models
    data = torch.randint(0, vocab, (batch, seq_len + 1), generator=torch.Generator().manual_seed(0))
    idx, targets = data[:, :-1].contiguous(), data[:, 1:].contiguous()

    def fwd_bwd() -> float:
        module.zero_grad(set_to_none=True)
        loss = step(idx, targets)
        loss.backward()
        return loss.item()

    fwd_bwd()  # warm-up: first-call allocations and kernel selection
    module.zero_grad(set_to_none=True)
    gc.collect()
    before = _rss_bytes()
    reset = _reset_peak_rss()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = fwd_bwd()
        times.append(time.perf_counter() - t0)
    peak = _peak_rss_bytes(reset)
    return {"impl": impl, "seconds": times, "loss": loss, "peak_delta": peak - before,
            "peak_is_delta_from_reset": reset, "threads": torch.get_num_threads()}


def cpu_table(cases: list[str], steps: int, rounds: int) -> None:
    print(f"CPU: forward+backward, float32, {torch.get_num_threads()} threads, {steps} steps x "
          f"{rounds} rounds per model (ours and hf alternating), each run in a fresh process; {load_line()}")
    print(f"{'preset':>7} {'batch':>7} {'impl':>5} {'best ms':>9} {'median ms':>10} {'spread ms':>10} "
          f"{'tokens/s':>9} {'peak MiB':>9} {'loss':>8}")
    peak_reset_worked = True
    for case in cases:
        preset, shape = case.split(":")
        batch, seq_len = (int(n) for n in shape.split("x"))
        with tempfile.TemporaryDirectory() as weights_dir:
            torch.manual_seed(0)
            model = Transformer(model_config(preset))
            model.init_weights()
            save_weights(model, weights_dir)
            del model
            results = {"ours": [], "hf": []}
            for _ in range(rounds):
                for impl in ("ours", "hf"):
                    cmd = [sys.executable, __file__, "--_child", impl, weights_dir,
                           str(batch), str(seq_len), str(steps)]
                    out = subprocess.run(cmd, capture_output=True, text=True)
                    if out.returncode:
                        raise SystemExit(f"{impl} {case} failed:\n{out.stderr[-2000:]}")
                    results[impl].append(json.loads(out.stdout.strip().splitlines()[-1]))
        stats = {}
        for impl, runs in results.items():
            peak_reset_worked &= all(run["peak_is_delta_from_reset"] for run in runs)
            stats[impl] = summary([s for run in runs for s in run["seconds"]])
            best, median, spread = stats[impl]["best"], stats[impl]["median"], stats[impl]["spread"]
            peak = max(run["peak_delta"] for run in runs) / 2**20
            print(f"{preset:>7} {shape:>7} {impl:>5} {best * 1000:>9.0f} {median * 1000:>10.0f} "
                  f"{spread * 1000:>10.0f} {batch * seq_len / best:>9.0f} {peak:>9.0f} {runs[-1]['loss']:>8.4f}")
        print(f"{case}: {verdict('ours', stats['ours'], 'hf', stats['hf'])}")
    print(f"load average {os.getloadavg()[0]:.1f} at end. best: the fastest step (other processes "
          "only add time); spread: slowest - fastest step; tokens/s from best")
    print("peak MiB: resident-memory high-water mark during the timed steps minus the resident "
          "memory just before them (weights and anything kept between steps)")
    if not peak_reset_worked:
        print("(/proc/self/clear_refs was not writable: the peak is since process start, imports and "
              "model building included)")


def attention_kernels(step) -> list[str]:
    """Names of the attention ops and kernels one call of `step` runs (from torch.profiler)."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        step()
        torch.cuda.synchronize()
    keys = ("flash", "fmha", "attention", "sdpa", "cudnn_generated", "attn")
    matches = [e for e in prof.events() if any(k in e.name.lower() for k in keys)
               and not e.name.startswith("triton_")]  # inductor's fused kernels are named after ops
    kernels = [e for e in matches if e.device_type == torch.autograd.DeviceType.CUDA] or matches
    # Kernel names are long C++ templates: keep the name before the template arguments.
    return sorted({e.name.removeprefix("void ").split("<")[0] for e in kernels})


def gpu_table(preset: str, micro_batches: list[int], seq_len: int, steps: int) -> None:
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    peak_flops, peak_note = metrics.peak_flops(name)
    cfg = model_config(preset, max_seq_len=seq_len)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    model.init_weights()
    n_params = model.num_params()
    flops_per_token = metrics.flops_per_token(model, seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    torch.backends.cuda.matmul.allow_tf32 = True  # as train_llama.py sets it
    # Static shapes, as in training (one micro-batch size): each batch size compiles its own graph.
    compiled = torch.compile(model, dynamic=False)
    print(f"\nGPU: {name}, {preset} ({n_params:,} parameters), bf16 autocast, torch.compile, "
          f"training step = forward + backward + fused AdamW, seq {seq_len}")
    print(f"{'micro-batch':>11} {'ms/step':>9} {'tokens/s':>10} {'MFU':>6} {'peak GiB':>9}  attention")
    for batch in micro_batches:
        data = torch.randint(0, 50257, (batch, seq_len + 1), device=device)
        idx, targets = data[:, :-1], data[:, 1:]

        def train_step() -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = compiled(idx, targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        try:
            for _ in range(3):  # compilation and autotuning
                train_step()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                train_step()
            torch.cuda.synchronize()
        except torch.OutOfMemoryError:
            print(f"{batch:>11} out of memory")
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            continue
        seconds = (time.perf_counter() - t0) / steps
        tokens_per_s = batch * seq_len / seconds
        mfu = f"{flops_per_token * tokens_per_s / peak_flops:.1%}" if peak_flops else "-"
        peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
        kernels = ", ".join(attention_kernels(train_step))
        print(f"{batch:>11} {seconds * 1000:>9.1f} {tokens_per_s:>10,.0f} {mfu:>6} {peak_gib:>9.1f}  {kernels}")
    print(f"MFU: metrics.flops_per_token ({flops_per_token / 1e9:.2f} GFLOP/token: 6 x the parameters "
          f"but the input embedding + 12 L d T) x tokens/s / the dense bf16 peak; {peak_note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["tiny:4x256", "124m:2x256"],
                        help="CPU cases, preset:BATCHxSEQ")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run")
    parser.add_argument("--rounds", type=int, default=2, help="runs per model per case, alternating")
    parser.add_argument("--gpu_preset", default="1p7b")
    parser.add_argument("--gpu_micro_batches", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--gpu_steps", type=int, default=10)
    parser.add_argument("--skip_cpu", action="store_true")
    parser.add_argument("--_child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._child:
        impl, weights_dir, batch, seq_len, steps = args._child
        print(json.dumps(run_case(impl, weights_dir, int(batch), int(seq_len), int(steps))))
        return
    print("command:", " ".join([Path(sys.executable).name, *sys.argv]))
    print(f"torch {torch.__version__}")
    if not args.skip_cpu:
        cpu_table(args.cases, args.steps, args.rounds)
    if torch.cuda.is_available():
        gpu_table(args.gpu_preset, args.gpu_micro_batches, 1024, args.gpu_steps)
    else:
        print("\nGPU: no CUDA device, GPU section skipped")


if __name__ == "__main__":
    main()
