"""Run logs: a readable line per step, metrics.jsonl, optional wandb/TensorBoard, and the plot.

    python metrics.py out/llama_1p7b            # renders out/llama_1p7b/metrics.png
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

# The run's printed lines, beside metrics.jsonl in out_dir.
LOG_FILE = "log.txt"

# Dense bf16 tensor-core peak per GPU, in TFLOP/s, from each vendor datasheet (the figure without
# sparsity, i.e. half the "with sparsity" one), keyed by the exact torch.cuda.get_device_name().
# A card missing here gets no MFU unless --peak_tflops names its peak.
PEAK_BF16_TFLOPS = {
    # NVIDIA A100 Tensor Core GPU datasheet: BF16 312 (624 with sparsity), SXM and PCIe alike
    "NVIDIA A100-SXM4-40GB": 312.0, "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0, "NVIDIA A100 80GB PCIe": 312.0,
    # A800: the A100's export variant, same compute (NVIDIA A800 datasheet: BF16 312)
    "NVIDIA A800-SXM4-80GB": 312.0, "NVIDIA A800 80GB PCIe": 312.0,
    # NVIDIA H100 Tensor Core GPU datasheet: BF16 1,979 SXM / 1,513 PCIe / 1,671 NVL with sparsity
    "NVIDIA H100 80GB HBM3": 989.5, "NVIDIA H100 SXM5 80GB": 989.5,
    "NVIDIA H100 PCIe": 756.5, "NVIDIA H100 NVL": 835.5,
    # H800: the H100's export variant, same compute as the H100 of the same form factor
    "NVIDIA H800": 989.5, "NVIDIA H800 PCIe": 756.5,
    # NVIDIA H200 Tensor Core GPU datasheet: BF16 1,979 SXM / 1,671 NVL with sparsity
    "NVIDIA H200": 989.5, "NVIDIA H200 NVL": 835.5,
    # NVIDIA GH200 Grace Hopper datasheet: the H100/H200 SXM's BF16 1,979 with sparsity
    "NVIDIA GH200 480GB": 989.5, "NVIDIA GH200 144G HBM3e": 989.5,
    # NVIDIA HGX B200 datasheet: BF16 4.5 PFLOPS per GPU with sparsity
    "NVIDIA B200": 2250.0,
    # NVIDIA L40S datasheet: BF16 733 with sparsity; L40: 362.1 with sparsity
    "NVIDIA L40S": 366.5, "NVIDIA L40": 181.0,
    # RTX A6000 (the DMaS-LLaMa-Lite authors' card) and A40 datasheets: BF16 309.7 / 299.4 with sparsity
    "NVIDIA RTX A6000": 154.8, "NVIDIA A40": 149.7,
    # NVIDIA RTX 6000 Ada Generation datasheet: BF16 728.5 with sparsity
    "NVIDIA RTX 6000 Ada Generation": 364.2,
}


def peak_flops(device_name: str | None, override_tflops: float = 0.0) -> tuple[float | None, str]:
    """(dense bf16 peak FLOP/s per device or None, a note saying where it came from)."""
    if override_tflops > 0:
        return override_tflops * 1e12, f"peak {override_tflops:g} TFLOP/s from --peak_tflops"
    if device_name is None:
        return None, "no MFU on CPU"
    if device_name in PEAK_BF16_TFLOPS:
        return PEAK_BF16_TFLOPS[device_name] * 1e12, f"peak {PEAK_BF16_TFLOPS[device_name]:g} TFLOP/s ({device_name})"
    return None, (f"no MFU: {device_name!r} is not in metrics.PEAK_BF16_TFLOPS; pass "
                  f"--peak_tflops=N with its dense bf16 peak from the datasheet")


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token of `model` (a model.Transformer, also sharded or on the meta
    device) on sequences of `seq_len` tokens, by the accounting MFU is reported in across the
    field: PaLM's (Chowdhery et al. 2022, appendix B), as torchtitan and llm.c use it:

        6 * N + 12 * L * d * T

    N = the parameters that take part in a matmul: all but the input embedding table, which is a
    lookup (the untied output head is a matmul and counts); 6 = 2 FLOPs per multiply-add x
    (forward + 2 backward). 12 * L * d * T = the attention scores and their weighted sum (QK^T
    and AV: 2 matmuls x 2 FLOPs x 3 passes, each over d per layer and T keys), with causal
    masking not discounted, as PaLM and llm.c count it. Norms, RoPE, SwiGLU's product and the
    softmax are left out. For 1p7b at T=1024 this is 10.58 GFLOP/token; counting the embedding
    too would overstate MFU by 5.8%."""
    cfg = model.config
    embedding = model.tok_embeddings.weight
    matmul_params = model.num_params() - embedding.numel()
    # A frozen weight (a LoRA run's base) gets no weight gradient: 4 FLOPs per multiply-add, not 6.
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad and p is not embedding)
    return 6 * matmul_params - 2 * frozen + 12 * cfg.n_layers * cfg.dim * seq_len


class Throughput:
    """Times the training step alone (evaluation, sampling and checkpoints are timed on their own)
    and turns step times into tokens/s and MFU: the one place these figures are computed."""

    def __init__(self, tokens_per_step: int, flops_per_step: float, peak: float | None,
                 world_size: int, device):
        self.tokens_per_step, self.flops_per_step = tokens_per_step, flops_per_step
        self.peak, self.world_size, self.device = peak, world_size, device
        self.times: list[float] = []
        self._t0 = 0.0

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self) -> float:
        """The step's seconds; on CUDA it waits for the device, the step's one extra sync."""
        if self.device.type == "cuda":
            import torch  # noqa: PLC0415 - metrics.py itself runs without torch (plots)

            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - self._t0
        self.times.append(dt)
        return dt

    def tokens_per_s(self, dt: float) -> float:
        return self.tokens_per_step / dt

    def mfu(self, dt: float) -> float | None:
        return self.flops_per_step / dt / (self.peak * self.world_size) if self.peak else None

    def recent(self, n: int = 20) -> float:
        """Median of the last n step times (for the ETA)."""
        return statistics.median(self.times[-n:])

    def steady(self) -> tuple[float, int]:
        """(median step time after warm-up, steps it covers): the first third, compilation
        included, is left out."""
        steady = self.times[min(len(self.times) - 1, max(1, len(self.times) // 3)):] or [float("nan")]
        return statistics.median(steady), len(steady)


class Logger:
    """Prints and records on the main process only; the others stay quiet."""

    def __init__(self, out_dir: str, active: bool, write_file: bool = True, wandb_project: str | None = None,
                 tensorboard: bool = False, config=None):
        self.active = active
        self.file = self.text = self.wandb = self.tb = None
        if not active:
            return
        if write_file:
            self.path = Path(out_dir) / "metrics.jsonl"
            self._open_files()
        if wandb_project:
            import wandb  # noqa: PLC0415 - optional, imported only when switched on

            config = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config
            self.wandb = wandb.init(project=wandb_project, config=config, resume="allow")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415

            self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))

    def _open_files(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torn = self.path.is_file() and self.path.stat().st_size and _last_byte(self.path) != b"\n"
        self.file = open(self.path, "a")
        if torn:  # an earlier write was cut short (full disk, kill): the next record starts a line
            self.file.write("\n")
        # The printed lines as well: what is left when the terminal or a `| tee` is gone.
        self.text = open(self.path.parent / LOG_FILE, "a")

    def reopen(self) -> None:
        """Open metrics.jsonl and log.txt again by name: after a start-over moved or deleted the
        old run's files, the new run's rows go to new files of its own, not after the old ones."""
        if self.file:
            self.file.close()
            self.text.close()
            self._open_files()

    def print(self, msg: str) -> None:
        if self.active:
            print(msg, flush=True)
            if self.text:
                self.text.write(msg + "\n")
                self.text.flush()

    def metrics(self, step: int, **values) -> None:
        """One JSON object per call in metrics.jsonl; numbers also to wandb/TensorBoard."""
        if not self.active:
            return
        if self.file:
            try:
                self.file.write(json.dumps({"step": step, **values}) + "\n")
                self.file.flush()
            except OSError as e:  # with the file's name, so a full disk says where
                self._abandon_file()
                raise OSError(e.errno, e.strerror, str(self.path)) from None
        numbers = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.wandb:
            self.wandb.log(numbers, step=step)
        if self.tb:
            for k, v in numbers.items():
                self.tb.add_scalar(k, v, step)

    def _abandon_file(self) -> None:
        """Close the file after a failed write without flushing the rest again (that fails too)."""
        try:
            self.file.close()
        except OSError:
            pass
        self.file = None
    def position(self) -> int | None:
        """Where metrics.jsonl ends now (a checkpoint records it); None when there is no file."""
        if not self.file:
            return None
        self.file.flush()
        return self.file.tell()

    def drop_after(self, position: int, step: int) -> int:
        """Cut metrics.jsonl back to `position`, where it ended when the checkpoint of `step` being
        resumed was saved: the rows after it of later steps are of steps the resumed run does again,
        and leaving them would give those steps twice. Rows of `step` or earlier logged after the
        save (the save's own row) stay; a torn line goes. Returns how many rows were dropped."""
        if not self.file:
            return 0
        self.file.flush()
        path = Path(self.file.name)
        if not 0 <= position <= path.stat().st_size:  # not this file's history (replaced or cut by hand)
            return 0
        with open(path, "rb") as f:
            f.seek(position)
            tail = [line for line in f if line.strip()]
        kept = []
        for line in tail:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
                kept.append(line if line.endswith(b"\n") else line + b"\n")
        os.truncate(path, position)  # the file is open for appending: the next row goes at the new end
        if kept:
            with open(path, "ab") as f:
                f.writelines(kept)
        return len(tail) - len(kept)

    def close(self) -> None:
        if self.text:
            self.text.close()
        if self.file:
            try:
                self.file.close()
            except OSError as e:
                self.file = None
                raise OSError(e.errno, e.strerror, str(self.path)) from None
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
    """The records of a run's metrics.jsonl (or of the run directory's); a line that is not JSON, a
    record torn by a write cut short, is skipped and counted in a note on stderr."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found: pass a run directory or its metrics.jsonl")
    rows, torn = [], []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a record whose write was cut short (full disk, kill)
                torn.append(n)
    if torn:
        print(f"note: {path}: skipped {len(torn)} torn line(s) (line {', '.join(map(str, torn[:5]))}"
              f"{', ...' if len(torn) > 5 else ''}): records whose write was cut short", file=sys.stderr)
    return rows


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, 2)
        return f.read(1)


def plot(rows: list[dict], out_png: str | Path, extrapolation=None) -> list[str]:
    """Train and validation loss, LR, throughput (tokens/s, and MFU where logged) and HellaSwag
    where it was measured; with --layer_stats_interval, heatmaps (blocks x steps) of each block's
    gradient norm and update ratio. extrapolation: (steps, forecast, low, high) of forecast.band,
    drawn dashed with its band. Returns the titles of the panels drawn."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    def series(key: str):
        # A resumed run appends steps it already logged before its checkpoint: keep the last.
        points = {r["step"]: r[key] for r in rows if r.get(key) is not None}
        return sorted(points), [points[s] for s in sorted(points)]

    # A data mixture (mixture.py) logs tokens/NAME, epoch/NAME and val_loss/NAME for each source.
    sources = sorted({k.partition("/")[2] for r in rows for k in r if k.startswith("tokens/")})
    layered = [key for key in ("layer_grad_norm", "layer_update_ratio") if any(key in r for r in rows)]
    fig, axes = plt.subplots(3 if layered else 2, 3 if sources else 2, figsize=(18 if sources else 12,
                                                                                12 if layered else 8))
    ax = axes[0][0]
    ax.plot(*series("loss"), label="train", lw=0.8, alpha=0.5)
    ax.plot(*series("val_loss"), "o-", label="validation")
    for name in sources:
        ax.plot(*series(f"val_loss/{name}"), "s--", label=f"validation: {name}", ms=3)
    if extrapolation is not None:
        steps, mean, low, high = extrapolation
        ax.plot(steps, mean, "--", color="C3", label="forecast (90% band)", zorder=4)
        ax.fill_between(steps, low, high, color="C3", alpha=0.3, zorder=3)
        # Zoomed on the run's later losses and the band: the first fall (from ~10.8) would flatten both.
        vals = sorted(series("val_loss")[1])
        top = max(vals[int(0.75 * (len(vals) - 1))] if vals else float(max(high)), float(max(high)))
        bottom = min(vals[0] if vals else float(min(low)), float(min(low)))
        ax.set_ylim(bottom - 0.05 * (top - bottom), top + 0.05 * (top - bottom))
    ax.set(title="loss", xlabel="step")
    ax.legend()
    for row, (key, title) in enumerate([("tokens", "tokens per source"), ("epoch", "epochs per source")]):
        if sources:
            for name in sources:
                axes[row][2].plot(*series(f"{key}/{name}"), label=name)
            axes[row][2].set(title=title, xlabel="step")
            axes[row][2].legend()
    axes[0][1].plot(*series("lr"))
    axes[0][1].set(title="learning rate", xlabel="step")
    axes[1][0].plot(*series("tokens_per_s"), lw=0.8)
    axes[1][0].set(title="tokens/s", xlabel="step")
    steps, mfu = series("mfu")
    if mfu:  # the same points as a fraction of the peak (flops_per_token's accounting): on CUDA only
        right = axes[1][0].twinx()
        right.plot(steps, [100 * m for m in mfu], lw=0.8, color="C1")
        right.set_ylabel("MFU % (6N + 12LdT, N without the input embedding)", color="C1")
    ax = axes[1][1]
    if series("hellaswag_acc_norm")[0] or series("hellaswag_acc")[0]:
        ax.plot(*series("hellaswag_acc_norm"), "o-", label="acc_norm")
        ax.plot(*series("hellaswag_acc"), "o-", label="acc")
        ax.set(title="HellaSwag", xlabel="step")
        ax.legend()
    else:  # --hellaswag off: no panel rather than an empty one with a meaningless axis
        ax.remove()
    for ax, key in zip(axes[2] if layered else [], layered):
        layer_heatmap(fig, ax, *series(key), key)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    return [a.get_title() for a in fig.axes if a.get_title()]


def layer_heatmap(fig, ax, steps: list[int], values: list[list[float]], key: str) -> None:
    """log10 of a per-block series as an image: blocks up the side, statistics steps along the bottom."""
    import numpy as np  # noqa: PLC0415

    grid = np.log10(np.maximum(np.array(values, dtype=float).T, 1e-12))  # (blocks, steps)
    image = ax.imshow(grid, aspect="auto", origin="lower", interpolation="nearest",
                      extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, grid.shape[0] - 0.5))
    fig.colorbar(image, ax=ax, label=f"log10 {key}")
    ax.set(title=f"{key} per block", xlabel="step", ylabel="block")


def plot_dynamics(evals: list[dict], rows: list[dict], out_png: str | Path) -> None:
    """The training-dynamics figure: a panel per task with each metric given, and one of the
    validation loss, all against tokens seen.

    evals: [{"step", "tokens_seen", "scores": {task: {metric: value}}}], one per checkpoint (what
    eval_suite.py --all_steps collects); rows: a run's metrics.jsonl records. A val_loss row carries
    only its step: it is placed at the tokens seen that the train rows and checkpoints record for
    that step (linear in between, since every step of a run has the same batch)."""
    import math  # noqa: PLC0415

    import matplotlib  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib.ticker import EngFormatter  # noqa: PLC0415

    known = {0: 0}
    for r in [*rows, *evals]:
        if r.get("tokens_seen") is not None:
            known[r["step"]] = r["tokens_seen"]
    known_steps = sorted(known)
    known_tokens = [known[s] for s in known_steps]
    # A resumed run logs again the steps after its checkpoint: the last value of a step wins.
    val = {r["step"]: r["val_loss"] for r in rows if r.get("val_loss") is not None}
    val_points = [(float(np.interp(s, known_steps, known_tokens)), val[s]) for s in sorted(val)]

    tasks: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for e in sorted(evals, key=lambda e: e["step"]):
        for task, values in e["scores"].items():
            for metric, value in values.items():
                tasks.setdefault(task, {}).setdefault(metric, []).append((e["tokens_seen"], value))

    n_panels = max(1, len(tasks) + bool(val_points))
    n_cols = min(3, n_panels)
    n_rows = math.ceil(n_panels / n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(4.5 * n_cols, 3.3 * n_rows), squeeze=False)
    panels = iter(axes.flat)
    for task, series in tasks.items():
        ax = next(panels)
        for metric, points in series.items():
            ax.plot(*zip(*points), "o-", label=metric, ms=3)
        ax.set(title=task)
        ax.legend(fontsize="small")
    if val_points:
        ax = next(panels)
        ax.plot(*zip(*val_points), "o-", ms=3, color="C3")
        ax.set(title="validation loss")
    for ax in axes.flat:
        if ax.has_data():
            ax.set_xlabel("tokens seen")
            ax.xaxis.set_major_formatter(EngFormatter())
        else:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
