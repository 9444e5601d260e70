"""HellaSwag scoring speed: batched vs one example at a time, and on a GPU eager vs compiled.

CPU: the tiny model on the fixture examples (repeated for a stable time), scored (a) one example
per forward, its 4 rows padded only to its own longest row, as build-nanogpt does, and (b) by
hellaswag.py's batched scorer (longest first, lengths bucketed to multiples of 64). Both paths use
the same loss code, and the predictions of the two are checked to be identical.
The positions column counts what the model was fed, padding included.
With CUDA: the full validation split (10,042 examples) on a randomly initialized 1p7b in bf16
autocast, eager, then torch.compile'd (the first compiled pass includes compilation), and the
first --gpu_single examples one at a time for comparison. Without the real data (no --data and
nothing cached) the fixture is repeated to 10,042 examples.

    python benchmarks/bench_hellaswag.py
    python benchmarks/bench_hellaswag.py --repeats 8 --data hellaswag_val.jsonl --gpu_batch_size 32
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hellaswag  # noqa: E402
from llama_fineweb.tokenizer import get_encoding  # noqa: E402
from model import Transformer, build_model, model_config  # noqa: E402

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "data" / "hellaswag_sample.jsonl"


class PositionCounter(torch.nn.Module):
    """The model, counting the token positions (padding included) it is asked to process."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model, self.config, self.positions = model, model.config, 0

    def forward(self, idx: torch.Tensor):
        self.positions += idx.numel()
        return self.model(idx)


@torch.no_grad()
def one_at_a_time(
    model: torch.nn.Module, examples: list[dict], device: str = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> tuple[list[int], list[int]]:
    """build-nanogpt's loop: one forward per example, padded to its own longest row only."""
    enc = get_encoding()
    pred, pred_norm = [], []
    for example in examples:
        ctx, endings = hellaswag.render_example(example, enc, model.config.max_seq_len)
        tokens, mask = hellaswag.make_batch([(ctx, endings)], len(ctx) + max(map(len, endings)), 4)
        tokens, mask = tokens.to(device), mask.to(device)
        sum_loss, n_tokens = hellaswag._ending_losses(model, tokens, mask, autocast_dtype)
        pred.append(int(sum_loss.argmin()))
        pred_norm.append(int((sum_loss / n_tokens).argmin()))
    return pred, pred_norm


def timed(fn, *args, **kwargs):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def bench_cpu(repeats: int, batch_size: int) -> None:
    torch.manual_seed(0)
    model = PositionCounter(build_model(model_config("tiny")).eval())
    examples = hellaswag.load_examples(str(FIXTURE)) * repeats
    n = len(examples)
    print(f"CPU, {torch.get_num_threads()} threads, tiny model (vocab 50304), {n} examples "
          f"({n // repeats} fixture examples x {repeats})")
    # Warm-up: allocator, tokenizer, first-call overheads.
    one_at_a_time(model, examples[:4])
    hellaswag.predict(model, examples[:batch_size], "cpu", batch_size, max_seq_len=model.config.max_seq_len)
    rendered = [hellaswag.render_example(ex, get_encoding()) for ex in examples]
    real = sum(len(ctx) + len(ending) for ctx, endings in rendered for ending in endings)
    model.positions = 0
    single, single_s = timed(one_at_a_time, model, examples)
    single_positions, model.positions = model.positions, 0
    batched, batched_s = timed(
        hellaswag.predict, model, examples, "cpu", batch_size, max_seq_len=model.config.max_seq_len
    )
    for name, seconds, positions in [
        ("one example per forward (build-nanogpt)", single_s, single_positions),
        (f"batched, batch_size={batch_size} (hellaswag.py)", batched_s, model.positions),
    ]:
        print(f"  {name:<44} {seconds:8.2f} s {n / seconds:9.1f} examples/s  "
              f"{positions:,} positions ({real / positions:.0%} real tokens)")
    print(f"  speedup {single_s / batched_s:.2f}x; identical predictions (acc and acc_norm): {single == batched}")


def bench_gpu(data: str | None, limit: int | None, batch_size: int, single_limit: int,
              preset: str = "1p7b", device: str = "cuda") -> None:
    try:
        examples = hellaswag.load_examples(data, limit)
        source = data or str(hellaswag.default_data_path())
    except (FileNotFoundError, ValueError) as e:
        print(f"  (no HellaSwag data: {e}; using the fixture repeated instead)")
        fixture = hellaswag.load_examples(str(FIXTURE))
        examples = (fixture * (hellaswag.N_VAL // len(fixture) + 1))[: limit or hellaswag.N_VAL]
        source = f"{FIXTURE.name} repeated"
    on_cuda = torch.device(device).type == "cuda"
    model = build_model(model_config(preset), device).eval()
    print(f"{torch.cuda.get_device_name() if on_cuda else device}, random {preset} "
          f"({model.num_params() / 1e9:.3f}B params, float32 weights, bf16 autocast), "
          f"{len(examples)} examples from {source}, batch_size={batch_size}")
    kwargs = dict(batch_size=batch_size, autocast_dtype=torch.bfloat16, progress=False)
    hellaswag.evaluate(model, examples[: 2 * batch_size], device, **kwargs)  # warm-up: cuBLAS, allocator
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    eager, eager_s = timed(hellaswag.evaluate, model, examples, device, **kwargs)
    few = examples[:single_limit]
    _, single_s = timed(one_at_a_time, model, few, device, torch.bfloat16)
    compiled_model = torch.compile(model)
    first, first_s = timed(hellaswag.evaluate, compiled_model, examples, device, **kwargs)
    compiled, compiled_s = timed(hellaswag.evaluate, compiled_model, examples, device, **kwargs)
    n = len(examples)
    print(f"  {f'eager, one example per forward ({len(few)} ex)':<44} {single_s:8.2f} s "
          f"{len(few) / single_s:9.1f} examples/s")
    for name, result, seconds in [
        ("eager, batched", eager, eager_s),
        ("compiled, batched, first pass (compiling)", first, first_s),
        ("compiled, batched, second pass", compiled, compiled_s),
    ]:
        print(f"  {name:<44} {seconds:8.2f} s {n / seconds:9.1f} examples/s  "
              f"acc {result['acc']:.4f} acc_norm {result['acc_norm']:.4f}")
    if on_cuda:
        print(f"  peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=4, help="copies of the 32 fixture examples on CPU")
    parser.add_argument("--batch_size", type=int, default=16, help="examples per forward on CPU")
    parser.add_argument("--data", help="hellaswag_val.jsonl for the GPU part (default: the cached copy)")
    parser.add_argument("--gpu_limit", type=int, help="only the first N examples on the GPU")
    parser.add_argument("--gpu_batch_size", type=int, default=16, help="examples per forward on the GPU")
    parser.add_argument("--gpu_single", type=int, default=500, help="examples scored one at a time on the GPU")
    parser.add_argument("--skip_cpu", action="store_true")
    args = parser.parse_args()
    print(f"torch {torch.__version__}")
    if not args.skip_cpu:
        bench_cpu(args.repeats, args.batch_size)
    if torch.cuda.is_available():
        bench_gpu(args.data, args.gpu_limit, args.gpu_batch_size, args.gpu_single)
    else:
        print("GPU part skipped: CUDA is not available")


if __name__ == "__main__":
    main()
