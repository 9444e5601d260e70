"""--optimizer=muon: torch.optim.Muon for the blocks' matrices beside AdamW, through train_llama.py:
its groups and schedule, two processes (DDP, FSDP) against one, exact resume, the refusals, and the
planner's memory against a measured step."""

import json
import os
import subprocess
import sys
from contextlib import nullcontext

import pytest
import torch
from runs import ROOT, losses, refusal, run, run_here, weights

from llama_fineweb import planner
from llama_fineweb.continuation import lr_at
from llama_fineweb.step import build_optimizer, muon_parameters, set_lr
from llama_fineweb.train_config import ConfigError, SFTConfig, TrainConfig
from model import Transformer

MUON = ["--optimizer=muon", "--muon_lr=0.02"]


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest(tiny_model):
    """Muon gets every 2-D weight inside the blocks; AdamW the embedding and head (decayed) and the
    norm gains (not decayed); every parameter once."""
    model = tiny_model()
    optimizer = build_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    muon, adamw = optimizer.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    assert muon_names == {n for n, p in model.named_parameters() if n.startswith("layers.") and p.dim() == 2}
    decay, no_decay = ({names[id(p)] for p in g["params"]} for g in adamw.param_groups)
    assert decay == {"tok_embeddings.weight", "output.weight"}
    assert no_decay == {n for n, p in model.named_parameters() if p.dim() == 1}
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.1, 0.0]


def test_muon_lr_follows_the_schedule(tiny_model):
    """Each group's LR through warmup and decay: AdamW's the schedule's, Muon's muon_lr/max_lr times it."""
    cfg = TrainConfig(optimizer="muon", muon_lr=0.02, max_lr=6e-4, min_lr=6e-5, warmup_steps=10, max_steps=100)
    optimizer = build_optimizer(tiny_model(), cfg, torch.device("cpu"))
    for step in (0, 10, 60, 100):
        set_lr(optimizer, lr_at(step, cfg))
        muon_group, *adamw_groups = optimizer.param_groups
        assert muon_group["lr"] == pytest.approx(lr_at(step, cfg) * 0.02 / 6e-4)
        assert [g["lr"] for g in adamw_groups] == [lr_at(step, cfg)] * 2


def test_planner_counts_one_buffer_per_muon_parameter():
    """plan.py's optimizer term: 8 bytes per parameter with AdamW, 4 per Muon parameter with Muon."""
    cfg = TrainConfig(model="124m", optimizer="muon", micro_batch=1, total_batch_tokens=1024 * 1024)
    c = cfg.model_config()
    muon = planner.memory(c, planner.setting_from_config(cfg, 1, "cuda"), cfg.seq_len)["optimizer"]
    adamw = planner.memory(c, planner.setting_from_config(TrainConfig(model="124m", micro_batch=1,
                                                                      total_batch_tokens=1024 * 1024), 1, "cuda"),
                           cfg.seq_len)["optimizer"]
    with torch.device("meta"):
        model = Transformer(c)
    assert adamw - muon == 4 * planner.muon_parameter_count(c) == 4 * sum(p.numel() for p in muon_parameters(model))


def test_micro_batch_auto_try_leaves_muon_as_it_was(tiny_model):
    """--micro_batch=auto's confirming step with Muon beside AdamW: no step taken, no state left."""
    model = tiny_model(vocab_size=512)
    optimizer = build_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert planner.fits_one_step(model, model, optimizer, 2, 16, nullcontext())
    assert all(not part.state for part in optimizer.optimizers)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.fixture(scope="module")
def one_step(tmp_path_factory, data_dir):
    """One Muon step on one process (4 micro-steps)."""
    out = tmp_path_factory.mktemp("muon_one_step")
    run(out, data_dir, *MUON, "--stop_step=1")
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_muon_two_processes_match_one_process(tmp_path, data_dir, one_step, mode):
    """A Muon step on 2 processes (DDP, or FSDP, whose DTensor shards Muon orthogonalizes whole
    through DTensor's collectives) against 1: AdamW's tensors to 1e-5; Muon's matrices to 1/8 of
    the step's Muon LR, the bfloat16 rounding of torch's Newton-Schulz (gradients summed in
    another order round to other bfloat16 values; an update made from local gradients alone, or
    from one shard, differs by the whole step)."""
    run(tmp_path, data_dir, *MUON, "--stop_step=1", f"--parallel={mode}", nproc=2)
    muon_lr = lr_at(0, TrainConfig(max_lr=6e-4, min_lr=6e-5, warmup_steps=3, max_steps=12)) * 0.02 / 6e-4
    straight, two = weights(one_step), weights(tmp_path)
    assert straight.keys() == two.keys()
    for name, value in straight.items():
        in_muon = name.startswith("layers.") and value.dim() == 2
        diff = (value - two[name]).abs().max().item()
        assert diff <= (muon_lr / 8 if in_muon else 1e-5), f"{name}: differs by {diff}"


def test_muon_resume_equals_straight_run(tmp_path_factory, data_dir):
    """6 Muon steps, then a resumed 6 (Muon's momentum and AdamW's moments from the checkpoint):
    bitwise the same losses and final weights as 12 straight."""
    straight, resumed = tmp_path_factory.mktemp("muon_straight"), tmp_path_factory.mktemp("muon_resumed")
    run(straight, data_dir, *MUON)
    run(resumed, data_dir, *MUON, "--stop_step=6")
    proc = run(resumed, data_dir, *MUON)
    assert "at step 6" in proc.stdout
    assert losses(resumed) == losses(straight)
    final = weights(resumed)
    for name, value in weights(straight).items():
        assert torch.equal(value, final[name]), name


def test_switching_optimizer_on_resume_is_refused(tmp_path, data_dir):
    """An AdamW run resumed with --optimizer=muon: one line naming the knob, nothing trained."""
    run_here(tmp_path, data_dir, "--max_steps=1")
    line = refusal(tmp_path, data_dir, "--max_steps=2", "--optimizer=muon")
    assert "optimizer: checkpoint 'adamw' vs now 'muon'" in line
    assert sorted(losses(tmp_path)) == [1]


def test_lora_refuses_muon():
    """LoRA with --optimizer=muon: a one-line ConfigError naming both knobs and the way out."""
    with pytest.raises(ConfigError, match="--optimizer=muon with --lora_rank.*--optimizer=adamw"):
        SFTConfig(init_from="out/run", lora_rank=8, optimizer="muon").validate()


def test_planner_counts_muon_memory_within_15_percent_of_measured():
    """Projected vs MemTracker's peak of a real Muon step (benchmarks/bench_plan.py --optimizer=muon,
    2 gloo processes): tiny and 124m (whose blocks' matrices are half its parameters), DDP and FSDP."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "benchmarks" / "bench_plan.py"), "--optimizer=muon", "--cases", "tiny:128:4:none",
           "124m:16:2:none"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line.split(": ", 1)[1]) for line in proc.stdout.splitlines()
            if line.startswith("plan_check_json: ")]
    assert len(rows) == 4
    worst = max(rows, key=lambda r: abs(r["error"]))
    assert abs(worst["error"]) <= 0.15, worst
