"""Where a run will end: a schedule-aware fit of its validation losses, extrapolated to max_steps.

The law is the LR-annealing scaling law of Tissue et al. 2024 ("Scaling Law with Learning Rate
Annealing"), in steps:

    L(s) = L0 + A * S1(s)^-alpha - C * S2(s)

- S1(s): the learning rates summed over the steps before s, in units of max_lr (the "forward area":
  a step at half the peak counts half). It carries the power law's progress.
- S2(s): the annealing area, sum over steps i < s of m_i, where m_i = lambda * m_{i-1} +
  (eta_{i-1} - eta_i): each drop of the learning rate keeps lowering the loss for a while. It is why
  a cosine run's end lies below the continuation of its early power law, and why a WSD run falls in
  its decay. Warmup counts as the peak here (its rising rate is not an annealing).

Both come from continuation.lr_at, so a cosine, linear or WSD run and a decay branch (whose config's
max_steps and decay start are its own) are each forecast by their own schedule.

Three choices make it a forecaster of one run from its own first half (each measured in
docs/instruments.md, "Back-test"):
- The fit's window. The loss's first fall after warmup is steeper than any power law the rest of the
  run follows; fit to it, least squares spends the power law there and puts the run's later fall
  down to C, which it then extrapolates far too low (a 600-step cosine run from half-way: 2.450 for
  an end of 3.816). The points before twice the warmup, and the first third of the steps seen, are
  left out.
- lambda is fit, from a grid of memories (1 / (1 - lambda)) of 2 steps up to MAX_MEMORY_SHARE of
  the run (the paper's 0.999, a 1,000-step memory, is 5% of the 124m config's 19,073 steps). A longer
  memory makes S2 grow with the square of the steps in a cosine run, which the run's first half
  cannot tell from the power law's progress.
- alpha <= 1: a steeper power law is again the first fall, not the run's.

The fit: for each (alpha, lambda) of the grids the law is linear in (L0, A, C), solved by least
squares (with C and without it, keeping A and C >= 0); the smallest squared error wins. The interval:
the fit repeated on the fitted curve plus its own residuals resampled in blocks (neighbouring
validation losses share the model's state, so their errors are not independent; blocks of ~sqrt(n)
keep that), with the window starting at a quarter, a third and half of the steps seen (its start is
a choice too), each refit's final loss plus a drawn residual (the noise of the one final
measurement); the 5th and 95th percentiles: a 90% interval.

Before enough annealing has been seen (a WSD run still in its stable stage or fewer than
MIN_ANNEALING_POINTS points into its decay, a cosine run whose rate has not gone MIN_DROP_SHARE of
its way down: C fit from an S2 that has barely moved is extrapolated to one many times larger, and
forecasts below zero were seen) C is not fit: it is 0 and the forecast is the loss at max_steps
without the decay's gain, an upper bound. The forecast says so.

Other runs of the same model and data (a decay branch of this run, say) can be fit together with it
(`others`): one law, each run's points under its own schedule, so a WSD run's forecast gets its
decay's gain from a branch that has decayed already.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np

from . import checkpoint
from .continuation import SCHEDULE_KNOBS, lr_at, saved_schedule
from .train_config import TrainConfig

MEMORIES = 1 - 1 / np.geomspace(2, 2000, 13)  # lambda: an LR drop's effect settles over 2 to 2,000 steps
MAX_MEMORY_SHARE = 0.05  # ... at most this share of the run's steps
ALPHAS = np.geomspace(0.05, 1.0, 60)  # the exponents tried
FIRST_FALL_WARMUPS = 2  # points before twice the warmup are the loss's first fall, not the law's
FIRST_FALL_SHARE = 1 / 3  # ... and so are the first third of the steps seen so far
WINDOW_SHARES = (1 / 4, 1 / 3, 1 / 2)  # the interval refits from these shares too: the choice is uncertain
MIN_POINTS = 4  # fewer validation losses in the fit's window: no forecast
MIN_ANNEALING_POINTS = 3  # fewer points after the rate began to drop: C is not fit (one or two pin it nowhere)
MIN_DROP_SHARE = 0.2  # ... nor before the rate has gone a fifth of its way down (S2 barely moved: forecasts < 0)
RESAMPLES = 200
LEVEL = 0.90  # the interval's coverage

Params = tuple[float, float, float, float, float]  # L0, A, alpha, C, lambda (nan while C is not fit)


@dataclasses.dataclass
class Forecast:
    step: int  # the last validation loss the fit saw
    target_step: int  # max_steps: where the forecast is for
    loss: float  # the forecast final validation loss
    low: float
    high: float
    params: Params
    points: int  # this run's validation losses fitted
    first_step: int  # the first of them (the ones before are the loss's first fall)
    annealing_seen: bool  # False: no LR drop among the fitted points, so C is not in the forecast
    resampled: list[Params]  # the refits' params, for the band
    other_points: int = 0  # validation losses of other runs fitted with them

    def line(self) -> str:
        note = "" if self.annealing_seen else " (too little LR decay seen yet: its gain is not in it)"
        return (f"final val loss forecast {self.loss:.3f} [{self.low:.3f}, {self.high:.3f}] "
                f"at step {self.target_step}{note}")

    def fields(self) -> dict:
        """What metrics.jsonl records at each evaluation."""
        return {"forecast_loss": self.loss, "forecast_low": self.low, "forecast_high": self.high,
                "forecast_step": self.target_step}


@dataclasses.dataclass
class Terms:
    """A schedule's S1 at every step 0..max_steps, and its S2 for each lambda of `memories`."""
    s1: np.ndarray  # (max_steps + 1,)
    s2: np.ndarray  # (len(memories), max_steps + 1)
    memories: np.ndarray  # the lambdas of MEMORIES the run's length allows
    drop: np.ndarray  # (max_steps + 1,): the share of the schedule's whole drop the rate has gone at each step

    def at(self, params: Params, steps) -> tuple[np.ndarray, np.ndarray]:
        """(S1, S2) at these steps, S2 of the params' lambda (zeros where C is not fit)."""
        steps = np.asarray(steps)
        return self.s1[steps], _s2_of(params, self.memories, self.s2[:, steps])


_TERMS: dict[tuple, Terms] = {}


def allowed_memories(max_steps: int) -> np.ndarray:
    return MEMORIES[1 / (1 - MEMORIES) <= max(MAX_MEMORY_SHARE * max_steps, 2.0)]


def schedule_terms(cfg: TrainConfig, memories: np.ndarray | None = None) -> Terms:
    """S1 and S2 of cfg's schedule, the loss after s steps being L(s); S2 for `memories` (default:
    those cfg's length allows). Computed once per schedule."""
    memories = allowed_memories(cfg.max_steps) if memories is None else memories
    key = tuple(getattr(cfg, k) for k in SCHEDULE_KNOBS) + tuple(memories)
    if key not in _TERMS:
        n = cfg.max_steps
        eta = np.array([lr_at(s, cfg) for s in range(n)], dtype=np.float64) / cfg.max_lr
        settled = eta.copy()
        settled[: cfg.warmup_steps] = 1.0
        drops = np.concatenate([[0.0], settled[:-1] - settled[1:]])
        # m_i = lambda m_(i-1) + drop_i, one column per lambda; between drops it only decays, so the
        # loop runs over the steps where the rate drops (all of a cosine, the decay of a WSD run).
        momentum = np.zeros((n, len(memories)))
        m, last = np.zeros(len(memories)), 0
        for i in np.flatnonzero(drops):
            momentum[last:i] = m * memories ** np.arange(i - last)[:, None]
            m = m * memories ** (i - last) + drops[i]
            last = i
        momentum[last:] = m * memories ** np.arange(n - last)[:, None]
        if len(_TERMS) >= 4:  # a run and its branches is what the loop and metrics.py need
            _TERMS.pop(next(iter(_TERMS)))
        span = 1.0 - cfg.min_lr / cfg.max_lr
        drop = (1.0 - settled) / span if span > 0 else np.zeros(n)
        _TERMS[key] = Terms(s1=np.concatenate([[0.0], np.cumsum(eta)]),
                            s2=np.concatenate([np.zeros((1, len(memories))), np.cumsum(momentum, axis=0)]).T,
                            memories=memories, drop=np.append(drop, 1.0 if span > 0 else 0.0))
    return _TERMS[key]


def law(params: Params, s1: np.ndarray, s2: np.ndarray) -> np.ndarray:
    l0, a, alpha, c = params[:4]
    return l0 + a * s1 ** -alpha - c * s2


def curve(params: Params, terms: Terms, steps) -> np.ndarray:
    """The law at these steps under the schedule whose terms these are."""
    return law(params, *terms.at(params, steps))


def _solve(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least squares for a stack of designs x (m, n, k): (coefficients, squared errors)."""
    scale = np.abs(x).max(axis=1, keepdims=True)  # columns of very different size (S2 ~ 1e3, S1^-a ~ 1e-3)
    scale[scale == 0] = 1.0
    xs = x / scale
    gram = np.einsum("anj,ank->ajk", xs, xs) + 1e-12 * np.eye(x.shape[2])
    coef = np.linalg.solve(gram, np.einsum("anj,n->aj", xs, y)[..., None])[..., 0] / scale[:, 0, :]
    return coef, ((np.einsum("ank,ak->an", x, coef) - y) ** 2).sum(axis=1)


def annealing_seen(s2: np.ndarray, drop: np.ndarray) -> bool:
    """Whether the points show enough annealing to fit C: MIN_ANNEALING_POINTS of them after the
    learning rate began to drop (S2 > 0), the last a MIN_DROP_SHARE of the way down."""
    return (int((np.asarray(s2) > 1e-9).sum()) >= MIN_ANNEALING_POINTS
            and float(np.max(drop, initial=0.0)) >= MIN_DROP_SHARE - 1e-9)


def fit(s1: np.ndarray, s2: np.ndarray, loss: np.ndarray, memories: np.ndarray, anneal: bool) -> Params | None:
    """(L0, A, alpha, C, lambda) of least squared error, A and C >= 0, over the grids of alpha and
    lambda; s2 is (len(memories), n), a row per lambda; C is 0 unless `anneal`. None if no alpha
    gives A >= 0."""
    power = s1[None, :] ** -ALPHAS[:, None]  # (n_alpha, n)
    ones = np.ones_like(power)
    two, err = _solve(np.stack([ones, power], axis=2), loss)
    err[two[:, 1] < 0] = np.inf
    i = int(np.argmin(err))
    best = (err[i], (float(two[i, 0]), float(two[i, 1]), float(ALPHAS[i]), 0.0, float("nan")))
    if anneal:  # C is only fit once the learning rate has dropped far enough, over several points
        k = len(memories)
        design = np.stack([np.tile(ones, (k, 1)), np.tile(power, (k, 1)), -np.repeat(s2, len(ALPHAS), axis=0)],
                          axis=2)  # (lambda x alpha, n, 3)
        three, err3 = _solve(design, loss)
        err3[(three[:, 1] < 0) | (three[:, 2] < 0)] = np.inf
        j = int(np.argmin(err3))
        if err3[j] < best[0]:
            best = (err3[j], (float(three[j, 0]), float(three[j, 1]), float(ALPHAS[j % len(ALPHAS)]),
                              float(three[j, 2]), float(memories[j // len(ALPHAS)])))
    return best[1] if np.isfinite(best[0]) else None


def window(points: list[tuple[int, float]], cfg: TrainConfig, share: float = FIRST_FALL_SHARE
           ) -> list[tuple[int, float]]:
    """The points the law is fit to: up to max_steps, from the later of twice the warmup and `share`
    of the last step seen (the loss's first fall, fast and of another shape, is left out)."""
    seen = sorted((s, v) for s, v in points if 1 <= s <= cfg.max_steps)
    if not seen:
        return []
    start = max(FIRST_FALL_WARMUPS * cfg.warmup_steps, share * seen[-1][0], 1)
    return [(s, v) for s, v in seen if s >= start]


def _stack(parts: list[tuple[list[tuple[int, float]], Terms]]):
    """(S1, S2 rows, losses, each run's bounds) of runs' points, each under its own schedule's terms."""
    parts = [(pts, t) for pts, t in parts if pts]
    s1 = np.concatenate([t.s1[[s for s, _ in pts]] for pts, t in parts])
    s2 = np.concatenate([t.s2[:, [s for s, _ in pts]] for pts, t in parts], axis=1)
    loss = np.array([v for pts, _ in parts for _, v in pts], dtype=np.float64)
    drop = np.concatenate([t.drop[[s for s, _ in pts]] for pts, t in parts])
    return s1, s2, loss, np.cumsum([0] + [len(pts) for pts, _ in parts]), annealing_seen(s2[0], drop)


def forecast(points: list[tuple[int, float]], cfg: TrainConfig, terms: Terms | None = None,
             resamples: int = RESAMPLES, seed: int = 0,
             others: list[tuple[list[tuple[int, float]], TrainConfig]] = ()) -> Forecast | None:
    """The final validation loss of a run with schedule `cfg`, from its (step, val_loss) points so
    far; None with fewer than MIN_POINTS in the fit's window. `others`: (points, schedule) of other
    runs of the same model and data (a decay branch's own points, after its branch step), fit with
    this run's as one law."""
    terms = terms if terms is not None else schedule_terms(cfg)
    used = window(points, cfg)
    if len(used) < MIN_POINTS:
        return None
    more = [([(s, v) for s, v in pts if 1 <= s <= c.max_steps], schedule_terms(c, terms.memories))
            for pts, c in others]
    main = _fit_window(used, terms, more)
    if main is None:
        return None
    params, anneal = main[:2]
    final = float(curve(params, terms, [cfg.max_steps])[0])
    rng = np.random.default_rng(seed)
    finals, refits = [], []
    for share in WINDOW_SHARES:  # the window's start is a choice too: its spread goes into the interval
        points_in = used if share == FIRST_FALL_SHARE else window(points, cfg, share)
        fitted_window = main if share == FIRST_FALL_SHARE else (
            _fit_window(points_in, terms, more) if len(points_in) >= MIN_POINTS else None)
        if fitted_window is None:
            continue
        centre, w_anneal, w1, w2, wloss, bounds = fitted_window
        fitted = law(centre, w1, _s2_of(centre, terms.memories, w2))
        residuals = wloss - fitted
        for _ in range(resamples // len(WINDOW_SHARES)):  # each run's residuals resampled in blocks
            noise = np.concatenate([_blocks(residuals[a:b], rng) for a, b in itertools.pairwise(bounds)])
            refit = fit(w1, w2, fitted + noise, terms.memories, w_anneal)
            if refit is not None:
                refits.append(refit)
                finals.append(float(curve(refit, terms, [cfg.max_steps])[0])
                              + float(rng.choice(residuals[:len(points_in)])))
    tail = (1 - LEVEL) / 2
    low, high = (np.quantile(finals, [tail, 1 - tail]) if finals else (final, final))
    return Forecast(step=used[-1][0], target_step=cfg.max_steps, loss=final, low=float(min(low, final)),
                    high=float(max(high, final)), params=params, points=len(used), first_step=used[0][0],
                    annealing_seen=anneal, resampled=refits,
                    other_points=len(main[4]) - len(used))


def _fit_window(points_in: list[tuple[int, float]], terms: Terms, more: list):
    """The law fit to one window of this run's points and the other runs' (`more`): (params, whether
    C was fit, S1, S2 rows, losses, each run's bounds), or None where no fit exists."""
    s1, s2, loss, bounds, anneal = _stack([(points_in, terms)] + more)
    params = fit(s1, s2, loss, terms.memories, anneal)
    return None if params is None else (params, anneal, s1, s2, loss, bounds)


def _s2_of(params: Params, memories: np.ndarray, s2: np.ndarray) -> np.ndarray:
    """The row of S2 rows (one per lambda of `memories`) for the params' lambda; zeros where C is not fit."""
    if not params[3]:
        return np.zeros(s2.shape[1:])
    return s2[int(np.argmin(np.abs(memories - params[4])))]


def _blocks(residuals: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A moving-block resample of a run's residuals: blocks of ~sqrt(n) neighbours, to length n."""
    n = len(residuals)
    block = max(1, round(n ** 0.5))
    starts = rng.integers(0, n - block + 1, n // block + 1)
    return np.concatenate([residuals[b:b + block] for b in starts])[:n]


def band(fc: Forecast, cfg: TrainConfig, terms: Terms | None = None
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(steps, forecast, low, high) from the forecast's last point to max_steps, for the plot."""
    terms = terms if terms is not None else schedule_terms(cfg)
    steps = np.unique(np.linspace(fc.step, cfg.max_steps, 100).round().astype(int))
    mean = curve(fc.params, terms, steps)
    if not fc.resampled:
        return steps, mean, mean, mean
    curves = np.stack([curve(p, terms, steps) for p in fc.resampled])
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


def _branch_start(cfg: TrainConfig) -> tuple[Path, int] | None:
    """(checkpoint, step) a decay branch started from, or None for a run of its own."""
    start = checkpoint.resolve(cfg.decay_from) if cfg.decay_from else None
    return None if start is None else (start, int(checkpoint.read_meta(start)["step"]))


def branch_step(cfg: TrainConfig) -> int | None:
    """The step a decay branch started from (its checkpoint's), or None for a run of its own."""
    start = _branch_start(cfg)
    return None if start is None else start[1]


def run_points(out_dir: str | Path, cfg: TrainConfig, up_to: int | None = None) -> list[tuple[int, float]]:
    """A run's validation losses; a decay branch's include its main run's up to the branch point
    (the same steps under the same stable rate), its own taking over from there."""
    found = {}
    start = _branch_start(cfg)
    if start is not None:
        ckpt, step = start
        found = val_points(ckpt.parent / "metrics.jsonl", step if up_to is None else min(step, up_to))
    found.update(val_points(Path(out_dir) / "metrics.jsonl", up_to))
    return sorted(found.items())


def other_runs(run_dirs, like: str | Path | None = None) -> list[tuple[list[tuple[int, float]], TrainConfig]]:
    """(own validation losses, schedule) of runs to fit with another of the same model and data: a
    decay branch's own points only (the ones before its branch step are its main run's). With
    `like` (that other run), a run of another model, data or tokens per step is refused: the law is
    in steps of one model on one data."""
    found = []
    mine = None if like is None else _identity(like)
    for run_dir in run_dirs:
        if mine is not None:
            theirs = _identity(run_dir)
            differ = [k for k in mine if mine[k] != theirs[k]]
            if differ:
                raise checkpoint.CheckpointError(
                    f"{run_dir} differs from {like} in {', '.join(differ)}: runs fit together must share "
                    f"the model, the data and the tokens per step (the law is in steps of one model on one data)")
        cfg = run_schedule(run_dir)
        own = sorted(val_points(Path(run_dir) / "metrics.jsonl").items())
        start = branch_step(cfg)
        found.append(([(s, v) for s, v in own if start is None or s > start], cfg))
    return found


def _identity(run_dir: str | Path) -> dict:
    """What runs fit with one law must share, from a run's newest checkpoint."""
    meta = _newest_meta(run_dir)
    saved = meta.get("train_config", {})
    return {"model": meta.get("model_config", saved.get("model")),
            "data": (saved.get("data_dir"), saved.get("data_mix")),
            "tokens per step": saved.get("total_batch_tokens")}


def _newest_meta(run_dir: str | Path) -> dict:
    ckpt = checkpoint.resolve(run_dir)
    if ckpt is None:
        raise checkpoint.CheckpointError(f"{run_dir} has no complete checkpoint: the forecast needs the "
                                         f"run's schedule, which its checkpoints record")
    return checkpoint.read_meta(ckpt)


def run_schedule(run_dir: str | Path) -> TrainConfig:
    """The schedule a finished or running run trains with, from its newest checkpoint's meta.json."""
    meta = _newest_meta(run_dir)
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


def backtest(run_dir: str | Path, fractions=(0.25, 0.5, 0.75), others=()) -> list[dict]:
    """Forecasts made with the points up to each fraction of a finished run, against its final loss.
    A decay branch's fractions are of its own steps (from its branch step to its end). `others`: run
    directories fit with it (other_runs), each with its points up to the same step only, as they
    stood when this run was there."""
    cfg = run_schedule(run_dir)
    points = run_points(run_dir, cfg)
    final = dict(points).get(cfg.max_steps)
    if final is None:
        raise checkpoint.CheckpointError(f"{run_dir} has no validation loss at its last step {cfg.max_steps}: "
                                         f"back-test a finished run")
    terms = schedule_terms(cfg)
    start = branch_step(cfg) or 0
    more = other_runs(others, like=run_dir)
    rows = []
    for fraction in fractions:
        cut = start + int(fraction * (cfg.max_steps - start))
        fc = forecast([(s, v) for s, v in points if s <= cut], cfg, terms,
                      others=[([(s, v) for s, v in pts if s <= cut], c) for pts, c in more])
        rows.append({"fraction": fraction, "step": cut, "final": final, "forecast": fc and fc.loss,
                     "low": fc and fc.low, "high": fc and fc.high,
                     "error": fc and (fc.loss - final) / final, "covered": fc and fc.low <= final <= fc.high,
                     "points": fc and fc.points, "other_points": fc and fc.other_points})
    return rows
