"""Plot a run's metrics.jsonl: loss, learning rate, throughput, HellaSwag and the per-source curves.

    python metrics.py out/tiny              # -> out/tiny/metrics.png
    python metrics.py out/tiny --out a.png

The logging itself (the log line, metrics.jsonl, MFU) is llama_fineweb/metrics.py.
"""

import argparse
from pathlib import Path

from llama_fineweb.metrics import plot, read_metrics
from llama_fineweb.utils import closed_output_survives


def main(argv: list[str] | None = None) -> None:
    with closed_output_survives():  # `| head` or `| true` gone: quiet, and the work is kept
        _main(argv)


def _main(argv: list[str] | None) -> None:
    parser = argparse.ArgumentParser(description="Render a run's metrics.jsonl to a PNG.")
    parser.add_argument("run", help="run directory (out_dir) or a metrics.jsonl file")
    parser.add_argument("--out", help="PNG path (default: metrics.png beside metrics.jsonl)")
    args = parser.parse_args(argv)
    rows = read_metrics(args.run)
    run = Path(args.run)
    out = args.out or (run if run.is_dir() else run.parent) / "metrics.png"
    plot(rows, out)
    print(f"wrote {out} ({len(rows)} records)")


if __name__ == "__main__":
    main()
