"""parallel.py through train_llama.py: FSDP against DDP and one process, checkpoints across them,
activation checkpointing, per-block compile, per-rank memory, signals; real torchrun on gloo."""

import os
import random
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from conftest import make_tiny_model
from llama_fineweb import checkpoint, parallel
from llama_fineweb.step import optimizer_step
from llama_fineweb.train_config import TrainConfig
from llama_fineweb.utils import Dist
from train_llama import step_settings
from runs import BASE, EVAL, ROOT, assert_close, grad_norms, losses, metric_rows, refusal, run, val_losses, weights


def samples(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if ": sample: " in line]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, data_dir):
    """The same run with DDP and with FSDP on two processes."""
    runs = {}
    for mode in ("ddp", "fsdp"):
        out = tmp_path_factory.mktemp(mode)
        runs[mode] = out, run(out, data_dir, *EVAL, f"--parallel={mode}", nproc=2)
    return runs


def test_fsdp_two_processes_match_one_process_and_ddp(straight, two_ranks):
    """FSDP and DDP on 2 processes: the losses, validation losses, samples and final weights of
    1 process (twice the accumulation), to 1e-5; its pre-clip gradient norms (about 1.1) to 2e-4."""
    fsdp_proc, ddp_proc = two_ranks["fsdp"][1], two_ranks["ddp"][1]
    assert "2 accumulation x 2 processes" in fsdp_proc.stdout and "| fsdp" in fsdp_proc.stdout
    assert "| ddp" in ddp_proc.stdout
    reference_samples = samples((straight / "stdout.txt").read_text())
    assert len(reference_samples) == 3
    for out, proc in (two_ranks["fsdp"], two_ranks["ddp"]):
        assert_close(losses(out), losses(straight), 1e-5)
        assert_close(grad_norms(out), grad_norms(straight), 2e-4)
        assert sorted(val_losses(out)) == [0, 4, 8, 12]
        assert_close(val_losses(out), val_losses(straight), 1e-5)
        assert samples(proc.stdout) == reference_samples
        assert_close(weights(out), weights(straight), 1e-5)


def test_fsdp_rank_holds_half_of_what_a_ddp_rank_holds(two_ranks):
    """Parameters, gradients and AdamW state per rank (metrics.jsonl): half of DDP's on each of 2 ranks."""
    def held(out_dir) -> dict:
        return next(r for r in metric_rows(out_dir) if "param_bytes_per_rank" in r)

    ddp, fsdp = held(two_ranks["ddp"][0]), held(two_ranks["fsdp"][0])
    for kind in ("param_bytes_per_rank", "grad_bytes_per_rank", "optim_bytes_per_rank"):
        assert len(fsdp[kind]) == 2 and ddp[kind][0] == ddp[kind][1] > 0
        for rank_bytes in fsdp[kind]:
            assert rank_bytes == pytest.approx(ddp[kind][0] / 2, rel=0.01), kind


def test_checkpoints_move_between_fsdp_and_ddp(tmp_path, data_dir, straight):
    """Written by FSDP on 2 (selective activation checkpointing), resumed by one process (DDP's
    layout), then by FSDP on 2 again (full activation checkpointing): load_model reads the FSDP
    checkpoint, and the losses and final weights are the straight run's, to 1e-5 (gradient norms
    2e-4)."""
    run(tmp_path, data_dir, "--parallel=fsdp", "--activation_checkpointing=selective", "--stop_step=5", nproc=2)
    written = checkpoint.load_model(tmp_path / "step_0000005").state_dict()
    assert_close(written, checkpoint.load_model(straight / "step_0000005").state_dict(), 1e-5)
    proc = run(tmp_path, data_dir, "--stop_step=8")
    assert "written by 2 processes" in proc.stdout
    proc = run(tmp_path, data_dir, "--parallel=fsdp", "--activation_checkpointing=full", nproc=2)
    assert "written by 1 processes" in proc.stdout and "| fsdp" in proc.stdout
    assert_close(losses(tmp_path), losses(straight), 1e-5)
    assert_close(grad_norms(tmp_path), grad_norms(straight), 2e-4)
    assert_close(weights(tmp_path), weights(straight), 1e-5)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_keeps_the_losses(tmp_path, data_dir, straight, mode):
    """Recomputing blocks in backward changes no loss (to 1e-6)."""
    run(tmp_path, data_dir, f"--activation_checkpointing={mode}", "--ac_every=3", "--stop_step=4")
    reference = {step: loss for step, loss in losses(straight).items() if step <= 4}
    assert_close(losses(tmp_path), reference, 1e-6)


@pytest.mark.parametrize("mode", ["blocks", "model"])
def test_compiled_on_cpu_matches_eager(tmp_path, data_dir, straight, mode):
    """--compile_cpu=true with each compile_mode, one process: the eager losses to 1e-4 (inductor
    reorders sums). Under DDP with validation and samples: tests/test_compile.py."""
    run(tmp_path, data_dir, "--compile_cpu=true", f"--compile_mode={mode}", "--stop_step=3", timeout=600)
    reference = {step: loss for step, loss in losses(straight).items() if step <= 3}
    assert_close(losses(tmp_path), reference, 1e-4)


@pytest.mark.parametrize("extra", [
    ["--parallel=fsdp", "--fsdp_shard_size=1"],
    ["--parallel=fsdp", "--reshard_after_forward=false"],
    ["--parallel=fsdp", "--fsdp_reduce_every_micro_step=true"],
    ["--ddp_bf16_compress=true"],
], ids=["hsdp", "fsdp_keep_gathered", "fsdp_reduce_every_micro_step", "ddp_bf16_compress"])
def test_other_parallel_settings_train_like_one_process(tmp_path, data_dir, straight, extra):
    """HSDP (2-D mesh: replicated over 2, sharded over 1), FSDP keeping gathered parameters, FSDP
    reducing every micro-step: the losses to 1e-5, gradient norms to 2e-4; DDP with gradients
    all-reduced in bfloat16: both to 1e-3. (What each setting changes: the tests below.)"""
    run(tmp_path, data_dir, *extra, "--stop_step=4", nproc=2)
    bf16 = "--ddp_bf16_compress=true" in extra
    for ours, reference, tol in ((losses(tmp_path), losses(straight), 1e-3 if bf16 else 1e-5),
                                 (grad_norms(tmp_path), grad_norms(straight), 1e-3 if bf16 else 2e-4)):
        assert_close(ours, {step: v for step, v in reference.items() if step <= 4}, tol)


@pytest.mark.parametrize("compile_mode", ["none", "blocks"])
def test_fsdp_rank_with_nothing_to_evaluate_does_not_hang(tmp_path, data_dir, compile_mode):
    """One validation sequence and one HellaSwag example on two FSDP ranks: rank 1 has nothing
    to score, and each evaluation still completes on both (it used to wait forever): validation
    and HellaSwag together at step 0, validation alone at 2, HellaSwag alone at 3. With per-block
    compile the throwaway forward stays eager: no graph for its (1, 1) shape."""
    hellaswag = ["--hellaswag_interval=3", "--hellaswag_limit=1",
                 f"--hellaswag_data={ROOT / 'tests' / 'data' / 'hellaswag_sample.jsonl'}"]
    compiled = ["--compile_cpu=true", "--compile_mode=blocks"] if compile_mode == "blocks" else []
    proc = run(tmp_path, data_dir, "--parallel=fsdp", "--eval_interval=2", "--val_sequences=1", *hellaswag,
               *compiled, "--stop_step=4", nproc=2, timeout=300 if compiled else 150,
               env={"TORCH_LOGS": "recompiles"} if compiled else None)
    assert sorted(val_losses(tmp_path)) == [0, 2]
    assert [r["step"] for r in metric_rows(tmp_path) if "hellaswag_acc" in r] == [0, 3]
    assert proc.stdout.count("(1 examples)") == 2
    if compiled:
        # Rank 1 compiles exactly what rank 0 does (training, then no-grad evaluation): nothing for
        # the throwaway forward's shape, which would also make its training graph dynamic.
        recompiles = [[line for line in proc.stderr.splitlines() if f"[rank{r}]" in line and "Recompiling" in line]
                      for r in (0, 1)]
        assert len(recompiles[0]) == len(recompiles[1]) and "size" not in proc.stderr, proc.stderr[-3000:]


# ----------------------------------------------------------------------------- what each setting changes

@pytest.fixture
def one_rank(tmp_path):
    """A one-process gloo group in the test's process, for DDP and FSDP2 on the CPU."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield Dist()
    dist.destroy_process_group()


def micro_batches(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    tokens = torch.randint(0, 50257, (2, 2, 33), generator=torch.Generator().manual_seed(seed))
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


@pytest.mark.filterwarnings("ignore:`broadcast_buffers` is deprecated:FutureWarning")  # as in training
def test_bf16_compression_hook_rounds_the_reduced_gradients(one_rank):
    """--ddp_bf16_compress=true: the gradients DDP hands back are the bfloat16-rounded mean (with
    one rank, the rounded gradient itself), not the float32 one."""
    model = make_tiny_model(max_seq_len=32).train()
    reference = make_tiny_model(max_seq_len=32).train()
    ddp = parallel.replicate(model, TrainConfig(ddp_bf16_compress=True), one_rank)
    (x, y), _ = micro_batches()
    ddp(x, y).backward()
    reference(x, y).backward()
    rounded = 0
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad.to(torch.bfloat16).float()), name
        rounded += not torch.equal(p.grad, q.grad)
    assert rounded > 0


@pytest.mark.parametrize("keep_gathered", [False, True])
def test_fsdp_keep_gathered_leaves_blocks_unsharded_after_forward(one_rank, keep_gathered):
    """--reshard_after_forward=false: after a forward each block's parameters stay gathered (plain
    tensors); by default they are freed back to their shards (DTensors)."""
    model = make_tiny_model(max_seq_len=32).train()
    parallel.shard(model, TrainConfig(parallel="fsdp", reshard_after_forward=not keep_gathered), one_rank)
    with torch.no_grad():
        model(micro_batches()[0][0])
    assert all(isinstance(block.attention.wq.weight, DTensor) != keep_gathered for block in model.layers)


@pytest.mark.parametrize("every", [False, True])
def test_fsdp_reduce_every_micro_step_reshards_after_each_backward(one_rank, every):
    """--fsdp_reduce_every_micro_step=true (train_llama's step settings): the first of 2 micro-steps
    already reduce-scatters and reshards; by default the gradients stay unsharded until the last."""
    model = make_tiny_model(max_seq_len=32).train()
    parallel.shard(model, TrainConfig(parallel="fsdp"), one_rank)
    sharded_after_first = []

    def batches():
        for i, batch in enumerate(micro_batches()):
            if i == 1:
                sharded_after_first.append(isinstance(model.layers[0].attention.wq.weight, DTensor))
            yield batch

    cfg = TrainConfig(parallel="fsdp", fsdp_reduce_every_micro_step=every)
    settings = step_settings(SimpleNamespace(cfg=cfg, accum_steps=2, autocast_dtype=None, dist=one_rank))
    optimizer_step(model, model, torch.optim.AdamW(model.parameters(), lr=1e-3), batches(), settings)
    assert sharded_after_first == [every]


# ----------------------------------------------------------------------------- signals under FSDP

def launch_fsdp(out_dir, data_dir, *extra: str) -> subprocess.Popen:
    """torchrun with 2 FSDP processes, in its own process group (so that a kill reaches all)."""
    args = [*BASE, f"--data_dir={data_dir}", f"--out_dir={out_dir}", "--parallel=fsdp", *extra]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train_llama.py"), *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait_for_loss_rows(out_dir, count: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    path = out_dir / "metrics.jsonl"
    while not path.exists() or path.read_text().count('"loss"') < count:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run did not reach the step in time"
        time.sleep(0.05)


def test_fsdp_sigterm_saves_a_loadable_checkpoint_and_resumes(tmp_path, data_dir):
    """SIGTERM to torchrun: both FSDP ranks finish the step and save; the run resumes from it."""
    proc = launch_fsdp(tmp_path, data_dir, "--max_steps=100000")
    wait_for_loss_rows(tmp_path, 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert "saved checkpoint" in out and "stopped by signal" in out, err[-2000:]
    saved = checkpoint.read_meta(checkpoint.resolve(tmp_path))["step"]
    assert saved >= 3 and max(losses(tmp_path)) == saved
    checkpoint.load_model(tmp_path)
    resumed = run(tmp_path, data_dir, "--parallel=fsdp", "--max_steps=100000", f"--stop_step={saved + 2}", nproc=2)
    assert f"at step {saved}" in resumed.stdout and max(losses(tmp_path)) == saved + 2


def test_fsdp_sigkill_then_resume_matches_the_straight_run(tmp_path, data_dir, straight):
    """SIGKILL to torchrun and both FSDP ranks at a random moment (checkpoints every step): the
    newest checkpoint loads, and the resumed run ends with the straight run's losses (to 1e-5) and
    gradient norms (2e-4)."""
    proc = launch_fsdp(tmp_path, data_dir, "--save_interval=1", "--keep_last=2")
    wait_for_loss_rows(tmp_path, 4, proc)
    time.sleep(random.Random(0).uniform(0.0, 0.5))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    ckpt = checkpoint.resolve(tmp_path)
    assert ckpt is not None and checkpoint.read_meta(ckpt)["step"] >= 3
    checkpoint.load_model(ckpt)
    run(tmp_path, data_dir, "--parallel=fsdp", "--save_interval=1", "--keep_last=2", nproc=2)
    assert not list(tmp_path.glob(".tmp_*"))
    assert_close(losses(tmp_path), losses(straight), 1e-5)
    assert_close(grad_norms(tmp_path), grad_norms(straight), 2e-4)


@pytest.mark.parametrize("knob,message", [
    ("--parallel=zero3", "--parallel='zero3': choose one of ddp, fsdp"),
    ("--activation_checkpointing=some", "choose one of none, full, selective"),
    ("--compile_mode=graph", "--compile_mode='graph': choose one of blocks, model"),
    ("--ac_every=0", "--ac_every=0 must be positive"),
    ("--fsdp_shard_size=-2", "--fsdp_shard_size=-2 must be 0"),
])
def test_parallel_knobs_are_checked(tmp_path, data_dir, knob, message):
    """A parallelism knob that cannot work: one line naming it, exit 2, before anything runs."""
    assert message in refusal(tmp_path, data_dir, knob)
