"""parallel.py through train_llama.py: FSDP against DDP and one process, checkpoints across them,
activation checkpointing, per-block compile, per-rank memory, signals; real torchrun on gloo."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

import checkpoint
import train_llama
from test_train import BASE, ROOT, assert_close, data_dir, losses, run  # noqa: F401 - data_dir is a fixture

# Validation on 5 sequences: 2 and 3 (1 and 2 batches) on two ranks, so an FSDP evaluation must not
# need the ranks to run equal numbers of forwards. Samples at steps 0, 6 and 12.
EVAL = ["--eval_interval=4", "--val_sequences=5", "--sample_interval=6", "--sample_tokens=4"]


def metric_rows(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def val_losses(out_dir) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in metric_rows(out_dir) if "val_loss" in r}


def samples(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if ": sample: " in line]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_dir):  # noqa: F811
    """One process, 12 steps, checkpoints at 5, 10 and 12: the reference."""
    out = tmp_path_factory.mktemp("straight")
    proc = run(out, data_dir, *EVAL, "--save_interval=5")
    return out, proc


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, data_dir):  # noqa: F811
    """The same run with DDP and with FSDP on two processes."""
    runs = {}
    for mode in ("ddp", "fsdp"):
        out = tmp_path_factory.mktemp(mode)
        runs[mode] = out, run(out, data_dir, *EVAL, f"--parallel={mode}", nproc=2)
    return runs


def test_fsdp_two_processes_match_one_process_and_ddp(straight, two_ranks):
    """FSDP on 2 processes: the losses, validation losses and samples of 1 process (twice the
    accumulation) and of DDP on 2, to 1e-5."""
    (ref, ref_proc), (fsdp, fsdp_proc) = straight, two_ranks["fsdp"]
    ddp = two_ranks["ddp"][0]
    assert "2 accumulation x 2 processes" in fsdp_proc.stdout
    assert_close(losses(fsdp), losses(ref), 1e-5)
    assert_close(losses(fsdp), losses(ddp), 1e-5)
    assert sorted(val_losses(fsdp)) == [0, 4, 8, 12]
    assert_close(val_losses(fsdp), val_losses(ref), 1e-5)
    assert len(samples(fsdp_proc.stdout)) == 3 and samples(fsdp_proc.stdout) == samples(ref_proc.stdout)


def test_fsdp_rank_holds_half_of_what_a_ddp_rank_holds(two_ranks):
    """Parameters, gradients and AdamW state per rank (metrics.jsonl): half of DDP's on each of 2 ranks."""
    def held(out_dir) -> dict:
        return next(r for r in metric_rows(out_dir) if "param_bytes_per_rank" in r)

    ddp, fsdp = held(two_ranks["ddp"][0]), held(two_ranks["fsdp"][0])
    for kind in ("param_bytes_per_rank", "grad_bytes_per_rank", "optim_bytes_per_rank"):
        assert len(fsdp[kind]) == 2 and ddp[kind][0] == ddp[kind][1] > 0
        for rank_bytes in fsdp[kind]:
            assert rank_bytes == pytest.approx(ddp[kind][0] / 2, rel=0.01), kind


def test_fsdp_checkpoint_resumes_under_ddp_on_one_process(tmp_path, data_dir, straight):  # noqa: F811
    """Written by FSDP on 2 (with selective activation checkpointing): load_model reads it, and one
    process continues it with the straight run's losses."""
    ref = straight[0]
    run(tmp_path, data_dir, "--parallel=fsdp", "--activation_checkpointing=selective", "--stop_step=5", nproc=2)
    written = checkpoint.load_model(tmp_path / "step_0000005").state_dict()
    assert_close(written, checkpoint.load_model(ref / "step_0000005").state_dict(), 1e-5)
    proc = run(tmp_path, data_dir)
    assert "written by 2 processes" in proc.stdout
    assert_close(losses(tmp_path), losses(ref), 1e-5)


def test_ddp_checkpoint_resumes_under_fsdp_on_two_processes(tmp_path, data_dir, straight):  # noqa: F811
    """Written by one process: FSDP on 2 (full activation checkpointing) continues it with the
    straight run's losses and final weights."""
    ref = straight[0]
    run(tmp_path, data_dir, "--stop_step=5")
    proc = run(tmp_path, data_dir, "--parallel=fsdp", "--activation_checkpointing=full", nproc=2)
    assert "written by 1 processes" in proc.stdout
    assert_close(losses(tmp_path), losses(ref), 1e-5)
    assert_close(checkpoint.load_model(tmp_path).state_dict(), checkpoint.load_model(ref).state_dict(), 1e-5)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_keeps_the_losses(tmp_path, data_dir, straight, mode):  # noqa: F811
    """Recomputing blocks in backward changes no loss (to 1e-6)."""
    run(tmp_path, data_dir, f"--activation_checkpointing={mode}", "--ac_every=3", "--stop_step=4")
    reference = {step: loss for step, loss in losses(straight[0]).items() if step <= 4}
    assert_close(losses(tmp_path), reference, 1e-6)


@pytest.mark.parametrize("mode", ["blocks", "model"])
def test_compiled_on_cpu_matches_eager(tmp_path, data_dir, straight, mode):  # noqa: F811
    """--compile_cpu=true with each compile_mode: the eager losses to 1e-4 (inductor reorders sums)."""
    run(tmp_path, data_dir, "--compile_cpu=true", f"--compile_mode={mode}", "--stop_step=3", timeout=600)
    reference = {step: loss for step, loss in losses(straight[0]).items() if step <= 3}
    assert_close(losses(tmp_path), reference, 1e-4)


@pytest.mark.parametrize("extra", [
    ["--parallel=fsdp", "--fsdp_shard_size=1"],
    ["--parallel=fsdp", "--reshard_after_forward=false"],
    ["--parallel=fsdp", "--fsdp_reduce_every_micro_step=true"],
    ["--ddp_bf16_compress=true"],
], ids=["hsdp", "fsdp_keep_gathered", "fsdp_reduce_every_micro_step", "ddp_bf16_compress"])
def test_other_parallel_settings_train_like_one_process(tmp_path, data_dir, straight, extra):  # noqa: F811
    """HSDP (2-D mesh: replicated over 2, sharded over 1), FSDP keeping gathered parameters, FSDP
    reducing every micro-step: to 1e-5; DDP with gradients all-reduced in bfloat16: to 1e-3."""
    run(tmp_path, data_dir, *extra, "--stop_step=4", nproc=2)
    reference = {step: loss for step, loss in losses(straight[0]).items() if step <= 4}
    assert_close(losses(tmp_path), reference, 1e-3 if "--ddp_bf16_compress=true" in extra else 1e-5)


def test_fsdp_rank_with_nothing_to_evaluate_does_not_hang(tmp_path, data_dir):  # noqa: F811
    """One validation sequence and one HellaSwag example on two FSDP ranks: rank 1 has nothing
    to score, and the evaluation still completes on both (it used to wait forever)."""
    hellaswag = ["--hellaswag_interval=2", "--hellaswag_limit=1",
                 f"--hellaswag_data={ROOT / 'tests' / 'data' / 'hellaswag_sample.jsonl'}"]
    proc = run(tmp_path, data_dir, "--parallel=fsdp", "--eval_interval=2", "--val_sequences=1", *hellaswag,
               "--stop_step=3", nproc=2, timeout=150)
    assert sorted(val_losses(tmp_path)) == [0, 2]
    assert [r["hellaswag_acc"] for r in metric_rows(tmp_path) if "hellaswag_acc" in r] != []
    assert proc.stdout.count("(1 examples)") == 2


# ----------------------------------------------------------------------------- signals under FSDP

def launch_fsdp(out_dir, data_dir, *extra: str) -> subprocess.Popen:  # noqa: F811
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


def test_fsdp_sigterm_saves_a_loadable_checkpoint_and_resumes(tmp_path, data_dir):  # noqa: F811
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


def test_fsdp_sigkill_then_resume_matches_the_straight_run(tmp_path, data_dir, straight):  # noqa: F811
    """SIGKILL to torchrun and both FSDP ranks at a random moment (checkpoints every step): the
    newest checkpoint loads, and the resumed run ends with the straight run's losses."""
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
    assert_close(losses(tmp_path), losses(straight[0]), 1e-5)


@pytest.mark.parametrize("knob,message", [
    ("--parallel=zero3", "--parallel='zero3': choose one of ddp, fsdp"),
    ("--activation_checkpointing=some", "choose one of none, full, selective"),
    ("--compile_mode=graph", "--compile_mode='graph': choose one of blocks, model"),
    ("--ac_every=0", "--ac_every=0 must be positive"),
    ("--fsdp_shard_size=-2", "--fsdp_shard_size=-2 must be 0"),
])
def test_parallel_knobs_are_checked(tmp_path, data_dir, capsys, knob, message):  # noqa: F811
    """A parallelism knob that cannot work: one line naming it, exit 2, before anything runs."""
    with pytest.raises(SystemExit) as e:
        train_llama.main([*BASE, f"--out_dir={tmp_path}", f"--data_dir={data_dir}", knob])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
