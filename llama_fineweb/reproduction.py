"""Comparing a run with a published trajectory: the reference series, matching checkpoints by
tokens, per-example scores, the paired bootstrap, verdicts and the report (reproduce.py's library).

Every metric is kept per example (a validation sequence's mean loss, a HellaSwag item's 0/1), so
a difference between two checkpoints comes with a paired bootstrap interval: the same examples
are resampled for both, which removes the spread between examples from the comparison.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import checkpoint
from .dataloader import ValLoader
from .utils import UserError, write_atomic

# DMaS-LLaMa-Lite's released checkpoints (McGill-DMaS on the Hugging Face hub): the step labels
# of their names, and the batch of the paper's run (512 sequences x 1024 tokens).
PAPER_REPO = "McGill-DMaS/DMaS-LLaMa-Lite-step-{label}"
PAPER_STEPS = ("2.7k", "3.3k", "5.1k", "7.5k", "15.7k", "20k", "23.9k", "35k", "40.5k", "43.5k")
PAPER_TOKENS_PER_STEP = 524_288
# A difference this small is "reproduced" even when its interval excludes 0: 0.01 nats of loss,
# half a point of accuracy.
TOLERANCES = {"loss": 0.01, "accuracy": 0.005}
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Reference:
    """One checkpoint of the reference series: a hub id or a local directory, and its step."""

    source: str
    step: int


def parse_step(text: str) -> int:
    """'43.5k' -> 43500, '2700' -> 2700; UserError otherwise."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kK]?)", text.strip())
    if not match:
        raise UserError(f"reference step {text!r} is not a number such as 2700 or 2.7k")
    value = float(match.group(1)) * (1000 if match.group(2) else 1)
    if value != int(value) or value < 0:
        raise UserError(f"reference step {text!r} is not a whole number of steps")
    return int(value)


def paper_references() -> list[Reference]:
    """The paper's ten released checkpoints, oldest first."""
    return [Reference(PAPER_REPO.format(label=label), parse_step(label)) for label in PAPER_STEPS]


def parse_references(spec: str) -> list[Reference]:
    """'ID_OR_DIR@STEP,...' -> References sorted by step; UserError naming a malformed item."""
    references = []
    for item in (s.strip() for s in spec.split(",")):
        source, at, step = item.rpartition("@")
        if not at or not source:
            raise UserError(f"--reference item {item!r} has no @STEP: write ID_OR_DIR@STEP, e.g. "
                            f"path/to/step-2.7k@2700")
        references.append(Reference(source, parse_step(step)))
    steps = [r.step for r in references]
    if len(set(steps)) != len(steps):
        raise UserError(f"--reference names step {max(steps, key=steps.count)} twice: one checkpoint per step")
    return sorted(references, key=lambda r: r.step)


def declared_config(hf_dir: str | Path) -> dict:
    """What a Hugging Face directory's config.json (and generation_config.json) declares about the
    points where an import can go wrong: RoPE theta, tied embeddings, vocabulary, special ids."""
    hf_dir = Path(hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    generation_path = hf_dir / "generation_config.json"
    generation = json.loads(generation_path.read_text()) if generation_path.is_file() else {}
    declared = {k: config.get(k) for k in ("rope_theta", "tie_word_embeddings", "vocab_size",
                                           "max_position_embeddings", "bos_token_id", "eos_token_id")}
    if declared["rope_theta"] is None:  # transformers 5 keeps it under rope_parameters
        declared["rope_theta"] = (config.get("rope_parameters") or {}).get("rope_theta")
    for k in ("bos_token_id", "eos_token_id"):
        if k in generation:
            declared[f"generation_{k}"] = generation[k]
    return declared


def directory_identity(path: str | Path) -> str:
    """A digest of a model directory's files (names, sizes, modification times; config.json by
    content): a rewritten or replaced checkpoint is evaluated afresh."""
    path = Path(path)
    sha = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        stat = file.stat()
        sha.update(f"{file.relative_to(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
        if file.name == "config.json":
            sha.update(file.read_bytes())
    return sha.hexdigest()[:16]


def cache_key(settings: dict, identity: str) -> str:
    """Sixteen hex digits naming one checkpoint's evaluation with these settings."""
    return hashlib.sha256(json.dumps([settings, identity], sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- our run


def run_checkpoints(run_dir: str | Path) -> list[tuple[int, int, Path]]:
    """(step, tokens seen, directory) of every complete checkpoint of a run, oldest first."""
    found = []
    for ckpt in checkpoint.complete_checkpoints(run_dir):
        meta = checkpoint.read_meta(ckpt)
        progress = meta.get("progress", {})
        tokens = progress.get("tokens_seen", meta.get("tokens_seen"))
        if tokens is not None:
            found.append((int(meta.get("step", progress.get("step", 0))), int(tokens), ckpt))
    return found


def nearest(tokens: int, candidates: list[tuple[int, int, Path]]) -> tuple[tuple[int, int, Path], float]:
    """Our checkpoint whose token count is nearest `tokens`, and the gap as a fraction of `tokens`
    (signed: positive when ours has seen more)."""
    best = min(candidates, key=lambda c: (abs(c[1] - tokens), c[1]))
    return best, (best[1] - tokens) / max(tokens, 1)


# ----------------------------------------------------------------------------- per-example scores


@torch.no_grad()
def sequence_losses(model, data_dir: str, seq_len: int, max_sequences: int | None, batch_size: int,
                    device: torch.device, autocast_dtype: torch.dtype | None, progress: bool = True) -> list[float]:
    """The mean next-token loss of each validation sequence (ValLoader's windows, in order), over
    the model's whole vocabulary."""
    loader = ValLoader(data_dir, seq_len, batch_size, max_sequences=max_sequences)
    losses: list[float] = []
    for x, y in tqdm(loader, desc="val loss", unit="batch", disable=not progress, leave=False):
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(x)  # (B, T, vocab)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
        losses.extend(loss.view(y.shape).mean(dim=1).tolist())
    return losses


# ----------------------------------------------------------------------------- statistics


def paired_bootstrap(ours: list[float], reference: list[float], n_resamples: int = 10_000, seed: int = 0,
                     confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(mean(ours) - mean(reference), low, high): the percentile interval of the difference over
    `n_resamples` resamples of the examples, each drawn once for both (`seed` fixes them)."""
    a, b = np.asarray(ours, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired results need the same examples: got {a.size} and {b.size}")
    differences = a - b
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    # In blocks: n_resamples x n indices at once would be gigabytes for 10,000 x 10,042.
    block = max(1, 2_000_000 // differences.size)
    for start in range(0, n_resamples, block):
        count = min(block, n_resamples - start)
        means[start : start + count] = differences[rng.integers(0, differences.size, (count, differences.size))].mean(1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(differences.mean()), float(low), float(high)


def verdict(difference: float, low: float, high: float, tolerance: float, higher_is_better: bool) -> str:
    """'reproduced' when the interval holds 0 or |difference| <= tolerance; else 'ahead' or 'behind'."""
    if low <= 0 <= high or abs(difference) <= tolerance:
        return "reproduced"
    return "ahead" if (difference > 0) == higher_is_better else "behind"


# ----------------------------------------------------------------------------- comparisons


@dataclass(frozen=True)
class Metric:
    name: str  # the key in each checkpoint's per-example results
    title: str
    higher_is_better: bool
    tolerance: float


def compare(metric: Metric, reference_points: list[dict], ours_points: list[dict | None],
            n_resamples: int, seed: int, unmatched: str = "no match") -> list[dict]:
    """One row per reference checkpoint: its value, ours at the matched tokens, the difference with
    its interval and the verdict (the `ours` fields None where nothing matched, the verdict
    `unmatched`)."""
    rows = []
    for ref, ours in zip(reference_points, ours_points):
        ref_values = ref["results"].get(metric.name)
        if ref_values is None:
            continue
        row = {"step": ref["step"], "tokens": ref["tokens"], "source": ref["source"],
               "reference": float(np.mean(ref_values)), "ours": None, "our_step": None, "our_tokens": None,
               "difference": None, "low": None, "high": None, "verdict": unmatched, "n": len(ref_values)}
        if ours is not None and ours["results"].get(metric.name) is not None:
            difference, low, high = paired_bootstrap(ours["results"][metric.name], ref_values, n_resamples, seed)
            row.update(ours=float(np.mean(ours["results"][metric.name])), our_step=ours["step"],
                       our_tokens=ours["tokens"], difference=difference, low=low, high=high,
                       verdict=verdict(difference, low, high, metric.tolerance, metric.higher_is_better))
        rows.append(row)
    return rows


def reference_steps(metric: Metric, reference_points: list[dict], n_resamples: int, seed: int) -> list[dict]:
    """Between consecutive reference checkpoints: the change (later - earlier) and its interval,
    which shows how large a difference the evaluation can tell from noise."""
    points = [p for p in reference_points if p["results"].get(metric.name) is not None]
    rows = []
    for earlier, later in itertools.pairwise(points):
        difference, low, high = paired_bootstrap(later["results"][metric.name], earlier["results"][metric.name],
                                                 n_resamples, seed)
        rows.append({"from_step": earlier["step"], "to_step": later["step"], "difference": difference,
                     "low": low, "high": high, "significant": not low <= 0 <= high})
    return rows


# ----------------------------------------------------------------------------- the report


def _number(value: float | None, digits: int = 4, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def metric_table(rows: list[dict]) -> str:
    """Markdown: step, tokens, reference, ours (its step and the token gap), difference, interval, verdict."""
    lines = ["| step | tokens | reference | ours (step, token gap) | ours - reference | 95% interval | verdict |",
             "|---:|---:|---:|---:|---:|---:|:---|"]
    for r in rows:
        ours = "-"
        if r["ours"] is not None:
            gap = (r["our_tokens"] - r["tokens"]) / max(r["tokens"], 1)
            ours = f"{r['ours']:.4f} ({r['our_step']}, {gap:+.1%})"
        interval = "-" if r["low"] is None else f"[{r['low']:+.4f}, {r['high']:+.4f}]"
        lines.append(f"| {r['step']} | {r['tokens']:,} | {r['reference']:.4f} | {ours} | "
                     f"{_number(r['difference'], signed=True)} | {interval} | {r['verdict']} |")
    return "\n".join(lines) + "\n"


def steps_table(rows: list[dict]) -> str:
    lines = ["| reference step | next step | change | 95% interval | beyond noise |", "|---:|---:|---:|---:|:---|"]
    for r in rows:
        lines.append(f"| {r['from_step']} | {r['to_step']} | {r['difference']:+.4f} | "
                     f"[{r['low']:+.4f}, {r['high']:+.4f}] | {'yes' if r['significant'] else 'no'} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, out_png: Path) -> None:
    """One panel per metric: the reference curve and ours against tokens, ours with its interval
    (the reference value plus the bootstrap interval of the difference)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    metrics = report["metrics"]
    fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(6 * max(1, len(metrics)), 4.5), squeeze=False)
    for ax, (name, entry) in zip(axes[0], metrics.items()):
        rows = entry["rows"]
        ax.plot([r["tokens"] for r in rows], [r["reference"] for r in rows], "o-", label="reference")
        matched = [r for r in rows if r["ours"] is not None]
        if matched:
            x = [r["our_tokens"] for r in matched]
            y = [r["ours"] for r in matched]
            errors = [[r["ours"] - (r["reference"] + r["low"]) for r in matched],
                      [(r["reference"] + r["high"]) - r["ours"] for r in matched]]
            ax.errorbar(x, y, yerr=np.clip(errors, 0, None), fmt="s--", capsize=3, label="ours (95% interval)")
        ax.set(title=entry["title"], xlabel="tokens")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def write_report(out_dir: Path, report: dict) -> list[Path]:
    """REPRODUCTION.md, reproduction.json and reproduction.png in out_dir; their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md = ["# Reproduction report", ""]
    md += [f"Reference: {report['reference_label']}, {report['reference_tokens_per_step']:,} tokens per step. "
           f"Ours: {report['run'] or 'none (the reference series alone)'}.", ""]
    md += ["Each difference is ours - reference on the same examples, with a paired bootstrap "
           f"{CONFIDENCE:.0%} interval ({report['n_resamples']:,} resamples, seed {report['seed']}). Verdict: "
           "**reproduced** when the interval contains 0 or the difference is within the tolerance, else "
           "**ahead** (better than the reference) or **behind**. Rows marked 'no match' had no checkpoint of "
           f"ours within {report['max_token_gap']:.0%} of the reference's tokens.", ""]
    for name, entry in report["metrics"].items():
        md += [f"## {entry['title']}", "", f"`{name}`; {entry['note']}; tolerance {entry['tolerance']:g}.", ""]
        md += [metric_table(entry["rows"])]
        if entry["reference_steps"]:
            md += ["Between consecutive reference checkpoints (what the evaluation can tell apart):", "",
                   steps_table(entry["reference_steps"])]
    md += ["## Reference checkpoints as imported", "",
           "What each directory's config declares; whatever it says, GPT-2's <|endoftext|> (50256) is the "
           "end of text for scoring and generation.", "",
           "| step | source | rope_theta | tied embeddings | vocab_size | bos / eos (config) | "
           "bos / eos (generation) |", "|---:|:---|---:|:---|---:|:---|:---|"]
    for r in report["references"]:
        d = r["declared"]
        md.append(f"| {r['step']} | {r['source']} | {d.get('rope_theta')} | {d.get('tie_word_embeddings')} | "
                  f"{d.get('vocab_size')} | {d.get('bos_token_id')} / {d.get('eos_token_id')} | "
                  f"{d.get('generation_bos_token_id')} / {d.get('generation_eos_token_id')} |")
    md += ["", "## Settings", "", "```json", json.dumps(report["settings"], indent=2, sort_keys=True), "```", "",
           "## Command", "", "```", report["command"], "```", ""]
    paths = [out_dir / "REPRODUCTION.md", out_dir / "reproduction.json", out_dir / "reproduction.png"]
    write_atomic(paths[0], "\n".join(md))
    write_atomic(paths[1], json.dumps(report, indent=2) + "\n")
    plot(report, paths[2])
    return paths
