"""What --layer_stats_interval costs: a training step with and without the per-block statistics.

    python benchmarks/bench_layer_stats.py                      # 124m, CPU or CUDA, seq 256
    python benchmarks/bench_layer_stats.py --model tiny --steps 10

Times optimizer_step (the step training takes) alternately as a plain step and as a statistics
step (forward hooks, the weights copied before the update, one all-reduce's worth of figures),
median of each; the cost at interval N is the difference spread over N steps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama_fineweb.layer_stats import LayerStats  # noqa: E402
from llama_fineweb.step import StepSettings, optimizer_step  # noqa: E402
from llama_fineweb.utils import Dist  # noqa: E402
from model import build_model, model_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="124m")
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--micro_batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="timed steps of each kind")
    parser.add_argument("--interval", type=int, default=100)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = build_model(model_config(args.model, max_seq_len=args.seq_len), device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    stats = LayerStats(model.layers, 2, Dist(device=device))  # even steps are statistics steps
    tokens = torch.randint(0, 50257, (args.micro_batch, args.seq_len + 1), device=device)
    settings = StepSettings(accum_steps=1, device_type=device.type)
    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(2 * args.steps + 2):
        on = i % 2 == 0
        stats.begin(i)

        def agree(norm, loss, z):
            stats.gradients(1.0)
            return True, False

        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        optimizer_step(model, model, optimizer, [(tokens[:, :-1], tokens[:, 1:])], settings, agree=agree,
                       after_update=stats.updated)
        stats.finish()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:  # the first of each kind warms up
            times[on].append(time.perf_counter() - t0)
    plain, with_stats = statistics.median(times[False]), statistics.median(times[True])
    extra = with_stats - plain
    print(f"{args.model} seq {args.seq_len} x micro-batch {args.micro_batch} on {device}: plain step "
          f"{plain * 1000:.0f} ms, statistics step {with_stats * 1000:.0f} ms (+{extra * 1000:.0f} ms); at "
          f"--layer_stats_interval={args.interval}: {extra / args.interval / plain:.3%} of step time "
          f"(median of {args.steps} steps each, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
