"""The GPU battery: speed, memory and correctness of the real training path, in two device calls.

    python benchmarks/gpu_check.py                     # call 1: env, then the headline row first
    python benchmarks/gpu_check.py --call 2            # call 2: the rest, most wanted first
    python benchmarks/gpu_check.py --rows env,loss     # named rows (--list shows them by call)
    python benchmarks/gpu_check.py --quick             # the tiny model, on whatever device there is

GPU time comes rarely and briefly, so this is prepared and tested on the CPU: without CUDA the same
commands run every row on the tiny model (NCCL becomes gloo, no memory cap, torch.compile with
dynamo's "eager" backend, which counts graph breaks, skipped frames and recompiles as inductor
would but builds no C++), and tests/test_gpu_check.py runs them that way. Call 1 puts the headline
(1p7b compiled per block at the default micro-batch, MFU over 5 optimizer steps) right after the
environment, so that it returns within one device call on a cold machine. Each row runs in its own
process group with its own timeout: a crash, an out-of-memory or a hang is that row's verdict and
the others run on; a row the budget left cannot hold is skipped. Each row adds one JSON line to
OUT/results.jsonl; the table is printed last and saved as OUT/table.txt; each row's stdout and
stderr are in OUT/logs/. All rows share one inductor cache (.cache/inductor in the repo), so a
graph one row compiled is loaded, not compiled again, by the next, and by the next call. The rows
themselves (what each measures, its estimate and timeout) are in gpu_rows.py.

Verdicts: "ok[: details]", "warning: ...", "out of memory", "mismatch: ..." (a check ran and
failed, or dynamo skipped a frame), "failed: ..." (the row crashed), "timeout after N s",
"skipped: ...". The exit status is 1 when any row failed, timed out or mismatched.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from gpu_rows import CALLS, REPO, ROWS, Plan, activations_row, error_line, make_plan, torchrun

BUDGET_S = {1: 480, 2: 480}  # each call's --budget: under a 540 s timeout_s, room for set-up and the table


# ----------------------------------------------------------------------------- the parent

def worker(name: str, plan_path: str) -> None:
    """Run one row in this process and leave its result in OUT/rows/NAME.json (rank 0 only)."""
    plan = Plan(**json.loads(Path(plan_path).read_text()))
    result = ROWS[name].run(plan)
    if int(os.environ.get("RANK", "0")) == 0:
        (Path(plan.out) / "rows" / f"{name}.json").write_text(json.dumps(result, default=str))


def row_command(name: str, plan_path: Path) -> list[str]:
    script = [str(Path(__file__).resolve()), "--worker", name, "--plan", str(plan_path)]
    return torchrun(*script) if ROWS[name].torchrun else [sys.executable, *script]


@dataclass
class Running:
    name: str
    proc: subprocess.Popen
    started: float
    deadline: float
    limit: float  # its own timeout


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the row's process group (torchrun passes it on to its workers, which live in a
    group of their own), ten seconds' grace, then SIGKILL to whatever of the group is left."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def tail(path: Path, n: int = 15) -> list[str]:
    if not path.is_file():
        return []
    return path.read_text(errors="replace").splitlines()[-n:]


def finish(name: str, code: int | None, seconds: float, timeout: float, out: Path, by_budget: bool = False) -> dict:
    """The row's JSON line: its own result, or what its exit code and stderr say. A row stopped
    because the budget ran out (`by_budget`), not its own timeout, is skipped, not a hang."""
    err = out / "logs" / f"{name}.err"
    result_path = out / "rows" / f"{name}.json"
    if code is None:
        verdict = (f"skipped: stopped after {seconds:.0f} s, the time budget (--budget) is spent" if by_budget
                   else f"timeout after {timeout:.0f} s")
        return {"row": name, "verdict": verdict, "seconds": seconds, "stderr_tail": tail(err)}
    if code != 0 or not result_path.is_file():
        cause = error_line("\n".join(tail(err, 200)))
        return {"row": name, "verdict": f"failed: exit {code}: {cause[:200]}", "seconds": seconds,
                "stderr_tail": tail(err)}
    return {"row": name, **json.loads(result_path.read_text()), "seconds": seconds}


# The commands and the limits they run under (per-row timeout, overall deadline, parallel width).
def run_commands(commands: dict[str, list[str]], out: Path, env: dict, timeout: float | dict[str, float],
                 deadline: float, width: int = 1, log=print, estimates: dict[str, float] | None = None,
                 least: float = 5.0) -> dict[str, dict]:
    """Run each command as its own process group, `width` at once, each until it exits, its
    timeout (`timeout`, or `timeout[name]`) passes, or the monotonic `deadline`; one result per
    command, in the given order. A command whose estimated seconds (`estimates`) the time left
    cannot hold is not started: it is skipped and the next one tried.

    A command's stdout/stderr go to OUT/logs/NAME.out/.err; its result is OUT/rows/NAME.json if it
    wrote one, else a failed/timeout verdict with the end of its stderr. A row is not started
    with less than `least` seconds left."""
    for sub in ("logs", "rows"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    estimates = estimates or {}
    results: dict[str, dict] = {}
    pending, running = list(commands), []
    while pending or running:
        while pending and len(running) < width:
            name = pending.pop(0)
            now = time.monotonic()
            left = deadline - now
            if left < max(least, estimates.get(name, 0.0)):
                why = (f"needs about {estimates[name]:.0f} s, {left:.0f} s of the budget (--budget) left"
                       if left >= least else "the time budget (--budget) is spent")
                results[name] = {"row": name, "verdict": f"skipped: {why}"}
                log(f"{name}: {results[name]['verdict']}")
                continue
            (out / "rows" / f"{name}.json").unlink(missing_ok=True)
            with open(out / "logs" / f"{name}.out", "w") as stdout, open(out / "logs" / f"{name}.err", "w") as stderr:
                # Its own session, so that a timeout ends everything it started (train_llama, torchrun).
                proc = subprocess.Popen(commands[name], stdout=stdout, stderr=stderr, env=env, cwd=REPO,
                                        start_new_session=True)
            limit = timeout[name] if isinstance(timeout, dict) else timeout
            running.append(Running(name, proc, now, min(now + limit, deadline), limit))
        time.sleep(0.1)
        for r in list(running):
            code, now = r.proc.poll(), time.monotonic()
            if code is None and now < r.deadline:
                continue
            if code is None:
                stop_group(r.proc)
            running.remove(r)
            results[r.name] = finish(r.name, code, now - r.started, r.deadline - r.started, out,
                                     by_budget=r.deadline < r.started + r.limit)
            log(f"{r.name}: {results[r.name]['verdict']} ({now - r.started:.0f} s)")
    return {name: results[name] for name in commands}


def run_rows(names: list[str], commands: dict[str, list[str]], out: Path, env: dict, budget: float, cuda: bool,
             jobs: int, timeout: float | None = None, time_scale: float = 1.0, log=print) -> dict[str, dict]:
    """The schedule of one call: the rows that time things alone, one after another, in their
    order (on the CPU, where nothing is a performance figure, `jobs` at once), then the
    correctness rows `jobs` at once; a quarter of the budget is kept for those, so that a slow
    compile cannot leave them no time. Each row's limit is its timeout_s (or `timeout`), and on
    CUDA a row is started only if the budget left holds its cold_s; `time_scale` scales both
    (tests/test_gpu_check.py runs the plan at a fiftieth of the time, with stand-in rows)."""
    t0 = time.monotonic()
    timed = [n for n in names if not ROWS[n].beside_others]
    beside = [n for n in names if ROWS[n].beside_others]
    reserve = budget / 4 if beside and timed else 0
    limits = {n: (timeout or ROWS[n].timeout_s) * time_scale for n in names}
    estimates = {n: ROWS[n].cold_s * time_scale for n in names} if cuda else {}
    results = {}
    for group, width, deadline in ((timed, 1 if cuda else jobs, t0 + budget - reserve), (beside, jobs, t0 + budget)):
        if group:
            results.update(run_commands({n: commands[n] for n in group}, out, env, limits, deadline, width, log,
                                        estimates, least=5.0 * time_scale))
    return {n: results[n] for n in names}


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(results: list[dict]) -> str:
    cols = [("row", "<17"), ("config", "<62"), ("micro-batch", ">11"), ("tokens/s", ">11"), ("MFU", ">6"),
            ("peak GiB", ">8"), ("reserved", ">8"), ("ms/step", ">9"), ("compile s", ">9"), ("verdict", "<")]
    lines = [" ".join(format(c, spec) for c, spec in cols)]
    for r in results:
        cells = [r["row"], str(r.get("config", ""))[:62], fmt(r.get("micro_batch"), "d"),
                 fmt(r.get("tokens_per_s"), ",.0f"), fmt(r["mfu"] * 100 if r.get("mfu") is not None else None, ".1f"),
                 fmt(r.get("peak_gib"), ".1f"), fmt(r.get("peak_reserved_gib"), ".1f"),
                 fmt(r.get("ms_per_step"), ".1f"), fmt(r.get("compile_s"), ".1f"), r["verdict"]]
        lines.append(" ".join(format(c, spec) for c, (_, spec) in zip(cells, cols, strict=True)))
    return "\n".join(lines)


def header(plan: Plan, argv: list[str]) -> str:
    if plan.cuda:
        card = f"{torch.cuda.get_device_name(0)} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
    else:
        card = f"CPU, {os.cpu_count()} cores (smoke run of the tiny model, not a performance figure)"
    try:  # a copy of the repo on a GPU machine may have no .git, or no git
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                                cwd=REPO, check=False).stdout.strip()
    except OSError:
        commit = ""
    return "\n".join([
        f"card:    {card}",
        f"torch:   {torch.__version__} (CUDA {torch.version.cuda})",
        f"date:    {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, commit {commit or '?'}",
        f"command: python benchmarks/gpu_check.py {' '.join(argv)}".rstrip(),
        f"model:   {plan.model}, seq {plan.seq_len}, {plan.accum} accumulation steps, compile backend {plan.backend}",
    ])


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--call", type=int, choices=sorted(CALLS), default=1,
                        help="which device call's rows: 1 = the headline (default), 2 = the rest")
    parser.add_argument("--rows", help=f"comma-separated rows instead of a call's: {','.join(ROWS)}")
    parser.add_argument("--out", help="results, table, logs (default: out/gpu_check/callN, or out/gpu_check/rows)")
    parser.add_argument("--list", action="store_true", help="list the rows by call and exit")
    parser.add_argument("--quick", action="store_true", help="the tiny model, on CUDA too")
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    parser.add_argument("--timeout", type=float, help="seconds per row (default: each row's own on CUDA, 300 on CPU)")
    parser.add_argument("--budget", type=float,
                        help=f"seconds for all rows; a row the rest cannot hold is skipped (default: {BUDGET_S[1]})")
    parser.add_argument("--jobs", type=int, help="correctness rows run at once (default: 4 on CUDA, 2 on CPU)")
    parser.add_argument("--backend", help="torch.compile backend (default: inductor on CUDA, eager on CPU)")
    parser.add_argument("--mem_cap_gib", type=float, default=79.0,
                        help="the speed rows' CUDA memory cap, to behave like an 80 GB card (0 = none; "
                             "default: %(default)s)")
    parser.add_argument("--peak_tflops", type=float, default=0.0,
                        help="dense bf16 peak of a card metrics.PEAK_BF16_TFLOPS does not know")
    parser.add_argument("--cache_dir", default=str(REPO / ".cache" / "inductor"),
                        help="TORCHINDUCTOR_CACHE_DIR of every row, kept between calls (default: .cache/inductor "
                             "in the repo, git-ignored)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names = args.rows.split(",") if args.rows else CALLS[args.call]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        parser.error(f"unknown row(s) {','.join(unknown)}; choose from {','.join(ROWS)}")
    args.names = names
    args.out = args.out or str(REPO / "out" / "gpu_check" / ("rows" if args.rows else f"call{args.call}"))
    args.budget = args.budget or BUDGET_S[args.call]
    return args


def row_env_vars(plan: Plan, jobs: int) -> dict[str, str]:
    """The environment every row starts with (set before its interpreter imports torch)."""
    cache = Path(plan.cache_dir)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "TRITON_CACHE_DIR": str(cache / "triton"),
           "PYTHONUNBUFFERED": "1"}
    # Fewer fragmentation OOMs at the same peak; the rows measure with it, as training should run.
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if not plan.cuda:
        # Rows share the cores `jobs` at a time: more threads each would only spin against each other.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    return env


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        worker(args.worker, args.plan)
        return 0
    if args.list:
        for name, row in ROWS.items():
            print(f"call {row.call}  {name:17} ~{row.cold_s:3.0f} s  {row.doc}")
        return 0
    plan = make_plan(args)
    out = Path(plan.out)
    out.mkdir(parents=True, exist_ok=True)
    Path(plan.cache_dir).mkdir(parents=True, exist_ok=True)
    plan_path = out / "plan.json"
    plan_path.write_text(json.dumps(dataclasses.asdict(plan), indent=2))
    jobs = args.jobs or (4 if plan.cuda else 2)
    timeout = args.timeout or (None if plan.cuda else 300)
    what = f"rows {','.join(args.names)}" if args.rows else f"call {args.call}: {','.join(args.names)}"
    print(f"gpu_check: {what} on {plan.device} ({plan.model}), {args.budget:.0f} s in all; logs in {out / 'logs'}; "
          f"inductor cache {plan.cache_dir}", flush=True)
    t0 = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t0:5.0f} s] {msg}", flush=True)

    commands = {n: row_command(n, plan_path) for n in args.names}
    results = run_rows(args.names, commands, out, row_env_vars(plan, jobs), args.budget, plan.cuda, jobs,
                       timeout=timeout, log=log)
    lines = [results[n] for n in args.names]
    if "blocks_mb8" in args.names:
        lines.append(activations_row(results, plan))
    (out / "results.jsonl").write_text("".join(json.dumps(line, default=str) + "\n" for line in lines))
    text = header(plan, argv) + "\n\n" + table(lines)
    (out / "table.txt").write_text(text + "\n")
    print("\n" + text)
    return 1 if any(r["verdict"].startswith(("failed", "timeout", "mismatch")) for r in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
