"""benchmarks/gpu_check.py on the CPU: both device calls run every row and report, the first call's
schedule returns the headline on a slow cold GPU, and a row that crashes or hangs is reported as
such without stopping the rows after it."""

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
import gpu_rows  # noqa: E402


def test_cpu_battery_runs_both_calls(tmp_path):
    """Without CUDA each call runs its rows on the tiny model: one JSON line per row, all ok (the
    activation projection skipped: it needs CUDA's peak memory); the headline compiles one block
    graph and skips no frame; FSDP compiles per block, skips no frame and trains like the headline,
    as whole-model compile and activation checkpointing do; the attention row ran flash and math
    inside the model; the table is printed last. The two calls run side by side, one row at a time each."""
    # A budget well above the rows' CPU time: this test is about what each row measures, and a busy
    # machine must not turn a row into "skipped" (test_first_call_... tests the budget itself).
    procs = {call: subprocess.Popen([sys.executable, "benchmarks/gpu_check.py", "--call", str(call), "--jobs", "1",
                                     "--out", str(tmp_path / f"call{call}"), "--cache_dir", str(tmp_path / "cache"),
                                     "--budget", "1200"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                    env={**os.environ, "OMP_NUM_THREADS": "1"})
             for call in (1, 2)}
    rows = {}
    for call, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=1500)
        assert proc.returncode == 0, stdout[-4000:] + stderr[-2000:]
        lines = [json.loads(line) for line in (tmp_path / f"call{call}" / "results.jsonl").read_text().splitlines()]
        assert [r["row"] for r in lines] == gpu_rows.CALLS[call] + (["activations"] if call == 1 else [])
        table = stdout.rstrip().splitlines()[-len(lines) - 1:]
        assert table[0].split()[:2] == ["row", "config"]
        assert [line.split()[0] for line in table[1:]] == [r["row"] for r in lines]
        assert (tmp_path / f"call{call}" / "table.txt").read_text().rstrip().endswith(table[-1])
        rows.update({r["row"]: r for r in lines})
    for r in rows.values():
        expected = "skipped: needs CUDA" if r["row"] == "activations" else "ok"
        assert r["verdict"].startswith(expected), (r["row"], r["verdict"], r.get("stderr_tail"))
    headline = rows[gpu_rows.HEADLINE]
    assert headline["compile_mode"] == "blocks" and headline["graphs"] == 1 and headline["frames_skipped"] == 0
    assert headline["top_kernels"] and headline["flops_per_token"] > 0
    for name in ("train_llama", "loss", "blocks_mb8", "eager_mb8", "seq2048_mb8", "fsdp_mb16", "ac_full_mb32",
                 "ac_selective_mb16", "model_mb16"):
        assert rows[name]["tokens_per_s"] > 0 and rows[name]["ms_per_step"] > 0, name
    assert rows["seq2048_mb8"]["seq_len"] == 2 * headline["seq_len"]
    fsdp = rows["fsdp_mb16"]
    assert fsdp["sharded"] and not headline["sharded"]
    assert fsdp["compile_mode"] == "blocks" and fsdp["frames_skipped"] == 0 and fsdp["graph_breaks"] == 0
    for name in ("fsdp_mb16", "ac_selective_mb16", "model_mb16"):
        assert abs(rows[name]["loss"] - headline["loss"]) <= 1e-5, name
    ran = {k.split("_")[0]: v["ops"] for k, v in rows["attention"]["variants"].items() if "ms" in v}
    assert any("flash" in op for op in ran["flash"]) and all("math" in op for op in ran["math"])
    assert rows["resume"]["max_loss_diff"] == 0.0
    assert rows["ddp"]["max_loss_diff"] <= 1e-4


def test_first_call_returns_the_headline_on_a_slow_cold_gpu(tmp_path):
    """The first call's schedule, run at a fiftieth of its time with each row a stand-in that takes
    twice its cold-GPU estimate: the environment and the headline still finish inside the budget,
    and the rows after them are stopped or skipped for it, not the headline."""
    scale, slowdown = 0.02, 2.0
    names = gpu_rows.CALLS[1]
    assert names[:2] == ["env", gpu_rows.HEADLINE]
    done = tmp_path / "rows"
    commands = {n: [sys.executable, "-c", f"import time; time.sleep({gpu_rows.ROWS[n].cold_s * scale * slowdown}); "
                                          f"open({str(done / (n + '.json'))!r}, 'w').write('{{\"verdict\": \"ok\"}}')"]
                for n in names}
    results = gpu_check.run_rows(names, commands, tmp_path, dict(os.environ), gpu_check.BUDGET_S[1] * scale,
                                 cuda=True, jobs=4, time_scale=scale, log=lambda msg: None)
    assert results["env"]["verdict"] == results[gpu_rows.HEADLINE]["verdict"] == "ok"
    # The budget, not the headline, gave way: the last rows were stopped or never started.
    assert results[names[-1]]["verdict"].startswith("skipped"), results


def test_a_skipped_frame_is_a_mismatch():
    """A compiled row whose dynamo skipped a frame (it ran eagerly) is a mismatch, even with no graph break."""
    stats = {"graphs": 3, "graph_breaks": 0, "recompiles": 0, "frames_skipped": 1,
             "skipped_frames": ["forward (model.py:338)"]}
    assert gpu_rows.compile_verdict(stats) == ("mismatch: 3 graphs, 0 graph breaks, 0 recompiles, 1 frames skipped: "
                                               "forward (model.py:338)")
    assert gpu_rows.compile_verdict({**stats, "frames_skipped": 0}).startswith("ok")


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
    assert gpu_rows.parse_benchmark(new)["first_step_s"] == 2.5
    old = ("benchmark: 441,337 tokens/s | MFU 48.3% | 1188.0 ms/step | peak memory 61.2 GiB "
           "(median of the last 20 of 30 steps)\n")
    assert gpu_rows.parse_benchmark(old) == {"tokens_per_s": 441337.0, "mfu": 0.483, "ms_per_step": 1188.0,
                                             "peak_mem_gib": 61.2}
    cpu = "benchmark: 2,843 tokens/s | MFU - (no known peak for this device) | 90.0 ms/step | peak memory - (x)"
    assert gpu_rows.parse_benchmark(cpu)["mfu"] is None


def test_activation_memory_is_the_slope_of_two_peaks(tmp_path):
    """Peaks of 40 and 60 GiB at micro-batches 8 and 16: 2.5 GiB per sample, so 24 needs 80 GiB
    (over an 80 GB card's 79) and 32 needs 100."""
    args = gpu_check.parse_args(["--device", "cpu", "--out", str(tmp_path)])
    plan = dataclasses.replace(gpu_rows.make_plan(args), device="cuda", other_micro_batch=8, micro_batch=16,
                               mem_cap_gib=79)
    row = gpu_rows.activations_row({"blocks_mb8": {"peak_gib": 40.0}, "blocks_mb16": {"peak_gib": 60.0}}, plan)
    assert row["activation_bytes_per_sample"] == 2.5 * 2**30
    assert row["projected_gib"] == {24: 80.0, 32: 100.0}
    assert row["verdict"] == "ok: 2.50 GiB/sample; mb24 80.0 GiB (over the cap), mb32 100.0 GiB (over the cap)"
