"""The forecast of a run's final validation loss (llama_fineweb/forecast.py)."""

import dataclasses
import json

import numpy as np
import pytest
from runs import EVAL, call_main, metric_rows, run, val_losses

import metrics as metrics_script
from llama_fineweb import forecast
from llama_fineweb.train_config import TrainConfig

TRUE = (2.0, 4.0, 0.45, 1.5e-3)  # L0, A, alpha, C


def synthetic(cfg: TrainConfig, every: int = 20, noise: float = 0.001, seed: int = 0):
    """(step, loss) from warmup's end to max_steps under cfg's schedule with gaussian noise; the true end."""
    s1, s2 = forecast.schedule_terms(cfg)
    steps = np.arange(cfg.warmup_steps, cfg.max_steps + 1, every)
    loss = forecast.law(TRUE, s1[steps], s2[steps]) + np.random.default_rng(seed).normal(0, noise, len(steps))
    return [(int(s), float(v)) for s, v in zip(steps, loss)], float(forecast.law(TRUE, s1[-1:], s2[-1:])[0])


def cosine(**changes) -> TrainConfig:
    return dataclasses.replace(TrainConfig(), max_steps=1000, warmup_steps=50, max_lr=1e-3, min_lr=1e-4, **changes)


def test_fit_recovers_the_parameters_of_a_noisy_synthetic_curve():
    """Points drawn from the law under a cosine schedule, with noise, give back its parameters."""
    cfg = cosine()
    points, _ = synthetic(cfg)
    s1, s2 = forecast.schedule_terms(cfg)
    steps = np.array([s for s, _ in points])
    l0, _, alpha, c = forecast.fit(s1[steps], s2[steps], np.array([v for _, v in points]))
    assert l0 == pytest.approx(TRUE[0], abs=0.1)
    assert alpha == pytest.approx(TRUE[2], rel=0.15)
    assert c == pytest.approx(TRUE[3], rel=0.15)


@pytest.mark.parametrize("schedule,cut", [({}, 500), ({"lr_schedule": "wsd", "decay_steps": 300}, 800)])
def test_forecast_of_a_synthetic_run_covers_its_end(schedule, cut):
    """From half a noisy cosine curve, or a WSD curve 100 steps into its decay, the interval holds
    the true final loss."""
    cfg = cosine(**schedule)
    points, final = synthetic(cfg)
    fc = forecast.forecast([p for p in points if p[0] <= cut], cfg)
    assert fc.low <= final <= fc.high


def test_wsd_forecast_before_the_decay_says_the_decay_is_not_in_it():
    """A WSD run still in its stable stage gets a forecast without the annealing term, and says so."""
    cfg = cosine(lr_schedule="wsd", decay_steps=300)
    points, _ = synthetic(cfg)
    fc = forecast.forecast([p for p in points if p[0] <= 500], cfg)
    assert not fc.annealing_seen and fc.params[3] == 0 and "not in it" in fc.line()


def test_one_or_two_points_into_the_decay_do_not_fit_the_annealing_term():
    """A WSD run fewer than MIN_ANNEALING_POINTS validation losses into its decay is still forecast
    without C (two points pin C nowhere: forecasts below zero were seen); one more point and C is fit."""
    cfg = cosine(lr_schedule="wsd", decay_steps=300)  # the decay starts at step 700
    points, final = synthetic(cfg)
    stable = [p for p in points if p[0] <= 700]
    early = forecast.forecast(points[: len(stable) + forecast.MIN_ANNEALING_POINTS - 1], cfg)
    assert not early.annealing_seen and early.params[3] == 0 and "not in it" in early.line()
    seen = forecast.forecast(points[: len(stable) + forecast.MIN_ANNEALING_POINTS], cfg)
    assert seen.annealing_seen and seen.params[3] > 0


def test_too_few_points_give_no_forecast():
    """Fewer than MIN_POINTS validation losses after warmup: no forecast rather than a wild one."""
    cfg = cosine()
    points, _ = synthetic(cfg, every=100)
    assert forecast.forecast(points[: forecast.MIN_POINTS - 1], cfg) is None


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_dir):
    """24 steps with validation every 2 and checkpoints at 12 and 24."""
    out = tmp_path_factory.mktemp("forecast_run")
    proc = run(out, data_dir, *EVAL, "--max_steps=24", "--eval_interval=2", "--save_interval=12")
    (out / "stdout.txt").write_text(proc.stdout)
    return out


def test_run_logs_a_forecast_line_and_fields_at_each_evaluation(tiny_run):
    """Every validation loss after the first MIN_POINTS after warmup comes with a forecast line and fields."""
    rows = [r for r in metric_rows(tiny_run) if "forecast_loss" in r]
    assert rows and all(r["forecast_step"] == 24 and r["forecast_low"] <= r["forecast_loss"] <= r["forecast_high"]
                        for r in rows)
    assert f"step {rows[0]['step']}: final val loss forecast" in (tiny_run / "stdout.txt").read_text()


def test_tiny_run_half_way_forecast_holds_its_final_loss(tiny_run):
    """The forecast from the first half of a real tiny run holds its final validation loss, within
    1% of it beyond the interval (the stated tolerance)."""
    cfg = forecast.run_schedule(tiny_run)
    final = val_losses(tiny_run)[24]
    fc = forecast.forecast(forecast.run_points(tiny_run, cfg, up_to=12), cfg)
    assert fc.low - 0.01 * final <= final <= fc.high + 0.01 * final


def test_metrics_script_draws_and_prints_the_forecast_after_the_fact(tiny_run, tmp_path):
    """metrics.py RUN --forecast_at STEP forecasts from that step's points and renders the plot."""
    proc = call_main(metrics_script.main, [str(tiny_run), "--forecast_at=16", f"--out={tmp_path / 'm.png'}"])
    assert "up to step 16: final val loss forecast" in proc.stdout and (tmp_path / "m.png").stat().st_size


def test_backtest_table_has_a_row_per_fraction(tiny_run):
    """metrics.py --backtest: forecasts at 25/50/75% against the final validation loss."""
    rows = forecast.backtest(tiny_run)
    assert [r["step"] for r in rows] == [6, 12, 18] and all(r["final"] == val_losses(tiny_run)[24] for r in rows)


def test_decay_branch_is_fit_on_its_main_runs_points_up_to_the_branch_then_its_own(tmp_path):
    """A branch's points: its main run's validation losses up to the branch step, then the branch's
    own (the main run's later ones, under another schedule, are left out)."""
    main_run, branch = tmp_path / "main", tmp_path / "branch"
    (main_run / "step_0000040").mkdir(parents=True)
    (main_run / "step_0000040" / "meta.json").write_text(json.dumps({"step": 40}))
    (main_run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "val_loss": 5.0}) + "\n"
                                                    for s in range(0, 80, 10)))
    branch.mkdir()
    (branch / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "val_loss": 4.0}) + "\n"
                                                  for s in range(40, 70, 10)))
    cfg = cosine(lr_schedule="wsd", decay_steps=30, decay_from=str(main_run / "step_0000040"))
    assert forecast.run_points(branch, cfg) == [(0, 5.0), (10, 5.0), (20, 5.0), (30, 5.0), (40, 4.0),
                                                (50, 4.0), (60, 4.0)]
