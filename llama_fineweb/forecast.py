"""Where a run will end: a schedule-aware fit of its validation losses, extrapolated to max_steps.

The law is the LR-annealing scaling law of Tissue et al. 2024 ("Scaling Law with Learning Rate
Annealing"), in steps:

    L(s) = L0 + A * S1(s)^-alpha - C * S2(s)

- S1(s): the learning rates summed over the steps before s, in units of max_lr (the "forward area":
  a step at half the peak counts half). It carries the power law's progress.
- S2(s): the annealing area, sum over steps i < s of m_i, where m_i = DECAY_MEMORY * m_{i-1} +
  (eta_{i-1} - eta_i): each drop of the learning rate keeps lowering the loss for a while. It is why
  a cosine run's end lies below the continuation of its early power law, and why a WSD run falls in
  its decay. Warmup counts as the peak here (its rising rate is not an annealing).

Both come from continuation.lr_at, so a cosine, linear or WSD run and a decay branch (whose config's
max_steps and decay start are its own) are each forecast by their own schedule.

The fit: for each alpha of a grid the law is linear in (L0, A, C), solved by least squares (with C
and without it, keeping A and C >= 0); the alpha and form with the smallest squared error win.
Points before the end of warmup are left out (the law describes the decay of the loss under a
settled rate). The interval: the fit
repeated on points resampled with replacement, each refit's final loss plus a resampled residual
(the noise of the one final measurement), its 5th and 95th percentiles: a 90% interval.

Before any annealing has been seen (a WSD run still in its stable stage, or fewer than
MIN_ANNEALING_POINTS points into its decay: one or two points fit C anywhere, forecasts below zero
were seen) C is not fit: it is 0 and the forecast is the loss at max_steps without the decay's gain.
The forecast says so.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from . import checkpoint
from .continuation import lr_at, saved_schedule
from .train_config import TrainConfig

DECAY_MEMORY = 0.999  # lambda of Tissue et al.: how long an LR drop keeps lowering the loss
ALPHAS = np.geomspace(0.05, 3.0, 90)  # the exponents tried
MIN_POINTS = 4  # fewer validation losses after warmup: no forecast
MIN_ANNEALING_POINTS = 3  # fewer points after the rate began to drop: C is not fit (one or two pin it nowhere)
RESAMPLES = 200
LEVEL = 0.90  # the interval's coverage


@dataclasses.dataclass
class Forecast:
    step: int  # the last validation loss the fit saw
    target_step: int  # max_steps: where the forecast is for
    loss: float  # the forecast final validation loss
    low: float
    high: float
    params: tuple[float, float, float, float]  # L0, A, alpha, C
    points: int  # validation losses fitted
    annealing_seen: bool  # False: no LR drop among the fitted points, so C is not in the forecast
    resampled: list[tuple[float, float, float, float]]  # the refits' params, for the band

    def line(self) -> str:
        note = "" if self.annealing_seen else " (no LR decay seen yet: its gain is not in it)"
        return (f"final val loss forecast {self.loss:.3f} [{self.low:.3f}, {self.high:.3f}] "
                f"at step {self.target_step}{note}")

    def fields(self) -> dict:
        """What metrics.jsonl records at each evaluation."""
        return {"forecast_loss": self.loss, "forecast_low": self.low, "forecast_high": self.high,
                "forecast_step": self.target_step}


def schedule_terms(cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """(S1, S2) at every step 0..max_steps, the loss after s steps being L(s)."""
    n = cfg.max_steps
    eta = np.array([lr_at(s, cfg) for s in range(n)], dtype=np.float64) / cfg.max_lr
    s1 = np.concatenate([[0.0], np.cumsum(eta)])
    settled = eta.copy()
    settled[: cfg.warmup_steps] = 1.0
    drops = np.concatenate([[0.0], settled[:-1] - settled[1:]])
    momentum = np.empty(n)
    m = 0.0
    for i, d in enumerate(drops):  # a first-order filter; n is at most ~1e5 steps
        m = DECAY_MEMORY * m + d
        momentum[i] = m
    s2 = np.concatenate([[0.0], np.cumsum(momentum)])
    return s1, s2


def law(params: tuple[float, float, float, float], s1: np.ndarray, s2: np.ndarray) -> np.ndarray:
    l0, a, alpha, c = params
    return l0 + a * s1 ** -alpha - c * s2


def _solve(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least squares for a stack of designs x (n_alpha, n, k): (coefficients, squared errors)."""
    scale = np.abs(x).max(axis=1, keepdims=True)  # columns of very different size (S2 ~ 1e3, S1^-a ~ 1e-3)
    scale[scale == 0] = 1.0
    xs = x / scale
    gram = np.einsum("anj,ank->ajk", xs, xs) + 1e-12 * np.eye(x.shape[2])
    coef = np.linalg.solve(gram, np.einsum("anj,n->aj", xs, y)[..., None])[..., 0] / scale[:, 0, :]
    return coef, ((np.einsum("ank,ak->an", x, coef) - y) ** 2).sum(axis=1)


def annealing_seen(s2: np.ndarray) -> bool:
    """Whether MIN_ANNEALING_POINTS of the points lie after the learning rate began to drop (S2 > 0)."""
    return int((s2 > 1e-9).sum()) >= MIN_ANNEALING_POINTS


def fit(s1: np.ndarray, s2: np.ndarray, loss: np.ndarray) -> tuple[float, float, float, float] | None:
    """(L0, A, alpha, C) of least squared error, A and C >= 0; None if no alpha gives A >= 0."""
    power = s1[None, :] ** -ALPHAS[:, None]  # (n_alpha, n)
    ones = np.ones_like(power)
    two, err_two = _solve(np.stack([ones, power], axis=2), loss)
    err_two[two[:, 1] < 0] = np.inf
    candidates = [(err_two, np.concatenate([two, np.zeros((len(ALPHAS), 1))], axis=1))]
    if annealing_seen(s2):  # C is only fit once the learning rate has dropped over several points
        three, err_three = _solve(np.stack([ones, power, -np.broadcast_to(s2, power.shape)], axis=2), loss)
        err_three[(three[:, 1] < 0) | (three[:, 2] < 0)] = np.inf
        candidates.append((err_three, three))
    err = np.stack([e for e, _ in candidates])  # (forms, n_alpha)
    form, i = np.unravel_index(np.argmin(err), err.shape)
    if not np.isfinite(err[form, i]):
        return None
    l0, a, c = candidates[form][1][i]
    return float(l0), float(a), float(ALPHAS[i]), float(c)


def forecast(points: list[tuple[int, float]], cfg: TrainConfig, terms=None, resamples: int = RESAMPLES,
             seed: int = 0) -> Forecast | None:
    """The final validation loss of a run with schedule `cfg`, from its (step, val_loss) points so
    far; None with fewer than MIN_POINTS after warmup."""
    s1_all, s2_all = terms if terms is not None else schedule_terms(cfg)
    used = sorted((s, v) for s, v in points if max(1, cfg.warmup_steps) <= s <= cfg.max_steps)
    if len(used) < MIN_POINTS:
        return None
    steps = np.array([s for s, _ in used])
    loss = np.array([v for _, v in used], dtype=np.float64)
    s1, s2 = s1_all[steps], s2_all[steps]
    params = fit(s1, s2, loss)
    if params is None:
        return None
    end = (s1_all[cfg.max_steps:cfg.max_steps + 1], s2_all[cfg.max_steps:cfg.max_steps + 1])
    final = float(law(params, *end)[0])
    residuals = loss - law(params, s1, s2)
    rng = np.random.default_rng(seed)
    finals, refits = [], []
    for _ in range(resamples):
        pick = rng.integers(0, len(used), len(used))
        if len(set(pick.tolist())) < MIN_POINTS:
            continue
        refit = fit(s1[pick], s2[pick], loss[pick])
        if refit is not None:
            refits.append(refit)
            finals.append(float(law(refit, *end)[0]) + float(rng.choice(residuals)))
    tail = (1 - LEVEL) / 2
    low, high = (np.quantile(finals, [tail, 1 - tail]) if finals else (final, final))
    return Forecast(step=int(steps[-1]), target_step=cfg.max_steps, loss=final, low=float(min(low, final)),
                    high=float(max(high, final)), params=params, points=len(used),
                    annealing_seen=annealing_seen(s2), resampled=refits)


def band(fc: Forecast, cfg: TrainConfig, terms=None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(steps, forecast, low, high) from the forecast's last point to max_steps, for the plot."""
    s1, s2 = terms if terms is not None else schedule_terms(cfg)
    steps = np.unique(np.linspace(fc.step, cfg.max_steps, 100).round().astype(int))
    mean = law(fc.params, s1[steps], s2[steps])
    if not fc.resampled:
        return steps, mean, mean, mean
    curves = np.stack([law(p, s1[steps], s2[steps]) for p in fc.resampled])
    tail = (1 - LEVEL) / 2
    return steps, mean, np.quantile(curves, tail, axis=0), np.quantile(curves, 1 - tail, axis=0)


def val_points(metrics_file: Path, up_to: int | None = None) -> dict[int, float]:
    """{step: val_loss} of a metrics.jsonl, the last record of a step winning (a resumed run logs
    again the steps after its checkpoint)."""
    found = {}
    if not metrics_file.is_file():
        return found
    for line in metrics_file.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a torn record
        if (isinstance(row, dict) and isinstance(row.get("val_loss"), (int, float))
                and isinstance(row.get("step"), int) and (up_to is None or row["step"] <= up_to)):
            found[row["step"]] = float(row["val_loss"])
    return found


def run_points(out_dir: str | Path, cfg: TrainConfig, up_to: int | None = None) -> list[tuple[int, float]]:
    """A run's validation losses; a decay branch's include its main run's up to the branch point
    (the same steps under the same stable rate), its own taking over from there."""
    found = {}
    if cfg.decay_from:
        start = checkpoint.resolve(cfg.decay_from)
        if start is not None:
            branch_step = checkpoint.read_meta(start)["step"]
            found = val_points(start.parent / "metrics.jsonl", min(branch_step, up_to or branch_step))
    found.update(val_points(Path(out_dir) / "metrics.jsonl", up_to))
    return sorted(found.items())


def run_schedule(run_dir: str | Path) -> TrainConfig:
    """The schedule a finished or running run trains with, from its newest checkpoint's meta.json."""
    ckpt = checkpoint.resolve(run_dir)
    if ckpt is None:
        raise checkpoint.CheckpointError(f"{run_dir} has no complete checkpoint: the forecast needs the "
                                         f"run's schedule, which its checkpoints record")
    meta = checkpoint.read_meta(ckpt)
    saved = meta.get("train_config", {})
    return dataclasses.replace(TrainConfig(), **saved_schedule(meta), decay_from=saved.get("decay_from", ""))


def at_evaluation(cfg: TrainConfig, log, step: int) -> Forecast | None:
    """The training loop's hook after a validation loss: the forecast's line and metrics.jsonl fields."""
    if not log.active or log.file is None:
        return None
    log.file.flush()
    fc = forecast(run_points(cfg.out_dir, cfg, up_to=step), cfg)
    if fc is not None:
        log.print(f"step {step}: {fc.line()}")
        log.metrics(step, **fc.fields())
    return fc


def backtest(run_dir: str | Path, fractions=(0.25, 0.5, 0.75)) -> list[dict]:
    """Forecasts made with the points up to each fraction of a finished run, against its final loss."""
    cfg = run_schedule(run_dir)
    points = run_points(run_dir, cfg)
    final = dict(points).get(cfg.max_steps)
    if final is None:
        raise checkpoint.CheckpointError(f"{run_dir} has no validation loss at its last step {cfg.max_steps}: "
                                         f"back-test a finished run")
    terms = schedule_terms(cfg)
    rows = []
    for fraction in fractions:
        cut = int(fraction * cfg.max_steps)
        fc = forecast([(s, v) for s, v in points if s <= cut], cfg, terms)
        rows.append({"fraction": fraction, "step": cut, "final": final, "forecast": fc and fc.loss,
                     "low": fc and fc.low, "high": fc and fc.high,
                     "error": fc and (fc.loss - final) / final, "covered": fc and fc.low <= final <= fc.high,
                     "points": fc and fc.points})
    return rows
