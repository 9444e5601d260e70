"""What --doc_mask and --data_mix cost per training step on the CPU, each side by side with its plain
counterpart in one process, taking turns.

--doc_mask: one optimizer step (forward, backward, AdamW) of a model preset on packed sequences of
documents with exponential lengths around --doc_tokens, with the document mask (built per
micro-batch, dense through SDPA: the CPU's form) and with the plain causal mask; eager float32.
--data_mix: one global step's batches for rank 0 of --world_size ranks at the 1p7b run's geometry
(512 sequences of 1024 tokens, micro-batch 16), from one directory (TrainLoader) and from a 0.9/0.1
mixture of two (MixtureLoader), on random-token shards already in the page cache.

    python benchmarks/bench_doc_mix.py
    python benchmarks/bench_doc_mix.py --model 124m --seq_len 1024 --micro_batch 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from llama_fineweb.dataloader import TrainLoader  # noqa: E402
from llama_fineweb.doc_mask import document_mask  # noqa: E402
from llama_fineweb.mixture import MixtureLoader, parse_data_mix  # noqa: E402
from llama_fineweb.tokenizer import EOT  # noqa: E402
from model import build_model, model_config  # noqa: E402


def bench_doc_mask(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    model = build_model(model_config(args.model, max_seq_len=args.seq_len)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, EOT, (args.micro_batch, args.seq_len + 1), generator=g)
    tokens[torch.rand(tokens.shape, generator=g) < 1 / args.doc_tokens] = EOT
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step(with_mask: bool) -> None:
        mask = document_mask(x, flex=False) if with_mask else None
        model(x, y, mask=mask).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = {False: [], True: []}
    for repeat in range(args.repeats + 1):
        for with_mask in (False, True):
            t0 = time.perf_counter()
            step(with_mask)
            if repeat:  # the first round warms up
                times[with_mask].append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(10):
        document_mask(x, flex=False)
    plain, masked = (statistics.median(times[m]) * 1000 for m in (False, True))
    return {"plain_ms": plain, "doc_mask_ms": masked, "ratio": masked / plain,
            "mask_build_ms": (time.perf_counter() - t0) * 100, "documents_per_row": float((x == EOT).sum(1).float().mean())}


def bench_mixture(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as work:
        rng = np.random.default_rng(0)
        dirs = []
        for name in ("edu", "code"):
            path = os.path.join(work, name)
            os.makedirs(path)
            for i, split in enumerate(["val", "train", "train"]):
                np.save(os.path.join(path, f"x_{split}_{i:06d}.npy"),
                        rng.integers(0, EOT, size=args.shard_tokens, dtype=np.uint16))
            dirs.append(path)
        geometry = dict(seq_len=1024, micro_batch=16, global_batch=512, rank=0, world_size=args.world_size,
                        vocab_size=50304, log=lambda line: None)
        loaders = {"one directory": TrainLoader(dirs[0], **geometry),
                   "mixture 0.9/0.1": MixtureLoader(parse_data_mix(f"{dirs[0]}:0.9,{dirs[1]}:0.1"), **geometry)}
        times = {name: [] for name in loaders}
        for repeat in range(args.repeats + 1):
            for name, loader in loaders.items():
                t0 = time.perf_counter()
                for _ in range(loader.accum_steps):
                    loader.next_batch()
                if repeat:
                    times[name].append(time.perf_counter() - t0)
        plain, mixed = (statistics.median(times[n]) * 1000 for n in loaders)
        return {"one_dir_ms": plain, "mixture_ms": mixed, "ratio": mixed / plain,
                "accum_steps": loaders["one directory"].accum_steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--micro_batch", type=int, default=8)
    parser.add_argument("--doc_tokens", type=int, default=700, help="mean document length in tokens")
    parser.add_argument("--world_size", type=int, default=8, help="ranks the mixture's global step is split over")
    parser.add_argument("--shard_tokens", type=int, default=20_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    d = bench_doc_mask(args)
    print(f"--doc_mask: {args.model}, {args.micro_batch} x {args.seq_len} tokens, {d['documents_per_row']:.1f} "
          f"documents per row: {d['plain_ms']:.1f} ms plain, {d['doc_mask_ms']:.1f} ms with the mask "
          f"({d['ratio']:.2f}x; building the mask {d['mask_build_ms']:.2f} ms)")
    m = bench_mixture(args)
    print(f"--data_mix: rank 0 of {args.world_size}, {m['accum_steps']} micro-batches of 16 x 1024 per step: "
          f"{m['one_dir_ms']:.2f} ms from one directory, {m['mixture_ms']:.2f} ms from a 0.9/0.1 mixture "
          f"({m['ratio']:.2f}x)")


if __name__ == "__main__":
    main()
