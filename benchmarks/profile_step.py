"""Where a training step spends its time: torch.profiler's self CPU time of one forward + backward
of our model and of transformers' `LlamaForCausalLM` on the same weights and tokens, grouped by what
the operators compute (the output head and the layers' matrix products, attention, the loss, the
embedding, the rest), with the operators that differ most between the two listed after.

    OMP_NUM_THREADS=1 python benchmarks/profile_step.py --model 124m --batch 2 --seq_len 256

One thread (torch.set_num_threads(1)), float32, random seeded weights, the loss of each printed
(they must agree), one warm-up step of each way, then --repeats profiled steps of each,
alternating; the table holds the per-step mean.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from compare import load_line  # noqa: E402
from profile_generate import print_table, self_times  # noqa: E402
from llama_fineweb.hf_io import hf_config, to_hf_state_dict  # noqa: E402
from model import build_model, model_config  # noqa: E402

MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")


def category(event, vocab_size: int) -> str:
    key = event.key
    if key in MATMULS:
        shapes = [s for s in event.input_shapes if s]
        head = any(vocab_size in s for s in shapes)
        return "output head matmuls" if head else "layer matmuls"
    if "scaled_dot_product" in key or "flash_attention" in key or "attention_backward" in key:
        return "attention (SDPA, forward and backward)"
    if "embedding" in key:
        return "embedding (forward and backward)"
    if any(k in key for k in ("log_softmax", "nll_loss", "cross_entropy", "logsumexp", "exp", "amax", "gather",
                              "scatter")):
        return "loss (softmax, gather, exp)"
    if any(k in key for k in ("copy_", "to_copy", "_to_copy", "clone", "contiguous", "zero_", "fill_", "empty")):
        return "copies, fills, allocations"
    return "elementwise and other ops"


def profile_step(fn, vocab_size: int, groups: dict, ops: dict) -> None:
    """One profiled step of `fn`: its self CPU times added to `groups` (by category) and `ops` (by operator)."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    self_times(prof.key_averages(group_by_input_shape=True), lambda e: category(e, vocab_size), groups)
    self_times(prof.key_averages(), lambda e: e.key, ops)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="124m", help="a model.py preset: tiny, 124m, 978m, 1p7b")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2, help="profiled steps of each way, alternating")
    parser.add_argument("--top", type=int, default=12, help="operators listed by their difference")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(load_line())
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = model_config(args.model)
    ours = build_model(cfg, "cpu").train()
    hf = LlamaForCausalLM(LlamaConfig(**hf_config(cfg), attn_implementation="sdpa"))
    hf.load_state_dict(to_hf_state_dict(ours))
    hf.train()
    data = torch.randint(0, 50257, (args.batch, args.seq_len + 1), generator=torch.Generator().manual_seed(0))
    idx, targets = data[:, :-1].contiguous(), data[:, 1:].contiguous()

    def step(module, loss_fn):
        def run() -> float:
            module.zero_grad(set_to_none=True)
            loss = loss_fn()
            loss.backward()
            return loss.item()
        return run

    ways = {"ours": step(ours, lambda: ours(idx, targets)),
            "transformers": step(hf, lambda: hf(input_ids=idx, labels=targets, shift_labels=targets).loss)}
    losses = {name: fn() for name, fn in ways.items()}  # warm-up
    print("loss: " + ", ".join(f"{name} {loss:.6f}" for name, loss in losses.items()))
    groups = {name: {} for name in ways}  # summed over the repeats; printed per step
    ops = {name: {} for name in ways}
    for _ in range(args.repeats):
        for name, fn in ways.items():
            profile_step(fn, cfg.vocab_size, groups[name], ops[name])
    print(f"\n{args.model}, batch {args.batch} x {args.seq_len}, forward + backward, float32, one thread; "
          f"self CPU ms per step (calls), mean of {args.repeats}")
    per_step = 1 / args.repeats
    print_table("group", groups, scale=per_step)
    names = sorted(set(ops["ours"]) | set(ops["transformers"]),
                   key=lambda k: -abs(ops["ours"].get(k, [0])[0] - ops["transformers"].get(k, [0])[0]))
    print(f"\nThe {args.top} operators whose time differs most (ms per step, calls):")
    print("| operator | ours | transformers |")
    print("| --- | ---: | ---: |")
    for key in names[: args.top]:
        cells = [f"{ops[w][key][0] * per_step:,.1f} ({round(ops[w][key][1] * per_step):,})" if key in ops[w] else "-"
                 for w in ways]
        print(f"| `{key}` | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
