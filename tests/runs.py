"""Running train_llama.py on the tiny model from the tests, and reading what a run wrote.

`run` starts the real script (or torchrun with gloo processes); `run_here` calls its main() in
the test's own process (`call_main`, for any script), which saves an interpreter start and the
imports: for tests of what a run refuses or prints. conftest.py holds the shared `data_dir` and `straight` fixtures.
"""

import io
import json
import os
import subprocess
import sys
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import torch

import train_llama
from llama_fineweb import checkpoint

ROOT = Path(__file__).resolve().parent.parent
SEQ = 32
# 8 sequences x 32 tokens per step: accumulation 4 at micro-batch 2 on one process, 2 on two.
BASE = [
    "--config", str(ROOT / "configs" / "tiny.py"), "--prepare_local_data=false", f"--seq_len={SEQ}",
    f"--total_batch_tokens={8 * SEQ}", "--micro_batch=2", "--max_steps=12", "--warmup_steps=3", "--max_lr=6e-4", "--min_lr=6e-5",
    "--eval_interval=0", "--sample_interval=0", "--save_interval=0", "--val_sequences=8",
    "--device=cpu", "--keep_last=0",
]
# Validation on 5 sequences: 2 and 3 (1 and 2 batches) on two ranks, so an FSDP evaluation must not
# need the ranks to run equal numbers of forwards. Samples at steps 0, 6 and 12.
EVAL = ["--eval_interval=4", "--val_sequences=5", "--sample_interval=6", "--sample_tokens=4"]


def run(out_dir: Path, data_dir: Path, *extra: str, nproc: int = 1, check: bool = True,
        timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    args = [*BASE, f"--data_dir={data_dir}", f"--out_dir={out_dir}", *extra]
    if nproc == 1:
        cmd = [sys.executable, str(ROOT / "train_llama.py"), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", str(ROOT / "train_llama.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def run_here(out_dir: Path, data_dir: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    """train_llama.main in this process; see call_main."""
    return call_main(train_llama.main, [*BASE, f"--data_dir={data_dir}", f"--out_dir={out_dir}", *extra], check)


def one_line(proc: subprocess.CompletedProcess) -> str:
    """The line on stderr of a refused command: exit 2 and one line only."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    return lines[0]


def refusal(out_dir: Path, data_dir: Path, *extra: str) -> str:
    """The line on stderr of a run train_llama.py refuses (in-process): exit 2 and one line only."""
    return one_line(run_here(out_dir, data_dir, *extra, check=False))


def call_main(main, argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
    """A script's main(argv) in this process, on one thread as `run` has; its stdout, stderr and
    exit status come back as from `run`."""
    out, err, code, threads = io.StringIO(), io.StringIO(), 0, torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with redirect_stdout(out), redirect_stderr(err), warnings.catch_warnings():
            # Warnings the filters let through reach the captured stderr, not pytest's summary, so a
            # test of "one line on stderr" still sees them.
            warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: err.write(
                warnings.formatwarning(message, category, filename, lineno, line))
            main(argv)
    except SystemExit as e:
        code = e.code or 0
    finally:
        torch.set_num_threads(threads)
    if check and code:
        raise AssertionError(f"exit {code}\n{out.getvalue()[-3000:]}\n{err.getvalue()[-3000:]}")
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def metric_rows(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def losses(out_dir: Path) -> dict[int, float]:
    """step -> train loss of the applied steps in metrics.jsonl (a resumed or rolled-back run's
    entries replace earlier ones; spike and skip records, which carry a loss too, are left out)."""
    return {r["step"]: r["loss"] for r in metric_rows(out_dir) if "loss" in r and "event" not in r}


def grad_norms(out_dir: Path) -> dict[int, float]:
    """step -> pre-clip gradient norm of the applied steps (as `losses`). Equivalence tests compare
    it too: AdamW and clipping at 1.0 largely cancel a uniform gradient scale, which the losses and
    weights then hide."""
    return {r["step"]: r["grad_norm"] for r in metric_rows(out_dir) if "grad_norm" in r and "event" not in r}


def val_losses(out_dir: Path) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in metric_rows(out_dir) if "val_loss" in r}


def weights(out_dir: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load_model(out_dir).state_dict()


def assert_close(a: dict, b: dict, tol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        diff = (a[k] - b[k]).abs().max().item() if isinstance(a[k], torch.Tensor) else abs(a[k] - b[k])
        assert diff <= tol, f"{k}: differs by {diff}"
