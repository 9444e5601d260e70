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

import checkpoint
import train_llama

ROOT = Path(__file__).resolve().parent.parent
SEQ = 32
# 8 sequences x 32 tokens per step: accumulation 4 at micro-batch 2 on one process, 2 on two.
BASE = [
    "--config", str(ROOT / "configs" / "tiny.py"), "--prepare_local_data=false", f"--seq_len={SEQ}",
    f"--total_batch_tokens={8 * SEQ}", "--micro_batch=2", "--max_steps=12", "--warmup_steps=3", "--max_lr=6e-4", "--min_lr=6e-5",
    "--eval_interval=0", "--sample_interval=0", "--save_interval=0", "--val_sequences=8",
    "--device=cpu", "--keep_last=0",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Random-token shards under the reference names: a val shard and two train shards."""
    path = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    for i, split in enumerate(["val", "train", "train"]):
        tokens = rng.integers(0, 50257, size=20_000, dtype=np.uint16)
        np.save(path / f"edufineweb_{split}_{i:06d}.npy", tokens)
    return path


def run(out_dir: Path, data_dir: Path, *extra: str, nproc: int = 1, check: bool = True,
        timeout: int = 300) -> subprocess.CompletedProcess:
    args = [*BASE, f"--data_dir={data_dir}", f"--out_dir={out_dir}", *extra]
    if nproc == 1:
        cmd = [sys.executable, str(ROOT / "train_llama.py"), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", str(ROOT / "train_llama.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def losses(out_dir: Path) -> dict[int, float]:
    """step -> train loss from metrics.jsonl (a resumed run's entries replace earlier ones)."""
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def weights(out_dir: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load_model(out_dir).state_dict()


def assert_close(a: dict, b: dict, tol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        diff = (a[k] - b[k]).abs().max().item() if isinstance(a[k], torch.Tensor) else abs(a[k] - b[k])
        assert diff <= tol, f"{k}: differs by {diff}"


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_dir) -> Path:
    """An uninterrupted 12-step single-process run, the reference for the others."""
    out = tmp_path_factory.mktemp("straight")
    run(out, data_dir, "--eval_interval=4")
    return out


def test_resume_equals_straight_run(tmp_path, data_dir, straight):
    """6 steps, then a resumed 6: bitwise the same losses, val losses and final weights."""
    run(tmp_path, data_dir, "--eval_interval=4", "--stop_step=6")
    assert sorted(losses(tmp_path)) == list(range(1, 7))
    proc = run(tmp_path, data_dir, "--eval_interval=4")
    assert "resumed from" in proc.stdout and "at step 6" in proc.stdout
    assert losses(tmp_path) == losses(straight)
    val = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    val_ref = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in val if "val_loss" in r] == [r for r in val_ref if "val_loss" in r]
    for k, v in weights(straight).items():
        assert torch.equal(v, weights(tmp_path)[k]), k


def test_ddp_two_processes_match_one(tmp_path, data_dir, straight):
    """torchrun with 2 gloo processes equals 1 process with twice the accumulation."""
    proc = run(tmp_path, data_dir, "--eval_interval=4", nproc=2)
    assert "2 accumulation x 2 processes" in proc.stdout
    assert_close(losses(tmp_path), losses(straight), 1e-5)
    assert_close(weights(tmp_path), weights(straight), 1e-5)


@pytest.mark.parametrize("first,second", [(2, 1), (1, 2)])
def test_resume_on_another_world_size(tmp_path, data_dir, straight, first, second):
    """A checkpoint written by N processes resumes on M with the losses of the straight run."""
    run(tmp_path, data_dir, "--stop_step=5", nproc=first)
    proc = run(tmp_path, data_dir, nproc=second)
    assert f"written by {first} processes" in proc.stdout
    assert_close(losses(tmp_path), losses(straight), 1e-5)
    assert_close(weights(tmp_path), weights(straight), 1e-5)


def logged_steps(out_dir: Path) -> int:
    path = out_dir / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def test_sigkill_at_random_moments_always_leaves_a_loadable_checkpoint(tmp_path, data_dir, straight):
    """Killed with SIGKILL again and again (half of the kills mid-save), it resumes exactly."""
    rng = random.Random(0)
    args = [*BASE, f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--save_interval=1", "--keep_last=2"]
    cmd = [sys.executable, str(ROOT / "train_llama.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    last_step, killed_mid_save = 0, 0
    for attempt in range(4):
        logged_before = logged_steps(tmp_path)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
        deadline = time.monotonic() + 120
        if attempt % 2:
            # Kill the moment a checkpoint is being written.
            while not list(tmp_path.glob(".tmp_step_*")) and time.monotonic() < deadline:
                time.sleep(0.001)
        else:
            # Kill at a random moment once this run has logged a step.
            while logged_steps(tmp_path) <= logged_before and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 1.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
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


def test_sigterm_saves_and_exits_zero(tmp_path, data_dir):
    """SIGTERM: finish the step, save, exit 0; the resumed run continues at the next step."""
    args = [*BASE, f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--max_steps=100000"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_llama.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    output = []
    for line in proc.stdout:
        output.append(line)
        if line.startswith("step      3/"):
            proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, "".join(output)
    text = "".join(output)
    assert "received SIGTERM" in text and "saved checkpoint" in text
    saved_step = checkpoint.read_meta(checkpoint.resolve(tmp_path))["step"]
    assert saved_step >= 3
    resumed = run(tmp_path, data_dir, "--max_steps=100000", f"--stop_step={saved_step + 2}")
    assert f"at step {saved_step}" in resumed.stdout
    assert f"step {saved_step + 1:6d}/" in resumed.stdout


def test_nonfinite_loss_skips_the_update(tmp_path, data_dir):
    """A NaN loss at one step leaves weights and optimizer unchanged there; training goes on."""
    proc = run(tmp_path, data_dir, "--max_steps=6", "--save_interval=1", "--fault_nan_step=3")
    assert "step 4: non-finite loss or gradient norm, update skipped" in proc.stdout
    assert "step      6/6" in proc.stdout
    before, after = weights_and_optimizer(tmp_path, 3), weights_and_optimizer(tmp_path, 4)
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert not torch.equal(weights_and_optimizer(tmp_path, 5)["model.output.weight"], after["model.output.weight"])


def weights_and_optimizer(out_dir: Path, step: int) -> dict[str, torch.Tensor]:
    cfg = train_llama.load_config(["--config", str(ROOT / "configs" / "tiny.py"), f"--seq_len={SEQ}"])
    model = train_llama.build_model(cfg, torch.device("cpu"))
    optimizer = train_llama.build_optimizer(model, cfg, torch.device("cpu"))
    checkpoint.load(checkpoint.step_dir(out_dir, step), model, optimizer)
    flat = {f"model.{k}": v for k, v in model.state_dict().items()}
    for i, state in optimizer.state.items():
        flat.update({f"optim.{i}.{k}": v for k, v in state.items() if k != "step"})
    return flat


def test_compiled_run_trains_evaluates_and_samples(tmp_path, data_dir):
    """With torch.compile (CPU inductor): training steps, validation loss and a sample all work."""
    proc = run(tmp_path, data_dir, "--compile_cpu=true", "--max_steps=2", "--eval_interval=2",
               "--sample_interval=2", "--sample_tokens=8", timeout=600)
    assert "compile True" in proc.stdout
    assert "step      2/2" in proc.stdout
    assert "step 2: val loss" in proc.stdout
    assert "step 2: sample: " in proc.stdout


def test_resume_with_another_model_is_refused(tmp_path, data_dir):
    """Resuming with a different model config names the differences and stops."""
    run(tmp_path, data_dir, "--max_steps=1")
    proc = run(tmp_path, data_dir, "--max_steps=2", "--model=124m", check=False)
    assert proc.returncode == 2
    assert "cannot resume with a different model" in proc.stderr and "n_layers" in proc.stderr


@pytest.mark.parametrize("extra,message", [
    (["--no_such_knob=1"], "unknown config key --no_such_knob"),
    (["--max_lr=fast"], "--max_lr='fast': expected a float"),
    (["--micro_batch=3"], "is not divisible by micro_batch x seq_len x world_size"),
    (["--data_dir=/nonexistent/shards"], "/nonexistent/shards"),
])
def test_config_errors_are_one_line(tmp_path, capsys, extra, message):
    """Unknown key, wrong type, non-dividing batch, missing data: one line on stderr, exit 2."""
    argv = [*BASE, f"--out_dir={tmp_path}", "--data_dir=/nonexistent/shards", *extra]
    with pytest.raises(SystemExit) as e:
        train_llama.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
