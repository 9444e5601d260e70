"""The training loop's overhead: train_llama's loop vs a bare forward/backward/step.

Both run the same model, batch, optimizer and synthetic tokens in one process, interleaved
several times so that drift on a shared machine hits both alike.

    python benchmarks/bench_train.py                  # tiny model on CPU
    python benchmarks/bench_train.py --model=124m --seq_len=256 --micro_batch=4
"""

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_llama  # noqa: E402


def bare_loop(cfg: train_llama.TrainConfig, steps: int) -> float:
    """Median seconds per step of the plainest loop: forward, backward, clip, step."""
    device = torch.device("cpu")
    torch.manual_seed(cfg.seed)
    model = train_llama.build_model(cfg, device)
    optimizer = train_llama.build_optimizer(model, cfg, device)
    accum = train_llama.gradient_accumulation(cfg, 1)
    generator = torch.Generator().manual_seed(cfg.seed)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        for _ in range(accum):
            x = torch.randint(0, model.config.vocab_size, (cfg.micro_batch, cfg.seq_len + 1), generator=generator)
            loss = model(x[:, :-1], x[:, 1:])
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return float(np.median(times[len(times) // 3:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--micro_batch", type=int, default=8)
    parser.add_argument("--accum", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = train_llama.TrainConfig(
        model=args.model, seq_len=args.seq_len, micro_batch=args.micro_batch,
        total_batch_tokens=args.micro_batch * args.seq_len * args.accum, device="cpu", compile=False,
        benchmark=args.steps, log_interval=10**9, warmup_steps=2)
    tokens = cfg.total_batch_tokens
    bare, loop = [], []
    for _ in range(args.repeats):
        bare.append(bare_loop(cfg, args.steps))
        loop.append(train_llama.train(dataclasses.replace(cfg))["ms_per_step"] / 1000)
    b, l = float(np.median(bare)), float(np.median(loop))
    print(f"\nmodel {args.model}, {args.micro_batch} x {args.seq_len} tokens x {args.accum} accumulation, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} interleaved runs x {args.steps} steps")
    print(f"{'loop':<28}{'ms/step':>10}{'tokens/s':>12}")
    print(f"{'bare fwd/bwd/step':<28}{b * 1000:>10.1f}{tokens / b:>12,.0f}")
    print(f"{'train_llama (benchmark)':<28}{l * 1000:>10.1f}{tokens / l:>12,.0f}")
    print(f"overhead of the training loop: {(l / b - 1):+.1%}")


if __name__ == "__main__":
    main()
