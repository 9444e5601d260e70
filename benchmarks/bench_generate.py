"""Greedy decoding speed: our KV-cache decode, eager and compiled, against transformers' generate on
our own Hugging Face export of the same weights; same prompt, same length, side by side.

    python benchmarks/bench_generate.py --model tiny
    python benchmarks/bench_generate.py --model 124m
    python benchmarks/bench_generate.py --model 1p7b --device cuda --dtype bfloat16   # a GPU

The weights are random (seeded): speed does not depend on them, and nothing is downloaded. Each
way generates --new_tokens tokens after a --prompt_tokens prompt (tokens/s counts the new tokens
over the whole call, prompt included), the three ways interleaved in --repeats rounds. The machine's
load is printed first; each way's median and best tokens/s and the spread of its times follow, and a
winner is named only where the medians differ by more than either spread (benchmarks/compare.py).
A warm-up call comes first for each; for the compiled decode it is the compile, reported as
compile_s. `match` says whether each way produced the eager decode's tokens. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from compare import load_line, summary, verdict  # noqa: E402
from export_hf import save_hf  # noqa: E402
from llama_fineweb.tokenizer import get_encoding  # noqa: E402
from llama_fineweb.utils import DTYPES, resolve_device  # noqa: E402
from model import build_model, model_config  # noqa: E402

PROMPT = "The history of the printing press begins in the fifteenth century, when"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> tuple[float, torch.Tensor]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def prompt_ids(n: int, device: torch.device) -> torch.Tensor:
    ids = get_encoding().encode_ordinary(PROMPT)
    ids = (ids * (n // len(ids) + 1))[:n]
    return torch.tensor([ids], device=device)


def load_transformers(model, dtype: torch.dtype, device: torch.device, tmp: Path):
    """LlamaForCausalLM from export_hf's output for `model`, set to decode greedily to the end."""
    from transformers import LlamaForCausalLM

    save_hf(model, tmp / "hf", dtype=dtype)
    hf = LlamaForCausalLM.from_pretrained(tmp / "hf").to(device=device, dtype=dtype).eval()
    hf.generation_config.eos_token_id = None  # random weights may pick <|endoftext|>: never stop early
    return hf


def bench(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    torch.manual_seed(0)
    cfg = model_config(args.model)
    model = build_model(cfg, device).to(dtype).eval()
    idx = prompt_ids(args.prompt_tokens, device)
    n = args.new_tokens
    with tempfile.TemporaryDirectory() as tmp:
        hf = load_transformers(model, dtype, device, Path(tmp))
    ways = {
        "ours_eager": lambda: model.generate(idx, n, temperature=0),
        "ours_compiled": lambda: model.generate(idx, n, temperature=0, compile=args.backend),
        "transformers": lambda: hf.generate(idx, max_new_tokens=n, do_sample=False, pad_token_id=0),
    }
    times: dict[str, list[float]] = {name: [] for name in ways}
    outputs: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        warmup = {name: timed(fn, device) for name, fn in ways.items()}  # compile, allocator, caches
        for _ in range(args.repeats):
            for name, fn in ways.items():
                seconds, outputs[name] = timed(fn, device)
                times[name].append(seconds)
    stats = {name: summary(t) for name, t in times.items()}
    best = {name: s["best"] for name, s in stats.items()}
    reference = outputs["ours_eager"]
    result = {
        "model": args.model, "params": model.num_params(), "device": device_name(device),
        "threads": torch.get_num_threads(), "dtype": str(dtype).removeprefix("torch."),
        "prompt_tokens": args.prompt_tokens, "new_tokens": n, "backend": args.backend,
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "compile_s": round(warmup["ours_compiled"][0], 1),
        "tokens_per_s": {name: round(n / s, 1) for name, s in best.items()},
        "median_tokens_per_s": {name: round(n / s["median"], 1) for name, s in stats.items()},
        "spread_pct": {name: round(100 * s["spread"] / s["median"], 1) for name, s in stats.items()},
        "verdicts": [verdict("ours_eager", stats["ours_eager"], "transformers", stats["transformers"]),
                     verdict("ours_compiled", stats["ours_compiled"], "transformers", stats["transformers"]),
                     verdict("ours_compiled", stats["ours_compiled"], "ours_eager", stats["ours_eager"])],
        "match": {name: torch.equal(out.cpu(), reference.cpu()) for name, out in outputs.items()},
    }
    result["compiled_vs_eager"] = round(best["ours_eager"] / best["ours_compiled"], 2)
    result["compiled_vs_transformers"] = round(best["transformers"] / best["ours_compiled"], 2)
    return result


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="a model.py preset: tiny, 124m, 978m, 1p7b")
    parser.add_argument("--prompt_tokens", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="rounds, each way once per round")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--backend", default="inductor",
                        help="torch.compile backend of the compiled decode (the test suite's smoke run: eager)")
    args = parser.parse_args(argv)
    print(load_line())
    result = bench(args)
    best, median, spread = result["tokens_per_s"], result["median_tokens_per_s"], result["spread_pct"]
    print("| model | device | dtype | prompt + new | way | median tok/s | best tok/s | spread |")
    print("| --- | --- | --- | --- | --- | ---: | ---: | ---: |")
    for way in best:
        print(f"| {result['model']} | {result['device']}, {result['threads']} threads | {result['dtype']} | "
              f"{result['prompt_tokens']} + {result['new_tokens']} | {way} | {median[way]:,.1f} | "
              f"{best[way]:,.1f} | {spread[way]}% |")
    print(f"compile (once): {result['compile_s']} s; {args.repeats} rounds")
    for line in result["verdicts"]:
        print(line)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
