"""train_llama.py end to end: the real script, real torchrun (gloo), real signals and kills."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import train_llama
from llama_fineweb import checkpoint, metrics
from llama_fineweb.continuation import lr_at
from llama_fineweb.train_config import load_config
from model import Transformer, build_model
from runs import BASE, EVAL, ROOT, SEQ, assert_close, grad_norms, losses, refusal, run, run_here, weights


def test_resume_equals_straight_run(tmp_path, data_dir, straight):
    """6 steps, then a resumed 6: bitwise the same losses, gradient norms, val losses and final weights."""
    run(tmp_path, data_dir, *EVAL, "--stop_step=6")
    assert sorted(losses(tmp_path)) == list(range(1, 7))
    proc = run(tmp_path, data_dir, *EVAL)
    assert "resumed from" in proc.stdout and "at step 6" in proc.stdout
    assert losses(tmp_path) == losses(straight)
    assert grad_norms(tmp_path) == grad_norms(straight)
    val = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    val_ref = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["val_loss"]) for r in val if "val_loss" in r] == \
        [(r["step"], r["val_loss"]) for r in val_ref if "val_loss" in r]
    for k, v in weights(straight).items():
        assert torch.equal(v, weights(tmp_path)[k]), k


def test_resume_on_another_world_size(tmp_path, data_dir, straight):
    """Written by 2 processes, resumed on 1, then by 1 and resumed on 2: the straight run's
    losses and weights (to 1e-5) and gradient norms (1e-4). (2 processes from the start: tests/test_parallel.py.)"""
    run(tmp_path, data_dir, "--stop_step=4", nproc=2)
    proc = run(tmp_path, data_dir, "--stop_step=8")
    assert "written by 2 processes" in proc.stdout
    proc = run(tmp_path, data_dir, nproc=2)
    assert "written by 1 processes" in proc.stdout
    assert_close(losses(tmp_path), losses(straight), 1e-5)
    assert_close(grad_norms(tmp_path), grad_norms(straight), 1e-4)
    assert_close(weights(tmp_path), weights(straight), 1e-5)


def logged_steps(out_dir: Path) -> int:
    path = out_dir / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def newest_step(out_dir: Path) -> int:
    """The step of the newest complete checkpoint (0 if none), read while a run may be saving."""
    try:
        ckpt = checkpoint.resolve(out_dir)
        return checkpoint.read_meta(ckpt)["step"] if ckpt is not None else 0
    except (OSError, checkpoint.CheckpointError):  # pruned or half-written between the listing and the read
        return 0


def test_sigkill_at_random_moments_always_leaves_a_loadable_checkpoint(tmp_path, data_dir, straight):
    """Killed with SIGKILL again and again (half of the kills mid-save), it resumes exactly."""
    rng = random.Random(0)
    args = [*BASE, f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--save_interval=1", "--keep_last=2"]
    cmd = [sys.executable, str(ROOT / "train_llama.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    last_step, killed_mid_save = 0, 0
    for attempt in range(4):
        if last_step == 12 and killed_mid_save:  # a fast machine finished the run: nothing left to kill
            break
        logged_before = logged_steps(tmp_path)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
        deadline = time.monotonic() + 120
        if attempt % 2:
            # Kill the moment a checkpoint is being written.
            while not list(tmp_path.glob(".tmp_step_*")) and time.monotonic() < deadline:
                time.sleep(0.001)
        else:
            # Kill at a random moment once this run has logged a step and saved past the last
            # checkpoint (waiting for the save keeps a slow, busy machine making progress).
            while (logged_steps(tmp_path) <= logged_before or newest_step(tmp_path) <= last_step) \
                    and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 1.0))
        stalled = time.monotonic() >= deadline
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not stalled, f"attempt {attempt}: no progress in 120 s"
        killed_mid_save += bool(list(tmp_path.glob(".tmp_step_*")))
        ckpt = checkpoint.resolve(tmp_path)
        if ckpt is None:
            continue
        assert not ckpt.name.startswith(".tmp")
        step = checkpoint.read_meta(ckpt)["step"]
        assert step >= last_step
        last_step = step
        checkpoint.load_model(ckpt)  # complete and loadable, whatever the kill interrupted
    assert killed_mid_save >= 1, "no kill landed during a save"
    assert last_step > 0
    run(tmp_path, data_dir, "--save_interval=1", "--keep_last=2")
    assert not list(tmp_path.glob(".tmp_*"))
    for k, v in weights(straight).items():
        assert torch.equal(v, weights(tmp_path)[k]), k


def start(out_dir: Path, data_dir: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    args = [*BASE, f"--data_dir={data_dir}", f"--out_dir={out_dir}", *extra]
    return subprocess.Popen([sys.executable, str(ROOT / "train_llama.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def wait_for_step(out_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while step not in losses_if_any(out_dir):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run did not reach the step in time"
        time.sleep(0.05)


def losses_if_any(out_dir: Path) -> dict[int, float]:
    return losses(out_dir) if (out_dir / "metrics.jsonl").exists() else {}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_and_exits_zero(tmp_path, data_dir, sig):
    """SIGTERM or Ctrl-C (SIGINT): finish the step, save, exit 0; the resumed run goes on from there."""
    proc = start(tmp_path, data_dir, "--max_steps=100000")
    wait_for_step(tmp_path, 3, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert f"received {sig.name}" in out and "saved checkpoint" in out and "Traceback" not in err
    saved_step = checkpoint.read_meta(checkpoint.resolve(tmp_path))["step"]
    assert saved_step >= 3 and max(losses(tmp_path)) == saved_step
    resumed = run_here(tmp_path, data_dir, "--max_steps=100000", f"--stop_step={saved_step + 2}")
    assert f"at step {saved_step}" in resumed.stdout
    assert max(losses(tmp_path)) == saved_step + 2


def test_nonfinite_loss_skips_the_update(tmp_path, data_dir, monkeypatch):
    """A NaN loss at one step leaves weights and optimizer unchanged there; training goes on."""
    forward, calls = Transformer.forward, []

    def nan_at_step_4(self, idx, targets=None, start_pos=0, **kwargs):
        out = forward(self, idx, targets, start_pos, **kwargs)
        if targets is not None and torch.is_grad_enabled():
            calls.append(1)
            if 12 < len(calls) <= 16:  # step 4's four micro-steps
                out = out * float("nan")
        return out

    monkeypatch.setattr(Transformer, "forward", nan_at_step_4)
    train_llama.main([*BASE, f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--max_steps=6",
                      "--save_interval=1"])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("skipped")] == [4]
    assert sorted(losses(tmp_path)) == [1, 2, 3, 5, 6]
    assert not checkpoint.step_dir(tmp_path, 4).exists()  # no checkpoint right after a skipped step
    adam_steps = [s["step"] for s in weights_and_optimizer(tmp_path, 5, flat=False).values()]
    assert all(int(s) == 4 for s in adam_steps)  # 5 steps, one update skipped


def weights_and_optimizer(out_dir: Path, step: int, flat: bool = True) -> dict:
    cfg = load_config(["--config", str(ROOT / "configs" / "tiny.py"), f"--seq_len={SEQ}", "--sample_interval=0"])
    model = build_model(cfg.model_config())
    optimizer = train_llama.build_optimizer(model, cfg, torch.device("cpu"))
    checkpoint.load(checkpoint.step_dir(out_dir, step), {"model": checkpoint.ModelState(model),
                                                         "optim": checkpoint.OptimizerState(model, optimizer)})
    if not flat:
        return optimizer.state
    flat = {f"model.{k}": v for k, v in model.state_dict().items()}
    for i, state in optimizer.state.items():
        flat.update({f"optim.{i}.{k}": v for k, v in state.items() if k != "step"})
    return flat


def test_resume_with_another_model_is_refused(tmp_path, data_dir):
    """Resuming with a different model config names the differences and stops."""
    run_here(tmp_path, data_dir, "--max_steps=1")
    proc = run_here(tmp_path, data_dir, "--max_steps=2", "--model=124m", check=False)
    assert proc.returncode == 2
    assert "cannot resume with a different model" in proc.stderr and "n_layers" in proc.stderr


@pytest.mark.parametrize("extra,message", [
    (["--no_such_knob=1"], "unknown config key --no_such_knob"),
    (["--max_lr=fast"], "--max_lr='fast': expected a float"),
    (["--micro_batch=3"], "is not divisible by micro_batch x seq_len x world_size"),
    (["--data_dir=/nonexistent/shards"], "/nonexistent/shards"),
])
def test_config_errors_are_one_line(tmp_path, extra, message):
    """Unknown key, wrong type, non-dividing batch, missing data: one line on stderr, exit 2."""
    assert message in refusal(tmp_path, Path("/nonexistent/shards"), *extra)


# ----------------------------------------------------------------------------- reliability

def test_extending_a_finished_run_with_new_schedule_knobs(tmp_path, data_dir):
    """A finished 4-step run rerun with max_steps=8 and a new max_lr warns and trains steps 5..8."""
    run_here(tmp_path, data_dir, "--max_steps=4", "--save_interval=2")
    proc = run_here(tmp_path, data_dir, "--max_steps=8", "--max_lr=1e-3", "--save_interval=2")
    assert "warning: changed on resume: max_steps: checkpoint 4 vs now 8" in proc.stdout
    assert "warning: changed on resume: max_lr" in proc.stdout
    assert sorted(losses(tmp_path)) == list(range(1, 9))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows if r["step"] == 5 and "lr" in r] == [pytest.approx(lr_at(
        4, load_config([*BASE, "--max_steps=8", "--max_lr=1e-3"])))]
    assert checkpoint.read_meta(checkpoint.resolve(tmp_path))["step"] == 8


def test_resume_on_changed_data_is_refused_unless_accepted(tmp_path, data_dir):
    """A shard added after the checkpoint: resume refused in one line; accept_new_data goes on."""
    data = tmp_path / "data"
    data.mkdir()
    for f in data_dir.iterdir():
        (data / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "out"
    run_here(out, data, "--max_steps=2", "--save_interval=2")
    np.save(data / "edufineweb_train_000003.npy", np.arange(5000, dtype=np.uint16))
    proc = run_here(out, data, "--max_steps=3", check=False)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "edufineweb_train_000003.npy" in proc.stderr
    assert "--accept_new_data" in proc.stderr
    assert checkpoint.read_meta(checkpoint.resolve(out))["step"] == 2  # nothing lost
    run_here(out, data, "--max_steps=3", "--accept_new_data=true")
    assert max(losses(out)) == 3


def test_resume_never_in_a_used_out_dir_is_refused(tmp_path, data_dir):
    """--resume=never where checkpoints exist: refused; --start_over=archive moves them aside."""
    run_here(tmp_path, data_dir, "--max_steps=2", "--save_interval=2")
    proc = run_here(tmp_path, data_dir, "--max_steps=2", "--resume=never", check=False)
    assert proc.returncode == 2 and "--start_over=archive" in proc.stderr
    assert checkpoint.resolve(tmp_path).name == "step_0000002"
    run_here(tmp_path, data_dir, "--max_steps=1", "--save_interval=1", "--resume=never", "--start_over=archive")
    assert checkpoint.resolve(tmp_path).name == "step_0000001"
    archived = list(tmp_path.glob("archive_*/step_0000002/meta.json"))
    assert len(archived) == 1


def test_start_over_keeps_the_new_runs_metrics(tmp_path, data_dir):
    """--start_over=delete and =archive: the new run's rows land in out_dir/metrics.jsonl, the old
    run's metrics, log and spikes/ go (to the archive), and the archive gains nothing new."""
    run_here(tmp_path, data_dir, "--max_steps=2", "--save_interval=2")
    (tmp_path / "spikes").mkdir()
    (tmp_path / "spikes" / "step_0000001.json").write_text("{}")
    run_here(tmp_path, data_dir, "--max_steps=1", "--save_interval=1", "--resume=never", "--start_over=delete")
    assert max(losses(tmp_path)) == 1 and not (tmp_path / "spikes").exists()
    deleted_run = (tmp_path / "metrics.jsonl").read_text()
    (tmp_path / "spikes").mkdir()
    run_here(tmp_path, data_dir, "--max_steps=3", "--save_interval=3", "--resume=never", "--start_over=archive")
    archive = next(tmp_path.glob("archive_*"))
    assert (archive / "metrics.jsonl").read_text() == deleted_run
    assert (archive / "spikes").is_dir() and not (tmp_path / "spikes").exists()
    assert (archive / "log.txt").is_file() and max(losses(tmp_path)) == 3
    assert min(losses(tmp_path)) == 1


def _resume_worker(rank: int, init_file: str, out_dir: str, data_dir: str) -> None:
    """find_resume_checkpoint on two gloo ranks, rank 1 seeing a stale `latest` (step 1)."""
    from datetime import timedelta

    import torch.distributed as dist

    from llama_fineweb.continuation import find_resume_checkpoint
    from llama_fineweb.train_config import load_config
    from llama_fineweb.utils import Dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        if rank == 1:
            checkpoint.resolve = lambda path: Path(out_dir) / "step_0000001"
        cfg = load_config([*BASE, f"--data_dir={data_dir}", f"--out_dir={out_dir}", "--max_steps=3"])
        found = find_resume_checkpoint(cfg, Dist(rank=rank, world_size=2), metrics.Logger(out_dir, False))
        Path(out_dir, f"rank{rank}.txt").write_text(Path(found).name)
    finally:
        dist.destroy_process_group()


def test_rank_0_chooses_the_resume_checkpoint(tmp_path, data_dir):
    """Two ranks that see different `latest` files resume the checkpoint rank 0 sees."""
    import torch.multiprocessing as mp

    run_here(tmp_path, data_dir, "--max_steps=2", "--save_interval=1")
    mp.spawn(_resume_worker, args=(str(tmp_path / "pg"), str(tmp_path), str(data_dir)), nprocs=2)
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)] == ["step_0000002"] * 2


def test_second_job_on_the_same_out_dir_is_refused(tmp_path, data_dir):
    """Two real processes on one out_dir: the second exits 2 naming the holder; the first goes on."""
    first = start(tmp_path, data_dir, "--max_steps=100000")
    try:
        wait_for_step(tmp_path, 1, first)
        second = run_here(tmp_path, data_dir, "--max_steps=3", check=False)
        assert second.returncode == 2
        assert "is in use by host" in second.stderr and f"pid {first.pid}" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 0
    # The lock went with the first process: a new job may continue the run.
    run_here(tmp_path, data_dir, "--max_steps=100000", f"--stop_step={max(losses(tmp_path)) + 1}")


def test_overwritten_checkpoint_bytes_are_refused(tmp_path, data_dir):
    """4 KiB of 0xff in a .distcp: the checksum refuses it; with --verify=size the NaN check does."""
    run_here(tmp_path, data_dir, "--max_steps=2", "--save_interval=1", "--keep_last=0")
    data_file = next((tmp_path / "step_0000002").glob("*.distcp"))
    with open(data_file, "r+b") as f:
        f.seek(data_file.stat().st_size // 2)
        f.write(b"\xff" * 4096)
    proc = run_here(tmp_path, data_dir, "--max_steps=3", check=False)
    assert proc.returncode == 2 and "does not match its recorded checksum" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = run_here(tmp_path, data_dir, "--max_steps=3", "--verify=size", check=False)
    assert proc.returncode == 2 and "NaN or inf" in proc.stderr
    proc = run_here(tmp_path, data_dir, "--max_steps=3", f"--resume={tmp_path / 'step_0000001'}")
    assert "at step 1" in proc.stdout


@pytest.mark.parametrize("knob,message", [
    ("--micro_batch=0", "--micro_batch=0 must be positive"),
    ("--micro_batch=-8", "--micro_batch=-8 must be positive"),
    ("--total_batch_tokens=0", "--total_batch_tokens=0 must be positive"),
    ("--log_interval=0", "--log_interval=0 must be positive"),
    ("--max_steps=-1", "--max_steps=-1 must be positive"),
    ("--eval_interval=2 --val_sequences=0", "--val_sequences=0 must be positive"),
    ("--max_lr=-1", "--max_lr=-1.0 must be positive"),
    ("--beta2=1.5", "--beta2=1.5 must be in [0, 1)"),
    ("--min_lr=1", "--min_lr=1.0 is above --max_lr"),
    ("--keep_last=-1", "--keep_last=-1 must be 0 or more"),
    ("--dtype=float64", "--dtype='float64'"),
    ("--verify=maybe", "--verify='maybe'"),
    ("--seq_len=100", "is not a multiple of --seq_len=100"),
])
def test_nonsense_knobs_are_one_line_errors(tmp_path, data_dir, knob, message):
    """Each value that cannot work is refused at start in one line naming it, exit 2."""
    assert message in refusal(tmp_path, data_dir, *knob.split())
    assert not (tmp_path / "metrics.jsonl").exists()


def test_disk_full_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, data_dir):
    """ENOSPC on a small tmpfs: one line naming the directory, no partial left, step 2 intact."""
    mount = tmp_path / "small"
    mount.mkdir()
    # One tiny checkpoint (~80 MB with AdamW) fits; a second does not.
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=120m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here; test_checkpoint covers ENOSPC by injection")
    try:
        proc = run_here(mount, data_dir, "--max_steps=4", "--save_interval=2", "--keep_last=1", check=False)
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        assert "disk full" in proc.stderr and "GiB free" in proc.stderr
        assert not list(mount.glob(".tmp_step_*"))
        assert checkpoint.resolve(mount).name == "step_0000002"
        checkpoint.load_model(mount, verify_files="full")
    finally:
        subprocess.run(["umount", str(mount)])


def test_under_torchrun_an_error_is_one_line_from_rank_0(tmp_path):
    """Two ranks that both fail: one error line (rank 0's), no worker traceback, non-zero exit."""
    proc = run(tmp_path, Path("/nonexistent/shards"), nproc=2, check=False)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "train_llama.py: error:" in line]
    assert len(lines) == 1 and "/nonexistent/shards" in lines[0]
    assert 'train_llama.py", line' not in proc.stderr  # no Python traceback from a worker


@pytest.mark.parametrize("source", ["missing", "other_model"])
def test_init_from_errors_are_one_line(tmp_path, data_dir, source):
    """--init_from a missing path or a checkpoint of another shape: one line, exit 2."""
    if source == "other_model":
        config = tmp_path / "two_layers.py"
        config.write_text("from llama_fineweb.train_config import TrainConfig\n\n\ndef config():\n"
                          "    return TrainConfig(model='tiny', model_overrides={'n_layers': 2})\n")
        argv = [str(config) if a.endswith("tiny.py") else a for a in BASE]
        subprocess.run([sys.executable, str(ROOT / "train_llama.py"), *argv, f"--data_dir={data_dir}",
                        f"--out_dir={tmp_path / 'other'}", "--max_steps=1", "--save_interval=1"],
                       check=True, capture_output=True, cwd=ROOT)
        path, message = tmp_path / "other", "n_layers: 4 vs 2"
    else:
        path, message = tmp_path / "nothing_here", "does not exist"
    assert message in refusal(tmp_path / "new", data_dir, f"--init_from={path}", "--max_steps=1")


def test_step_time_excludes_evaluation_and_checkpoints(tmp_path, data_dir, monkeypatch):
    """A slow validation and save show up as eval_s / save_s, not in the step's ms or tokens/s."""
    validation, save, real_clock = train_llama.validation_loss, train_llama.checkpoint.save, time.perf_counter
    save_in_background = train_llama.checkpoint.AsyncSaver.save
    lost = [0.0]  # seconds the slow parts "take", added to the clock without sleeping

    def slow_validation(run):
        lost[0] += 100.0
        return validation(run)

    def slow_save(*args, **kwargs):
        lost[0] += 100.0
        return save(*args, **kwargs)

    monkeypatch.setattr(time, "perf_counter", lambda: real_clock() + lost[0])
    monkeypatch.setattr(train_llama, "validation_loss", slow_validation)
    def slow_start_of_a_background_save(saver, *args, **kwargs):
        lost[0] += 100.0
        return save_in_background(saver, *args, **kwargs)

    monkeypatch.setattr(train_llama.checkpoint, "save", slow_save)
    monkeypatch.setattr(train_llama.checkpoint.AsyncSaver, "save", slow_start_of_a_background_save)
    train_llama.main([*BASE, f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--max_steps=4",
                      "--eval_interval=2", "--save_interval=2"])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "ms" in r]
    assert len(steps) == 4 and max(r["ms"] for r in steps) < 50_000
    assert min(r["eval_s"] for r in rows if "eval_s" in r) >= 100.0
    assert min(r["save_s"] for r in rows if "save_s" in r) >= 100.0


def test_a_full_disk_under_metrics_jsonl_is_named_and_its_torn_line_skipped(tmp_path, data_dir, capsys):
    """metrics.jsonl on a full device: one line naming it. A torn last record: readers skip and count
    it, and a resumed run starts its records on a fresh line."""
    (tmp_path / "metrics.jsonl").symlink_to("/dev/full")
    line = refusal(tmp_path, data_dir, "--max_steps=2")
    assert f"disk full while writing {tmp_path / 'metrics.jsonl'}" in line
    (tmp_path / "metrics.jsonl").unlink()
    run_here(tmp_path, data_dir, "--max_steps=2", "--save_interval=2")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "lo')
    assert max(r["step"] for r in metrics.read_metrics(tmp_path)) == 2
    run_here(tmp_path, data_dir, "--max_steps=3")
    rows = metrics.read_metrics(tmp_path)
    assert [r["loss"] for r in rows if r["step"] == 3 and "loss" in r]
    # Read once before the resume; the resume cut metrics.jsonl back to its checkpoint, torn line included.
    assert capsys.readouterr().err.count("skipped 1 torn line(s) (line ") == 1
