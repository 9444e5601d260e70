"""Run logs: a readable line per step, metrics.jsonl, optional wandb/TensorBoard, and the plot.

    python metrics.py out/llama_1p7b            # renders out/llama_1p7b/metrics.png
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path


class Logger:
    """Prints and records on the main process only; the others stay quiet."""

    def __init__(self, out_dir: str, active: bool, write_file: bool = True, wandb_project: str | None = None,
                 tensorboard: bool = False, config=None):
        self.active = active
        self.file = self.wandb = self.tb = None
        if not active:
            return
        if write_file:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            self.file = open(Path(out_dir) / "metrics.jsonl", "a")
        if wandb_project:
            import wandb  # noqa: PLC0415 - optional, imported only when switched on

            config = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config
            self.wandb = wandb.init(project=wandb_project, config=config, resume="allow")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415

            self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))

    def print(self, msg: str) -> None:
        if self.active:
            print(msg, flush=True)

    def metrics(self, step: int, **values) -> None:
        """One JSON object per call in metrics.jsonl; numbers also to wandb/TensorBoard."""
        if not self.active:
            return
        if self.file:
            self.file.write(json.dumps({"step": step, **values}) + "\n")
            self.file.flush()
        numbers = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.wandb:
            self.wandb.log(numbers, step=step)
        if self.tb:
            for k, v in numbers.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.wandb:
            self.wandb.finish()
        if self.tb:
            self.tb.close()


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found: pass a run directory or its metrics.jsonl")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise SystemExit(f"error: {path}:{n} is not JSON") from None
    return rows


def plot(rows: list[dict], out_png: str | Path) -> None:
    """Train and validation loss, LR, throughput and HellaSwag, one panel each."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    def series(key: str):
        # A resumed run appends steps it already logged before its checkpoint: keep the last.
        points = {r["step"]: r[key] for r in rows if r.get(key) is not None}
        return sorted(points), [points[s] for s in sorted(points)]

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax = axes[0][0]
    ax.plot(*series("loss"), label="train", lw=0.8)
    ax.plot(*series("val_loss"), "o-", label="validation")
    ax.set(title="loss", xlabel="step")
    ax.legend()
    axes[0][1].plot(*series("lr"))
    axes[0][1].set(title="learning rate", xlabel="step")
    axes[1][0].plot(*series("tokens_per_s"), lw=0.8)
    axes[1][0].set(title="tokens/s", xlabel="step")
    ax = axes[1][1]
    ax.plot(*series("hellaswag_acc_norm"), "o-", label="acc_norm")
    ax.plot(*series("hellaswag_acc"), "o-", label="acc")
    ax.set(title="HellaSwag", xlabel="step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)


def main(argv: list[str] | None = None) -> None:
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
