"""How long checkpoint verification takes: seconds per GB of checkpoint, sizes vs full checksums.

    python benchmarks/bench_checkpoint.py                 # a 2 GiB checkpoint of random floats
    python benchmarks/bench_checkpoint.py --gib 8 --threads 16
    python benchmarks/bench_checkpoint.py --blocked 124m  # loop-blocked seconds per save: sync vs async

Saves a module of 256 MiB float32 parameters with checkpoint.save, then times
checkpoint.verify(full=False) (sizes only) and verify(full=True) (sha256 of every 64 MiB block,
blocks hashed in parallel threads). The files were just written, so they are read from the page
cache: this is the hashing cost, the floor under a cold read from disk.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama_fineweb import checkpoint  # noqa: E402
from model import build_model, model_config  # noqa: E402


def blocked_seconds(preset: str, device: torch.device, out_dir: str | Path, rounds: int = 2) -> dict:
    """The seconds a training loop is blocked by one save of `preset`'s full state (weights and
    AdamW moments, float32), synchronous (checkpoint.save) vs asynchronous (AsyncSaver.save
    returning), best of `rounds` each, side by side; and the seconds the background write took."""
    torch.manual_seed(0)
    model = build_model(model_config(preset), device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # the moments exist, as in a run
    state = {"model": checkpoint.ModelState(model), "optim": checkpoint.OptimizerState(model, optimizer)}
    saver = checkpoint.AsyncSaver(device)
    sync, blocked, background = [], [], []
    for step in range(1, rounds + 1):
        t0 = time.perf_counter()
        path = checkpoint.save(out_dir, step, state, keep_last=1)
        sync.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        saver.save(out_dir, 100 + step, state, keep_last=1)
        blocked.append(time.perf_counter() - t0)
        saver.wait()
        background.append(time.perf_counter() - t0)
    saver.close()
    size = sum(f.stat().st_size for f in checkpoint.step_dir(out_dir, 100 + rounds).iterdir())
    del path
    return {"model": preset, "device": str(device), "state_gb": size / 1e9, "sync_s": min(sync),
            "async_blocked_s": min(blocked), "async_total_s": min(background),
            "ratio": min(sync) / min(blocked)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=2.0, help="checkpoint size in GiB")
    parser.add_argument("--dir", default=None, help="where to write it (default: a temp dir)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--blocked", default="", metavar="PRESET",
                        help="instead: the loop-blocked seconds per save of PRESET's state, sync vs async")
    args = parser.parse_args()
    if args.blocked:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            result = blocked_seconds(args.blocked, device, tmp, rounds=args.rounds)
        print(f"{args.blocked} state {result['state_gb']:.2f} GB on {device}: synchronous save blocks "
              f"{result['sync_s']:.2f}s, asynchronous {result['async_blocked_s']:.2f}s "
              f"({result['ratio']:.1f}x less; written in {result['async_total_s']:.2f}s in the background)")
        print(f"json: {result}")
        return
    per_tensor = 64 << 20  # float32 elements: 256 MiB each
    count = max(1, round(args.gib * 2**30 / (per_tensor * 4)))
    torch.manual_seed(0)
    weights = torch.nn.ParameterDict({f"w{i}": torch.randn(per_tensor) for i in range(count)})
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        t0 = time.perf_counter()
        path = checkpoint.save(tmp, 1, {"model": checkpoint.ModelState(weights)})
        save_s = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in path.iterdir())
        print(f"checkpoint: {size / 1e9:.2f} GB in {len(list(path.iterdir()))} files, saved in {save_s:.1f}s "
              f"(checksums included); {os.cpu_count()} CPUs")
        for full in (False, True):
            times = []
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                checkpoint.verify(path, full=full)
                times.append(time.perf_counter() - t0)
            best = min(times)
            what = "sizes + sha256" if full else "sizes only"
            print(f"verify ({what:>14}): best {best:6.2f}s of {args.rounds} = {best / (size / 1e9):.3f} s/GB, "
                  f"{size / 1e9 / best:,.2f} GB/s")


if __name__ == "__main__":
    main()
