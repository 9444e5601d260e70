"""What --optimizer=muon costs per step: the optimizer step alone (Muon's Newton-Schulz beside AdamW
vs AdamW on every parameter) and the whole training step, timed alternately in one process.

    OMP_NUM_THREADS=1 python benchmarks/bench_muon.py --presets tiny 124m --seq_len 128 --micro_batch 4

The whole step is train_llama's optimizer_step (eager, float32 on the CPU, one micro-step); the
optimizer step alone runs on fixed random gradients. Prints one `muon_json: {...}` line per preset.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from llama_fineweb.step import StepSettings, build_optimizer, optimizer_step
from llama_fineweb.train_config import TrainConfig
from model import build_model, model_config


def median_ms(fns: dict, repeats: int) -> dict[str, float]:
    """Median milliseconds of each fn, called in turn `repeats` times after one warm-up each."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) * 1000 for name, t in times.items()}


def measure(preset: str, seq_len: int, micro_batch: int, repeats: int) -> dict:
    device = torch.device("cpu")
    torch.manual_seed(0)
    model = build_model(model_config(preset, max_seq_len=seq_len), device)
    optimizers = {name: build_optimizer(model, TrainConfig(optimizer=name), device) for name in ("adamw", "muon")}
    grads = [torch.randn_like(p) * 1e-3 for p in model.parameters()]

    def optimizer_only(name: str):
        def fn():
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            optimizers[name].step()
        return fn

    tokens = torch.randint(0, model.config.vocab_size, (micro_batch, seq_len + 1))
    settings = StepSettings(accum_steps=1, device_type="cpu")

    def whole_step(name: str):
        return lambda: optimizer_step(model, model, optimizers[name], [(tokens[:, :-1], tokens[:, 1:])], settings)

    alone = median_ms({name: optimizer_only(name) for name in optimizers}, repeats)
    whole = median_ms({name: whole_step(name) for name in optimizers}, repeats)
    return {"preset": preset, "seq_len": seq_len, "micro_batch": micro_batch, "threads": torch.get_num_threads(),
            "optimizer_ms": alone, "step_ms": whole, "newton_schulz_ms": alone["muon"] - alone["adamw"],
            "step_ratio": whole["muon"] / whole["adamw"]}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "124m"])
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--micro_batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    rows = []
    for preset in args.presets:
        row = measure(preset, args.seq_len, args.micro_batch, args.repeats)
        rows.append(row)
        print(f"muon_json: {json.dumps(row)}", flush=True)
    print("\n| preset | optimizer step AdamW ms | Muon + AdamW ms | whole step AdamW ms | Muon ms | ratio |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['preset']} | {r['optimizer_ms']['adamw']:,.0f} | {r['optimizer_ms']['muon']:,.0f} | "
              f"{r['step_ms']['adamw']:,.0f} | {r['step_ms']['muon']:,.0f} | {r['step_ratio']:.2f} |")
    return rows


if __name__ == "__main__":
    main()
