"""The forecast of a run's final validation loss (llama_fineweb/forecast.py)."""

import dataclasses
import json

import numpy as np
import pytest
from runs import EVAL, call_main, metric_rows, run, val_losses

import metrics as metrics_script
from llama_fineweb import forecast
from llama_fineweb.train_config import TrainConfig


def cosine(**changes) -> TrainConfig:
    return dataclasses.replace(TrainConfig(), **{"max_steps": 1000, "warmup_steps": 50, "max_lr": 1e-3, "min_lr": 1e-4,
                                                 **changes})


# L0, A, alpha, C, lambda: a memory of 20 steps, one the 1000-step runs below allow (at most 5% of them)
TRUE = (2.0, 4.0, 0.45, 1.5e-2, forecast.MEMORIES[4])


def synthetic(cfg: TrainConfig, every: int = 20, noise: float = 0.001, seed: int = 0, start: int | None = None,
              true=TRUE):
    """(step, loss) from warmup's end to max_steps under cfg's schedule with gaussian noise; the true end."""
    terms = forecast.schedule_terms(cfg, forecast.allowed_memories(1000))
    steps = np.unique(np.append(np.arange(cfg.warmup_steps if start is None else start, cfg.max_steps, every),
                                cfg.max_steps))
    loss = forecast.curve(true, terms, steps) + np.random.default_rng(seed).normal(0, noise, len(steps))
    return [(int(s), float(v)) for s, v in zip(steps, loss)], float(forecast.curve(true, terms, [cfg.max_steps])[0])


def test_fit_recovers_the_parameters_of_a_noisy_synthetic_curve():
    """Points drawn from the law under a cosine schedule, with noise, give back its parameters,
    the LR drops' memory among them."""
    assert TRUE[4] in forecast.allowed_memories(1000)
    cfg = cosine()
    points, _ = synthetic(cfg)
    terms = forecast.schedule_terms(cfg)
    steps = np.array([s for s, _ in points])
    l0, _, alpha, c, memory = forecast.fit(terms.s1[steps], terms.s2[:, steps], np.array([v for _, v in points]),
                                           terms.memories, anneal=True)
    assert l0 == pytest.approx(TRUE[0], abs=0.1)
    assert alpha == pytest.approx(TRUE[2], rel=0.15)
    assert c == pytest.approx(TRUE[3], rel=0.15)
    assert memory == TRUE[4]


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
    without C (two points pin C nowhere: forecasts below zero were seen); one more point and C is fit.
    (The decay is short, so two points are already past a fifth of its drop.)"""
    cfg = cosine(lr_schedule="wsd", decay_steps=100)  # the decay starts at step 900
    points, _ = synthetic(cfg)
    stable = [p for p in points if p[0] <= 900]
    assert forecast.schedule_terms(cfg).drop[stable[-1][0] + 40] >= forecast.MIN_DROP_SHARE
    early = forecast.forecast(points[: len(stable) + forecast.MIN_ANNEALING_POINTS - 1], cfg)
    assert not early.annealing_seen and early.params[3] == 0 and "not in it" in early.line()
    seen = forecast.forecast(points[: len(stable) + forecast.MIN_ANNEALING_POINTS], cfg)
    assert seen.annealing_seen and seen.params[3] > 0


def test_c_waits_for_a_fifth_of_the_cosines_drop():
    """Early in a cosine run the rate has barely dropped and S2 barely moved: a C fit there is
    extrapolated to an S2 many times larger (a real 3000-step run logged forecasts below zero from
    17% of it). The forecast leaves C out, and says so, until the rate has gone a fifth of its way
    down (step ~330 of this 1000-step run, warmup included); then C is fit."""
    cfg = cosine()
    points, final = synthetic(cfg)
    terms = forecast.schedule_terms(cfg)
    early = forecast.forecast([p for p in points if p[0] <= 250], cfg)
    assert terms.drop[250] < forecast.MIN_DROP_SHARE
    assert not early.annealing_seen and early.params[3] == 0 and "not in it" in early.line()
    assert early.loss > final  # without the decay's gain: above the end
    later = forecast.forecast([p for p in points if p[0] <= 350], cfg)
    assert terms.drop[350] >= forecast.MIN_DROP_SHARE and later.annealing_seen and later.params[3] > 0


def test_too_few_points_give_no_forecast():
    """Fewer than MIN_POINTS validation losses in the fit's window: no forecast rather than a wild one."""
    cfg = cosine()
    points, _ = synthetic(cfg, every=100)
    assert forecast.forecast(points[: forecast.MIN_POINTS - 1], cfg) is None


def test_the_first_fall_is_left_out_of_the_fit():
    """Points before twice the warmup, where a real loss falls far faster than the law (the tiny demo:
    8.0 to 5.0 in 30 steps), do not pull the forecast: with them it is the forecast without them,
    within 0.5% of the true end. Fit from the warmup's end, such points spent alpha on that fall."""
    cfg = cosine()
    points, final = synthetic(cfg)
    steep = [(s, v + (3.0 * np.exp(-(s - 50) / 15) if s < 100 else 0.0)) for s, v in points]
    assert steep[0][1] > points[0][1] + 2.9
    with_fall = forecast.forecast([p for p in steep if p[0] <= 500], cfg)
    without = forecast.forecast([p for p in points if 100 <= p[0] <= 500], cfg)
    assert with_fall.first_step >= 2 * cfg.warmup_steps and with_fall.loss == without.loss
    assert with_fall.loss == pytest.approx(final, rel=0.005)


def test_a_wsd_run_fit_with_its_decay_branch_gets_the_decays_gain():
    """A WSD run in its stable stage, fit with a branch that has decayed (the same law, the branch
    under its own schedule), forecasts its own end with the decay's gain: the true end to 0.5%, and
    within the interval. Alone, the same points give the stable-stage loss, 0.2 nats higher."""
    main_cfg = cosine(lr_schedule="wsd", decay_steps=300)  # the decay starts at step 700
    branch_cfg = cosine(lr_schedule="wsd", decay_steps=200, max_steps=600)  # a branch at 400, decay 400-600
    points, final = synthetic(main_cfg)
    branch_points, _ = synthetic(branch_cfg, start=420, seed=1)
    stable = [p for p in points if p[0] <= 600]
    alone = forecast.forecast(stable, main_cfg)
    joint = forecast.forecast(stable, main_cfg, others=[(branch_points, branch_cfg)])
    assert not alone.annealing_seen and alone.loss > final + 0.2
    assert joint.annealing_seen and joint.other_points == len(branch_points)
    assert joint.loss == pytest.approx(final, rel=0.005) and joint.low <= final <= joint.high


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
    assert "-16): final val loss forecast" in proc.stdout and (tmp_path / "m.png").stat().st_size


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


def fake_run(run_dir, cfg: TrainConfig, points, step: int):
    """A run directory as the forecast reads it: a checkpoint's meta.json (the schedule) and metrics.jsonl."""
    (run_dir / f"step_{step:07d}").mkdir(parents=True)
    saved = {k: getattr(cfg, k) for k in (*forecast.SCHEDULE_KNOBS, "decay_from", "model", "data_dir",
                                          "total_batch_tokens")}
    (run_dir / f"step_{step:07d}" / "meta.json").write_text(json.dumps({"step": step, "train_config": saved}))
    (run_dir / "latest").write_text(f"step_{step:07d}")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "val_loss": v}) + "\n" for s, v in points))
    return run_dir


def wsd_run_and_branch(tmp_path):
    """A finished synthetic WSD run (decay 700-1000) and a finished decay branch of it from step 400."""
    main_cfg = cosine(lr_schedule="wsd", decay_steps=300)
    points, final = synthetic(main_cfg)
    main_run = fake_run(tmp_path / "main", main_cfg, points, 1000)
    (main_run / "step_0000400").mkdir()
    (main_run / "step_0000400" / "meta.json").write_text(json.dumps({"step": 400}))
    branch_cfg = cosine(lr_schedule="wsd", decay_steps=200, max_steps=600,
                        decay_from=str(main_run / "step_0000400"))
    branch_points, _ = synthetic(branch_cfg, start=420, seed=1)
    return main_run, fake_run(tmp_path / "branch", branch_cfg, branch_points, 600), final


def test_a_branch_is_back_tested_at_fractions_of_its_own_steps(tmp_path):
    """A decay branch from step 400 to 600: its 25/50/75% are 450, 500 and 550, inside its decay."""
    _, branch, _ = wsd_run_and_branch(tmp_path)
    rows = forecast.backtest(branch)
    assert [r["step"] for r in rows] == [450, 500, 550]


def test_metrics_script_fits_a_run_with_its_branch(tmp_path):
    """metrics.py RUN --with BRANCH: the stable-stage forecast gets the decay's gain from the branch
    (to 0.5% of the true end), says how many of the branch's points it used, and so does --backtest."""
    main_run, branch, final = wsd_run_and_branch(tmp_path)
    alone = call_main(metrics_script.main, [str(main_run), "--forecast_at=600", f"--out={tmp_path / 'a.png'}"])
    assert "not in it" in alone.stdout
    proc = call_main(metrics_script.main, [str(main_run), "--forecast_at=600", "--with", str(branch),
                                           f"--out={tmp_path / 'b.png'}"])
    line = proc.stdout.splitlines()[0]
    assert f"and 10 of {branch}" in line and "not in it" not in line
    assert float(line.split("forecast ")[1].split()[0]) == pytest.approx(final, rel=0.005)
    table = call_main(metrics_script.main, [str(main_run), "--backtest", "--with", str(branch)]).stdout
    assert "| 75% | 750 |" in table


def test_a_run_of_another_model_or_batch_is_not_fit_with_it(tmp_path):
    """--with a run of another model or another number of tokens per step: a one-line refusal that
    names what differs (the law is in steps of one model on one data), nothing fitted."""
    main_run, _, _ = wsd_run_and_branch(tmp_path)
    for name, change in [("model", {"model": "124m"}), ("tokens per step", {"total_batch_tokens": 2048})]:
        other_cfg = dataclasses.replace(cosine(max_steps=600), **change)
        other = fake_run(tmp_path / name.replace(" ", "_"), other_cfg, synthetic(other_cfg)[0], 600)
        proc = call_main(metrics_script.main, [str(main_run), "--with", str(other), f"--out={tmp_path / 'c.png'}"],
                         check=False)
        assert proc.returncode == 2 and f"differs from {main_run} in {name}" in proc.stderr
        assert not (tmp_path / "c.png").exists()
