"""planner.py's projected peak memory against a measured training step, on the CPU.

    torchrun --standalone --nproc_per_node=2 benchmarks/bench_plan.py                # the default cases
    torchrun --standalone --nproc_per_node=2 benchmarks/bench_plan.py --cases tiny:128:4 124m:16:1:none+full

Each case (preset:seq_len:micro_batch) runs under DDP and FSDP with each activation-checkpointing
mode: the model wrapped as train_llama wraps it, the optimizer's state made up front (as after a
first step; --optimizer=muon: Muon's beside AdamW's), then one train_llama.optimizer_step, the step training takes (two micro-steps, so FSDP
accumulates unsharded gradients as a real run does), under torch's MemTracker, whose peak counts
every tensor alive on this rank, parameters, gradients and optimizer state included. One process
group serves every case. --cpu_autocast measures the bf16 autocast path (train_llama's).
Prints a table and one `plan_check_json: {...}` line per case (rank 0).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import train_llama  # noqa: E402
from llama_fineweb import parallel, planner  # noqa: E402
from llama_fineweb.step import make_state, optimizers_of  # noqa: E402
from llama_fineweb.train_config import TrainConfig  # noqa: E402
from llama_fineweb.utils import setup_distributed, teardown_distributed  # noqa: E402
from model import Transformer, rope_table  # noqa: E402

ACCUM = 2


def step_tracker():
    """MemTracker for a step of several micro-steps: its per-module statistics refuse a root
    module's second forward, so they are cleared there (the overall peak is kept apart)."""
    from torch.distributed._tools.mem_tracker import MemTracker  # noqa: PLC0415

    class StepTracker(MemTracker):
        def _pre_fw_hook(self, module, inputs):
            name = self._mod_tracker.get_known_fqn(module)
            if module in self.memory_tracking and not self._mod_tracker.is_bw and name and "." not in name:
                self.reset_mod_stats()
            super()._pre_fw_hook(module, inputs)

    return StepTracker()


def zero_model(mc, device: torch.device) -> Transformer:
    """The model with zero weights: memory is what is measured, the losses stay finite (so AdamW
    steps), and 124m's normal init would cost seconds per case."""
    with torch.device("meta"):
        model = Transformer(mc)
    model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.rope.copy_(rope_table(mc.head_dim, mc.max_seq_len, mc.rope_theta))
    return model


def measure(preset: str, seq_len: int, micro_batch: int, par: str, ac: str, d, cpu_autocast: bool = False,
            optimizer: str = "adamw") -> float:
    """The peak bytes on this rank of one training step."""
    cfg = TrainConfig(model=preset, seq_len=seq_len, micro_batch=micro_batch,
                      total_batch_tokens=micro_batch * seq_len * d.world_size * ACCUM, parallel=par,
                      activation_checkpointing=ac, device="cpu", compile=False, benchmark=1,
                      eval_interval=0, sample_interval=0, cpu_autocast=cpu_autocast, optimizer=optimizer)
    model = zero_model(cfg.model_config(), d.device)
    train_model, eval_model = parallel.parallelize(model, cfg, d)
    optimizer = train_llama.build_optimizer(model, cfg, d.device)
    make_state(optimizer)
    settings = train_llama.StepSettings(
        accum_steps=ACCUM, grad_clip=cfg.grad_clip, autocast_dtype=torch.bfloat16 if cpu_autocast else None,
        reduce_every_micro_step=cfg.fsdp_reduce_every_micro_step, world_size=d.world_size, device_type="cpu")
    generator = torch.Generator().manual_seed(0)
    tokens = [torch.randint(0, cfg.model_config().vocab_size, (micro_batch, seq_len + 1), generator=generator)
              for _ in range(ACCUM)]
    tracker = step_tracker()
    tracker.track_external(model, *optimizers_of(optimizer))
    with tracker:
        train_llama.optimizer_step(model, train_model, optimizer, ((t[:, :-1], t[:, 1:]) for t in tokens), settings)
    peak = tracker.get_tracker_snapshot("peak")[d.device]["Total"]
    del model, train_model, eval_model, optimizer, tracker
    gc.collect()
    return peak


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["tiny:128:4", "tiny:128:8", "124m:16:1", "124m:16:2"],
                        help="preset:seq_len:micro_batch[:checkpointing modes joined by +, default --ac]")
    parser.add_argument("--parallel", nargs="+", default=["ddp", "fsdp"])
    parser.add_argument("--ac", nargs="+", default=["none", "selective", "full"])
    parser.add_argument("--cpu_autocast", action="store_true", help="bf16 autocast, as train_llama --cpu_autocast")
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"], help="as train_llama --optimizer")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    d = setup_distributed("cpu")
    results = []
    try:
        for case in args.cases:
            preset, seq_len, micro_batch, *modes = case.split(":")
            for par in args.parallel:
                for ac in (modes[0].split("+") if modes else args.ac):
                    measured = measure(preset, int(seq_len), int(micro_batch), par, ac, d, args.cpu_autocast,
                                       args.optimizer)
                    cfg = TrainConfig(model=preset, seq_len=int(seq_len), micro_batch=int(micro_batch),
                                      total_batch_tokens=int(micro_batch) * int(seq_len) * d.world_size * ACCUM,
                                      parallel=par, activation_checkpointing=ac, device="cpu", compile=False,
                                      cpu_autocast=args.cpu_autocast, optimizer=args.optimizer)
                    s = planner.setting_from_config(cfg, d.world_size, "cpu")
                    row = {"case": case, "parallel": par, "ac": ac, "rank": d.rank, "world_size": d.world_size,
                           **planner.compare_measured(cfg.model_config(), s, int(seq_len), measured)}
                    results.append(row)
                    if d.is_main:
                        print(f"plan_check_json: {json.dumps(row)}", flush=True)
    finally:
        teardown_distributed()
    if d.is_main:
        print(f"\n| case (preset:seq:micro-batch) | parallel | checkpointing | measured MiB | projected MiB | error |")
        print("| --- | --- | --- | ---: | ---: | ---: |")
        for r in results:
            print(f"| {r['case']} | {r['parallel']} | {r['ac']} | {r['measured_gib'] * 1024:,.0f} | "
                  f"{r['projected_gib'] * 1024:,.0f} | {r['error']:+.1%} |")
    return results


if __name__ == "__main__":
    main()
