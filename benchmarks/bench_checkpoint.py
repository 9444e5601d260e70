"""How long checkpoint verification takes: seconds per GB of checkpoint, sizes vs full checksums.

    python benchmarks/bench_checkpoint.py                 # a 2 GiB checkpoint of random floats
    python benchmarks/bench_checkpoint.py --gib 8 --threads 16

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=2.0, help="checkpoint size in GiB")
    parser.add_argument("--dir", default=None, help="where to write it (default: a temp dir)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
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
