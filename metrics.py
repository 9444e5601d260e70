"""Plot a run's metrics.jsonl: loss, learning rate, throughput, HellaSwag and the per-source curves,
with the forecast of the final validation loss (llama_fineweb/forecast.py) where the run's
checkpoints record its schedule.

    python metrics.py out/tiny                      # -> out/tiny/metrics.png, and the forecast line
    python metrics.py out/tiny --out a.png
    python metrics.py out/tiny --forecast_at 150    # the forecast as it stood at step 150
    python metrics.py out/tiny --backtest           # forecasts at 25/50/75% against the final loss
    python metrics.py out/wsd --with out/wsd_branch # fit with a decay branch: its decay's gain in the forecast

The logging itself (the log line, metrics.jsonl, MFU) is llama_fineweb/metrics.py.
"""

import argparse
from pathlib import Path

from llama_fineweb import forecast
from llama_fineweb.checkpoint import CheckpointError
from llama_fineweb.metrics import plot, read_metrics
from llama_fineweb.utils import cli_errors, closed_output_survives


def backtest_table(run: str, others=()) -> str:
    rows = forecast.backtest(run, others=others)
    lines = ["| at | step | forecast [90% interval] | final | error | covered |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r["forecast"] is None:
            lines.append(f"| {r['fraction']:.0%} | {r['step']} | too few points | {r['final']:.3f} | - | - |")
        else:
            lines.append(f"| {r['fraction']:.0%} | {r['step']} | {r['forecast']:.3f} [{r['low']:.3f}, "
                         f"{r['high']:.3f}] | {r['final']:.3f} | {r['error']:+.1%} | "
                         f"{'yes' if r['covered'] else 'no'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    with closed_output_survives():  # `| head` or `| true` gone: quiet, and the work is kept
        _main(argv)


def _main(argv: list[str] | None) -> None:
    parser = argparse.ArgumentParser(description="Render a run's metrics.jsonl to a PNG, with the forecast "
                                                 "of its final validation loss.")
    parser.add_argument("run", help="run directory (out_dir) or a metrics.jsonl file")
    parser.add_argument("--out", help="PNG path (default: metrics.png beside metrics.jsonl)")
    parser.add_argument("--forecast_at", type=int, help="forecast from the validation losses up to this "
                                                        "step only (default: all of them)")
    parser.add_argument("--backtest", action="store_true", help="print a table of the forecasts made at "
                                                                "25/50/75%% of a finished run against its final loss")
    parser.add_argument("--with", dest="with_runs", nargs="+", default=[], metavar="RUN",
                        help="other runs of the same model and data fit with this one (a decay branch of it, "
                             "say): one law, each run under its own schedule, so a WSD run still in its stable "
                             "stage gets its decay's gain from a branch that has decayed")
    args = parser.parse_args(argv)
    with cli_errors("metrics.py", (CheckpointError,)):
        run = Path(args.run)
        run_dir = run if run.is_dir() else run.parent
        if args.backtest:
            print(backtest_table(str(run_dir), args.with_runs))
            return
        rows = read_metrics(args.run)
        extrapolation = None
        try:
            cfg = forecast.run_schedule(run_dir)
        except CheckpointError as e:
            print(f"no forecast: {e}")
        else:
            terms = forecast.schedule_terms(cfg)
            others = [([(s, v) for s, v in pts if args.forecast_at is None or s <= args.forecast_at], c)
                      for pts, c in forecast.other_runs(args.with_runs, like=run_dir)]  # as they stood then
            fc = forecast.forecast(forecast.run_points(run_dir, cfg, up_to=args.forecast_at), cfg, terms,
                                   others=others)
            if fc is None:
                print(f"no forecast: fewer than {forecast.MIN_POINTS} validation losses in the fit's window "
                      f"(from twice the warmup and a third of the steps seen)")
            else:
                more = f" and {fc.other_points} of {', '.join(args.with_runs)}" if fc.other_points else ""
                print(f"from {fc.points} validation losses (steps {fc.first_step}-{fc.step}){more}: {fc.line()}")
                extrapolation = forecast.band(fc, cfg, terms)
        out = args.out or run_dir / "metrics.png"
        plot(rows, out, extrapolation)
        print(f"wrote {out} ({len(rows)} records)")


if __name__ == "__main__":
    main()
