"""DDP vs FSDP on the CPU, and the measurements behind the memory model of docs/parallelism.md.

    python benchmarks/bench_parallel.py                    # tiny, 2 gloo processes: DDP vs FSDP x checkpointing
    python benchmarks/bench_parallel.py --model=124m --seq_len=64 --micro_batch=2 --steps=5 --repeats=2
    python benchmarks/bench_parallel.py --compile --threads=2   # 1 process: eager vs compile_mode=blocks vs model
    python benchmarks/bench_parallel.py --activations      # bytes kept for backward per token

Speed and memory: each variant is a fresh `torchrun --nproc_per_node=2 train_llama.py --benchmark=N`
on synthetic tokens (OMP_NUM_THREADS=1 per rank), the variants interleaved `--repeats` times so
that drift on a shared machine hits them alike. tokens/s is train_llama's steady-state figure
(median of the last two thirds of the steps); peak RSS is each rank's VmHWM (/proc), polled every
50 ms, which includes the ~0.4 GB of the torch runtime and, under FSDP, the whole model that each
rank builds before sharding it. "held" is what train_llama logs once per run: parameters +
gradients + AdamW state on each rank.

Compile: each mode in a fresh process with an empty inductor cache, so the first step includes
the whole compilation; ms/step is the steady state.

Activations: torch.distributed._tools.mem_tracker.MemTracker counts the bytes alive after the
forward of one batch (everything backward will need), at two batch sizes and two depths of the
real block shapes (eager, each dtype and checkpointing mode); the differences are the bytes per
token per block and outside the blocks. A compiled block's saved tensors are counted through
saved_tensors_hooks instead. planner.py's memory model is checked against these figures; plan.py
prints the projected peak per GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# (label, train_llama arguments) of the speed and memory comparison.
VARIANTS = [
    ("ddp", ["--parallel=ddp"]),
    ("ddp + full checkpointing", ["--parallel=ddp", "--activation_checkpointing=full"]),
    ("fsdp", ["--parallel=fsdp"]),
    ("fsdp + full checkpointing", ["--parallel=fsdp", "--activation_checkpointing=full"]),
    ("fsdp, reduce every micro-step", ["--parallel=fsdp", "--fsdp_reduce_every_micro_step=true"]),
]


# ----------------------------------------------------------------------------- speed and RSS

def children(pid: int) -> list[int]:
    """Every descendant of `pid` (the torchrun workers), from /proc."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        frontier = [p for p, parent in parents.items() if parent in frontier]
        found += frontier
    return found


def peak_rss_mib(pid: int) -> float | None:
    """A process's peak resident MiB so far (VmHWM), None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(match.group(1)) / 1024 if match else None


def launch(args: argparse.Namespace, extra: list[str], nproc: int, env: dict | None = None) -> dict:
    """One train_llama --benchmark run (later arguments override earlier ones): its steady-state
    figures, and each worker's peak RSS."""
    tokens = args.micro_batch * args.seq_len * nproc * args.accum
    cmd = ["train_llama.py", f"--model={args.model}", f"--seq_len={args.seq_len}", f"--micro_batch={args.micro_batch}",
           f"--total_batch_tokens={tokens}", f"--benchmark={args.steps}", "--device=cpu", "--compile=false",
           "--log_interval=1000000", *extra]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), **(env or {})}
    proc = subprocess.Popen([*launcher, *cmd], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    peaks: dict[int, float] = {}
    while proc.poll() is None:
        for pid in (children(proc.pid) if nproc > 1 else [proc.pid]):
            rss = peak_rss_mib(pid)
            if rss is not None and (nproc == 1 or "train_llama" in Path(f"/proc/{pid}/cmdline").read_text()):
                peaks[pid] = rss
        time.sleep(0.05)
    out = proc.stdout.read()
    result = next((json.loads(line.split("benchmark_json: ", 1)[1]) for line in out.splitlines()
                   if line.startswith("benchmark_json: ")), None)
    if result is None:
        raise SystemExit(f"run failed: {' '.join(cmd)}\n{out[-3000:]}")
    held = re.search(r"held per rank .*", out)
    result["held"] = held.group(0) if held else ""
    result["peak_rss_mib"] = [peaks[p] for p in sorted(peaks)]
    return result


def held_mib(line: str) -> str:
    """'params+grads+AdamW' MiB per rank from train_llama's 'held per rank' line."""
    parts = [list(map(float, m.split("/"))) for m in re.findall(r"([\d./]+)(?:,|$)", line)]
    if len(parts) != 3:
        return "-"
    return "/".join(f"{sum(col):.0f}" for col in zip(*parts))


def speed(args: argparse.Namespace) -> None:
    runs: dict[str, list[dict]] = {label: [] for label, _ in VARIANTS}
    for _ in range(args.repeats):
        for label, extra in VARIANTS:
            runs[label].append(launch(args, extra, nproc=2))
    tokens = args.micro_batch * args.seq_len * 2 * args.accum
    print(f"\nmodel {args.model}, 2 processes x {args.threads} thread, {args.micro_batch} x {args.seq_len} tokens x "
          f"{args.accum} accumulation per rank = {tokens:,} tokens/step; median of {args.repeats} interleaved runs "
          f"x {args.steps} steps")
    print("| variant | tokens/s | ms/step | peak RSS per rank (MiB) | params+grads+AdamW per rank (MiB) |")
    print("| --- | ---: | ---: | --- | --- |")
    for label, results in runs.items():
        tps = statistics.median(r["tokens_per_s"] for r in results)
        ms = statistics.median(r["ms_per_step"] for r in results)
        print(f"| {label} | {tps:,.0f} | {ms:,.0f} | {per_rank(results, 'peak_rss_mib')} | "
              f"{held_mib(results[-1]['held'])} |")


def per_rank(results: list[dict], key: str) -> str:
    """Each rank's largest value over the repeats, as 'r0 / r1'."""
    ranks = min(len(r[key]) for r in results)
    return " / ".join(f"{max(r[key][i] for r in results):,.0f}" for i in range(ranks))


def compile_modes(args: argparse.Namespace) -> None:
    modes = [("eager", []),
             ("compile_mode=blocks", ["--compile=true", "--compile_cpu=true", "--compile_mode=blocks"]),
             ("compile_mode=model", ["--compile=true", "--compile_cpu=true", "--compile_mode=model"])]
    runs: dict[str, list[dict]] = {label: [] for label, _ in modes}
    for _ in range(args.repeats):
        for label, extra in modes:
            with tempfile.TemporaryDirectory() as cache:  # a cold compile every time
                env = {"TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": cache}
                runs[label].append(launch(args, extra, nproc=1, env=env))
    print(f"\nmodel {args.model}, 1 process x {args.threads} threads, {args.micro_batch} x {args.seq_len} tokens x "
          f"{args.accum} accumulation; median of {args.repeats} interleaved runs x {args.steps} steps, each with "
          f"an empty inductor cache")
    print("| mode | first step (s, compile included) | ms/step after | tokens/s |")
    print("| --- | ---: | ---: | ---: |")
    for label, results in runs.items():
        print(f"| {label} | {statistics.median(r['first_step_s'] for r in results):.1f} | "
              f"{statistics.median(r['ms_per_step'] for r in results):,.0f} | "
              f"{statistics.median(r['tokens_per_s'] for r in results):,.0f} |")


# ----------------------------------------------------------------------------- activations

# What a GPU run keeps, imitated on the CPU: DDP on CUDA runs float32 weights under bf16 autocast;
# FSDP's MixedPrecisionPolicy gathers bf16 parameters and computes in them.
DTYPE_MODES = ("autocast_bf16", "bf16_params", "float32")


def bytes_after_forward(preset: str, layers: int, batch: int, seq_len: int, mode: str, ac: str) -> int:
    """Bytes alive (parameters, their casts, everything saved for backward) after one forward."""
    import torch  # noqa: PLC0415
    from torch.distributed._tools.mem_tracker import MemTracker  # noqa: PLC0415

    from llama_fineweb import parallel  # noqa: PLC0415
    from model import build_model, model_config  # noqa: PLC0415

    torch.manual_seed(0)
    # A small vocabulary and loss chunk: the loss's temporary logits stay small and constant.
    model = build_model(model_config(preset, n_layers=layers, vocab_size=512, max_seq_len=seq_len, loss_chunk_size=64))
    if mode == "bf16_params":
        model.to(torch.bfloat16)
    parallel.checkpoint_blocks(model, ac, 2)
    tokens = torch.randint(0, 512, (batch, seq_len + 1))
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast_bf16"):
            loss = model(tokens[:, :-1], tokens[:, 1:])
        alive = tracker.get_tracker_snapshot("current")[torch.device("cpu")]["Total"]
        loss.backward()
    return alive


def bytes_saved_compiled(preset: str, layers: int, batch: int, seq_len: int, mode: str) -> int:
    """Bytes that torch.compile's graph saves for backward (MemTracker cannot see inductor's own
    buffers; every saved tensor passes through saved_tensors_hooks), parameters not counted."""
    import torch  # noqa: PLC0415

    from model import build_model, model_config  # noqa: PLC0415

    torch.manual_seed(0)
    torch._dynamo.reset()
    model = build_model(model_config(preset, n_layers=layers, vocab_size=512, max_seq_len=seq_len, loss_chunk_size=64))
    if mode == "bf16_params":
        model.to(torch.bfloat16)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    tokens = torch.randint(0, 512, (batch, seq_len + 1))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast_bf16"):
            loss = torch.compile(model)(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    return sum(saved.values())


def compiled_activations(presets: list[str], seq_len: int, modes=DTYPE_MODES[:2]) -> dict:
    """{(preset, mode, "compiled"): (bytes per token per block, None, None)}: what a compiled
    block keeps, from 2 depths x 2 batch sizes."""
    from model import model_config  # noqa: PLC0415

    found = {}
    for preset in presets:
        for mode in modes:
            b = {(depth, batch): bytes_saved_compiled(preset, depth, batch, seq_len, mode)
                 for depth in (1, 2) for batch in (1, 2)}
            per_block = ((b[2, 2] - b[2, 1]) - (b[1, 2] - b[1, 1])) / seq_len
            found[preset, mode, "compiled"] = (per_block, None, None)
            print(f"{preset:>5} {mode:>13} compiled, no checkpointing: {per_block:>9,.0f} B/token/block = "
                  f"{per_block / model_config(preset).dim:6.2f} x dim", flush=True)
    return found


def activations(presets: list[str], seq_len: int, modes=DTYPE_MODES, acs=("none", "full", "selective")) -> dict:
    """{(preset, mode, ac): (bytes per token per block, per token outside the blocks, bytes per
    block parameter alive after forward)} from 2 depths x 2 batch sizes."""
    from model import model_config  # noqa: PLC0415

    found = {}
    for preset in presets:
        cfg = model_config(preset)
        per_block_params = sum(p.numel() for p in _block(cfg).parameters())
        for mode in modes:
            for ac in acs:
                # Depths 2 and 4: `selective` (every 2nd block) checkpoints half of either.
                b = {(depth, batch): bytes_after_forward(preset, depth, batch, seq_len, mode, ac)
                     for depth in (2, 4) for batch in (1, 2)}
                per_block = ((b[4, 2] - b[4, 1]) - (b[2, 2] - b[2, 1])) / seq_len / 2
                outside = (b[2, 2] - b[2, 1]) / seq_len - 2 * per_block
                per_param = ((b[4, 1] - b[2, 1]) / 2 - per_block * seq_len) / per_block_params
                found[preset, mode, ac] = (per_block, outside, per_param)
                print(f"{preset:>5} {mode:>13} checkpointing {ac:>9}: {per_block:>9,.0f} B/token/block "
                      f"= {per_block / cfg.dim:6.2f} x dim | outside blocks {outside:>7,.0f} B/token | "
                      f"{per_param:.2f} B per block parameter alive after forward", flush=True)
    return found


def _block(cfg):
    import torch  # noqa: PLC0415

    from model import TransformerBlock  # noqa: PLC0415

    with torch.device("meta"):
        return TransformerBlock(cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--micro_batch", type=int, default=4)
    parser.add_argument("--accum", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per process")
    parser.add_argument("--compile", action="store_true", help="compare the compile modes instead (1 process)")
    parser.add_argument("--activations", action="store_true", help="measure activation bytes and print the table")
    args = parser.parse_args()
    if args.activations:
        # Every dtype and checkpointing mode on 124m's block; what the table needs on the big ones.
        measured = activations(["124m"], seq_len=128)
        measured |= activations(["978m", "1p7b"], seq_len=128, modes=DTYPE_MODES[:2], acs=("none", "full"))
        measured |= compiled_activations(["124m", "978m", "1p7b"], seq_len=128)
        # planner.py counts the same terms from model.py's ops (its docstrings cite these figures);
        # the table per GPU is plan.py's.
        print("\nthe projected table per GPU: python plan.py --config configs/llama_1p7b.py --gpu \"RTX A6000\" "
              "--gpus 2 --markdown")
    elif args.compile:
        compile_modes(args)
    else:
        speed(args)


if __name__ == "__main__":
    main()
