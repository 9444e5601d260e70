"""benchmarks/gpu_check.py on the CPU: every row runs and reports, and a row that crashes or hangs
is reported as such without stopping the rows after it."""

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402


def test_cpu_battery_reports_every_row(tmp_path):
    """Without CUDA the one command runs every row on the tiny model: one JSON line per row, all ok
    (the activation projection skipped: it needs CUDA's peak memory), FSDP, per-block compile and
    activation checkpointing at the same micro-batch train like the plain compiled step, the table
    printed last."""
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["row"] for r in rows] == [*gpu_check.ROWS, "activations"]
    for r in rows:
        expected = "skipped: needs CUDA" if r["row"] == "activations" else "ok"
        assert r["verdict"].startswith(expected), (r["row"], r["verdict"], r.get("stderr_tail"))
    by_name = {r["row"]: r for r in rows}
    for name in ("compiled_mb8", "compiled_mb16", "eager_mb8", "eager_mb16", "train_llama", "loss", "fsdp_mb16",
                 "blocks_mb16", "ac_full_mb32", "ac_selective_mb16"):
        assert by_name[name]["tokens_per_s"] > 0 and by_name[name]["ms_per_step"] > 0, name
    assert by_name["compiled_mb16"]["graph_breaks"] == 0 and by_name["compiled_mb16"]["top_kernels"]
    assert by_name["fsdp_mb16"]["sharded"] and not by_name["compiled_mb16"]["sharded"]
    assert by_name["blocks_mb16"]["compile_s"] > 0
    for name in ("fsdp_mb16", "blocks_mb16", "ac_selective_mb16"):
        assert abs(by_name[name]["loss"] - by_name["compiled_mb16"]["loss"]) <= 1e-5, name
    assert by_name["resume"]["max_loss_diff"] == 0.0
    assert by_name["ddp"]["max_loss_diff"] <= 1e-4
    table = proc.stdout.rstrip().splitlines()[-len(rows) - 1:]
    assert table[0].split()[:2] == ["row", "config"]
    assert [line.split()[0] for line in table[1:]] == [r["row"] for r in rows]
    assert (tmp_path / "table.txt").read_text().rstrip().endswith(table[-1])


def test_a_crashing_or_hanging_row_does_not_stop_the_others(tmp_path):
    """A crash is reported with its error line; a hang is stopped at its timeout together with
    everything it started; the row after them still runs and reports its own result."""
    grandchild = tmp_path / "grandchild.pid"
    hang = ("import subprocess, sys, time; "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
            f"open({str(grandchild)!r}, 'w').write(str(p.pid)); time.sleep(600)")
    fine = f"open({str(tmp_path / 'rows' / 'fine.json')!r}, 'w').write('{{\"verdict\": \"ok: fine\"}}')"
    commands = {
        "crash": [sys.executable, "-c", "raise ValueError('shard 7 is truncated')"],
        "hang": [sys.executable, "-c", hang],
        "fine": [sys.executable, "-c", fine],
    }
    results = gpu_check.run_commands(commands, tmp_path, dict(os.environ), timeout=5,
                                     deadline=time.monotonic() + 120, log=lambda msg: None)
    assert results["crash"]["verdict"] == "failed: exit 1: ValueError: shard 7 is truncated"
    assert "Traceback" in results["crash"]["stderr_tail"][0]
    assert results["hang"]["verdict"] == "timeout after 5 s"
    assert results["fine"]["verdict"] == "ok: fine"
    pid = int(grandchild.read_text())
    stat = Path(f"/proc/{pid}/stat")
    # Gone, or a zombie that nobody has reaped yet: either way it no longer runs.
    assert not stat.exists() or stat.read_text().split(")")[-1].split()[0] == "Z"


def test_rows_past_the_budget_are_skipped(tmp_path):
    """A row still running when the time budget is spent is stopped and reported as skipped, not as
    a timeout; the rows after it are not started but reported as skipped."""
    commands = {"cut": [sys.executable, "-c", "import time; time.sleep(600)"],
                "late": [sys.executable, "-c", "pass"]}
    results = gpu_check.run_commands(commands, tmp_path, dict(os.environ), timeout=60,
                                     deadline=time.monotonic() + 5.5, log=lambda msg: None)
    assert results["cut"]["verdict"].startswith("skipped: stopped after")
    assert results["late"]["verdict"].startswith("skipped: the time budget")
    assert not (tmp_path / "logs" / "late.out").exists()


def test_train_llama_benchmark_is_read_in_both_formats():
    """The `benchmark_json:` line when train_llama prints it, else the older human-readable line."""
    new = ("benchmark: 1,234 tokens/s | MFU - | 5.0 ms/step | peak memory -\n"
           'benchmark_json: {"steps": 3, "ms_per_step": 5.0, "tokens_per_s": 1234.5, "mfu": null, '
           '"peak_mem_gib": null, "first_step_s": 2.5, "elapsed_s": 2.6}\n')
    assert gpu_check.parse_benchmark(new)["first_step_s"] == 2.5
    old = ("benchmark: 441,337 tokens/s | MFU 48.3% | 1188.0 ms/step | peak memory 61.2 GiB "
           "(median of the last 20 of 30 steps)\n")
    assert gpu_check.parse_benchmark(old) == {"tokens_per_s": 441337.0, "mfu": 0.483, "ms_per_step": 1188.0,
                                              "peak_mem_gib": 61.2}
    cpu = "benchmark: 2,843 tokens/s | MFU - (no known peak for this device) | 90.0 ms/step | peak memory - (x)"
    assert gpu_check.parse_benchmark(cpu)["mfu"] is None


def test_activation_memory_is_the_slope_of_two_peaks(tmp_path):
    """Peaks of 40 and 60 GiB at micro-batches 8 and 16: 2.5 GiB per sample, so 24 needs 80 GiB
    (over an 80 GB card's 79) and 32 needs 100."""
    args = gpu_check.parse_args(["--device", "cpu", "--out", str(tmp_path)])
    plan = dataclasses.replace(gpu_check.make_plan(args), device="cuda", micro_batches=[8, 16], mem_cap_gib=79)
    row = gpu_check.activations_row({"compiled_mb8": {"peak_gib": 40.0}, "compiled_mb16": {"peak_gib": 60.0}}, plan)
    assert row["activation_bytes_per_sample"] == 2.5 * 2**30
    assert row["projected_gib"] == {24: 80.0, 32: 100.0}
    assert row["verdict"] == "ok: 2.50 GiB/sample; mb24 80.0 GiB (over the cap), mb32 100.0 GiB (over the cap)"
