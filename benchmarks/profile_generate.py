"""Where greedy decoding spends its time: torch.profiler's self CPU time of our KV-cache generate and
of transformers' generate on our export of the same weights, grouped into the output head and the
layers' matrix products (prompt and decoded tokens apart), the attention kernel and everything else.

    OMP_NUM_THREADS=1 python benchmarks/profile_generate.py --model 124m --new_tokens 32

One thread (torch.set_num_threads(1)), float32, random seeded weights, one warm-up call of each
way, then one profiled call of each; it prints whether both gave the same tokens. Last, the floor
any decoder of these float32 weights pays per token: every weight matrix of the model (the layers'
and the output head) times one row, those products alone in a loop, unprofiled, as tokens/s; and
the memory those weights occupy, read once per token.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_generate import load_transformers, prompt_ids  # noqa: E402
from compare import load_line  # noqa: E402
from model import build_model, model_config  # noqa: E402


def category(event, vocab_size: int) -> str:
    if event.key == "aten::mm":
        rows, cols = event.input_shapes[0][0], event.input_shapes[1][1]
        return ("output head" if cols == vocab_size else "layer matmuls") + (", prompt rows" if rows > 1 else ", one row")
    if "scaled_dot_product" in event.key:
        return "attention (SDPA)"
    return "all other ops"


def self_times(events, key, into: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """{key(event): [self CPU ms, calls]} summed over the profiler's averaged events (added to `into`)."""
    groups = {} if into is None else into
    for event in events:
        group = groups.setdefault(key(event), [0.0, 0])
        group[0] += event.self_cpu_time_total / 1000
        group[1] += event.count
    return groups


def print_table(first: str, results: dict[str, dict[str, list[float]]], scale: float = 1.0) -> None:
    """A markdown table: a row per group, a column per way, `ms (calls)` times `scale`, and the total."""
    print(f"| {first} | " + " | ".join(results) + " |")
    print("| --- |" + " ---: |" * len(results))
    for group in sorted({g for r in results.values() for g in r}):
        cells = [f"{r[group][0] * scale:,.0f} ({round(r[group][1] * scale):,})" if group in r else "-"
                 for r in results.values()]
        print(f"| {group} | " + " | ".join(cells) + " |")
    totals = [f"{sum(t for t, _ in r.values()) * scale:,.0f}" for r in results.values()]
    print("| total | " + " | ".join(totals) + " |")


def profile_way(fn, vocab_size: int) -> tuple[dict[str, list[float]], torch.Tensor]:
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        out = fn()
    return self_times(prof.key_averages(group_by_input_shape=True), lambda e: category(e, vocab_size)), out


def matmul_floor(model, repeats: int = 20) -> tuple[float, int]:
    """(seconds per token of the model's one-row matrix products alone, bytes of those weights):
    each 2-D weight but the embedding times one vector, median of `repeats` passes."""
    import statistics
    import time

    weights = [p for name, p in model.named_parameters() if p.dim() == 2 and "tok_embeddings" not in name]
    x = {w.shape[1]: torch.randn(1, w.shape[1]) for w in weights}
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 2):
            t0 = time.perf_counter()
            for w in weights:
                torch.nn.functional.linear(x[w.shape[1]], w)
            times.append(time.perf_counter() - t0)
    return statistics.median(times[2:]), sum(w.numel() * w.element_size() for w in weights)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="124m", help="a model.py preset: tiny, 124m, 978m, 1p7b")
    parser.add_argument("--prompt_tokens", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=32)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(load_line())
    torch.manual_seed(0)
    cfg = model_config(args.model)
    model = build_model(cfg, "cpu").eval()
    idx = prompt_ids(args.prompt_tokens, torch.device("cpu"))
    n = args.new_tokens
    with tempfile.TemporaryDirectory() as tmp:
        hf = load_transformers(model, torch.float32, torch.device("cpu"), Path(tmp))
    ways = {"ours": lambda: model.generate(idx, n, temperature=0),
            "transformers": lambda: hf.generate(idx, max_new_tokens=n, do_sample=False, pad_token_id=0)}
    results, outputs = {}, {}
    with torch.inference_mode():
        for fn in ways.values():
            fn()
        for name, fn in ways.items():
            results[name], outputs[name] = profile_way(fn, cfg.vocab_size)
    print(f"same tokens: {torch.equal(outputs['ours'], outputs['transformers'])}")
    print_table("self CPU ms (calls)", results)
    seconds, nbytes = matmul_floor(model)
    print(f"floor: the one-row products alone take {seconds * 1000:.1f} ms per token ({1 / seconds:.1f} tok/s), "
          f"reading {nbytes / 2**20:,.0f} MiB of weights: {nbytes / seconds / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()
