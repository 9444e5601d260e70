"""Learning-rate schedules (cosine, linear, WSD), extending a WSD run, and decay branches."""

import math

import pytest

from llama_fineweb import checkpoint
from llama_fineweb.train_config import ConfigError, TrainConfig, load_config
from runs import losses, metric_rows, refusal, run_here
from llama_fineweb.continuation import lr_at

WSD = ["--lr_schedule=wsd", "--decay_steps=4"]


def lrs(out_dir) -> dict[int, float]:
    """step -> the learning rate that step trained with, from metrics.jsonl."""
    return {r["step"]: r["lr"] for r in metric_rows(out_dir) if "lr" in r}


def curve(**knobs) -> list[float]:
    cfg = TrainConfig(max_steps=100, warmup_steps=10, max_lr=1.0, min_lr=0.1, **knobs)
    cfg.validate()
    return [lr_at(step, cfg) for step in range(101)]


def test_cosine_is_the_default_and_unchanged():
    """cosine: warmup, then half a cosine from max_lr to min_lr at max_steps."""
    lr = curve()
    assert lr[:10] == [(s + 1) / 10 for s in range(10)]
    assert lr[10] == 1.0 and lr[100] == 0.1
    assert lr[55] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))


def test_linear_decays_in_a_straight_line():
    """linear: warmup, then max_lr down to min_lr in equal steps."""
    lr = curve(lr_schedule="linear")
    assert lr[:10] == curve()[:10] and lr[10] == 1.0 and lr[100] == 0.1
    assert lr[55] == pytest.approx(0.55)
    assert all(math.isclose(a - b, 0.01) for a, b in zip(lr[10:100], lr[11:100]))


@pytest.mark.parametrize("shape,halfway", [("linear", 0.55), ("1-sqrt", 0.1 + 0.9 * (1 - math.sqrt(0.5)))])
def test_wsd_is_constant_then_decays_with_its_shape(shape, halfway):
    """wsd: warmup, max_lr until the last decay_steps, then the shape down to min_lr."""
    lr = curve(lr_schedule="wsd", decay_steps=20, decay_shape=shape)
    assert lr[:10] == curve()[:10]
    assert set(lr[10:81]) == {1.0}
    assert lr[90] == pytest.approx(halfway)
    assert all(a > b for a, b in zip(lr[80:101], lr[81:101])) and lr[100] == 0.1
    assert curve(lr_schedule="wsd", decay_fraction=0.2, decay_shape=shape) == lr


@pytest.mark.parametrize("extra,message", [
    (["--lr_schedule=step"], "--lr_schedule='step': choose one of cosine, linear, wsd"),
    (["--lr_schedule=wsd", "--decay_shape=cos"], "--decay_shape='cos': choose one of linear, 1-sqrt"),
    (["--lr_schedule=wsd", "--max_steps=10", "--warmup_steps=5", "--decay_steps=6"], "exceed --max_steps=10"),
    (["--decay_from=out/x", "--decay_steps=3"], "add --lr_schedule=wsd"),
])
def test_bad_schedule_knobs_are_config_errors(extra, message):
    """Schedule knobs that cannot work name themselves."""
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(extra)


def test_extending_wsd_keeps_the_learning_rate_continuous(tmp_path, data_dir):
    """A WSD run stopped in its stable stage and resumed with more max_steps: no re-warm-up, no jump,
    max_lr until the new decay; a cosine run extended the same way says that its LR jumps."""
    run_here(tmp_path, data_dir, *WSD, "--stop_step=5")
    proc = run_here(tmp_path, data_dir, *WSD, "--max_steps=16")
    lr = lrs(tmp_path)
    cfg = load_config(["--max_steps=16", "--warmup_steps=3", "--max_lr=6e-4", "--min_lr=6e-5", *WSD])
    assert lr == {step: lr_at(step - 1, cfg) for step in range(1, 17)}
    assert [lr[s] for s in range(3, 13)] == [6e-4] * 10 and lr[16] < lr[15] < lr[12]
    assert "moves the learning rate" not in proc.stdout
    cosine = tmp_path / "cosine"
    run_here(cosine, data_dir, "--stop_step=4")
    assert "moves the learning rate at step 4" in run_here(cosine, data_dir, "--max_steps=16", "--stop_step=5").stdout


def test_decay_branch_from_a_stable_checkpoint(tmp_path, data_dir):
    """A branch from step 4 of a WSD run: its first step is the main run's next step bitwise (but for
    the LR), it decays to min_lr over decay_steps and stops, with its own run id; the main run goes on."""
    main_dir, branch = tmp_path / "main", tmp_path / "branch"
    run_here(main_dir, data_dir, *WSD, "--save_interval=4", "--stop_step=6")
    proc = run_here(branch, data_dir, *WSD, f"--decay_from={main_dir}/step_0000004", "--decay_steps=3")
    assert "decay branch of run" in proc.stdout
    assert sorted(losses(branch)) == [5, 6, 7]
    assert losses(branch)[5] == losses(main_dir)[5]
    norms = [{r["step"]: r["grad_norm"] for r in metric_rows(d) if "grad_norm" in r} for d in (main_dir, branch)]
    assert norms[0][5] == norms[1][5]
    assert lrs(branch) == {5: 6e-4, 6: pytest.approx(6e-5 + 2 / 3 * 5.4e-4), 7: pytest.approx(6e-5 + 1 / 3 * 5.4e-4)}
    assert checkpoint.read_meta(checkpoint.resolve(branch))["step"] == 7
    assert checkpoint.read_meta(checkpoint.resolve(branch))["run_id"] != \
        checkpoint.read_meta(checkpoint.resolve(main_dir))["run_id"]
    assert "needs its own out_dir" in refusal(main_dir, data_dir, *WSD, f"--decay_from={main_dir}")
    run_here(main_dir, data_dir, *WSD)  # the main run continues to its own end
    assert sorted(losses(main_dir)) == list(range(1, 13))


def test_decay_branches_record_their_parent_and_refuse_another_runs_dir(tmp_path, data_dir):
    """Every checkpoint records its lineage; a branch from another step into a branch's out_dir, or
    into another run's, is refused in one line naming what is there; a finished branch's advice
    works; a corrupt --decay_from does not suggest --resume."""
    main_dir, branch, other = tmp_path / "main", tmp_path / "branch", tmp_path / "other"
    run_here(main_dir, data_dir, *WSD, "--save_interval=4", "--stop_step=8")
    main_id = checkpoint.read_meta(main_dir / "step_0000008")["run_id"]
    assert checkpoint.read_meta(main_dir / "step_0000008")["lineage"] == {"run_id": main_id, "parent": None}
    start = main_dir / "step_0000004"
    run_here(branch, data_dir, *WSD, f"--decay_from={start}", "--decay_steps=4", "--stop_step=6")
    meta = checkpoint.read_meta(branch / "step_0000006")
    assert meta["lineage"]["parent"] == {"run_id": main_id, "step": 4, "checkpoint": str(start.resolve())}
    line = refusal(branch, data_dir, *WSD, f"--decay_from={main_dir}/step_0000008", "--decay_steps=3")
    assert f"holds a decay branch of run {main_id} from step 4" in line and f"--decay_from={start.resolve()}" in line
    line = refusal(main_dir, data_dir, *WSD, f"--decay_from={branch}/step_0000006", "--decay_steps=3")
    assert f"holds run {main_id}, at step_0000008, not a branch" in line
    assert checkpoint.resolve(main_dir).name == "step_0000008" and checkpoint.resolve(branch).name == "step_0000006"
    run_here(branch, data_dir, *WSD, f"--decay_from={start}", "--decay_steps=4")  # resumes to its end
    line = refusal(branch, data_dir, *WSD, f"--decay_from={start}", "--decay_steps=4")
    advice = line[line.index("--decay_from="):].replace("NEW_DIR", str(other)).replace("=N", "=5").split()
    run_here(other, data_dir, *WSD, *advice)
    assert sorted(losses(other)) == [5, 6, 7, 8, 9]
    dcp_file = next((main_dir / "step_0000008").glob("*.distcp"))
    dcp_file.write_bytes(dcp_file.read_bytes()[:-8] + bytes(8))
    line = refusal(tmp_path / "new", data_dir, *WSD, f"--decay_from={main_dir}/step_0000008", "--decay_steps=3")
    assert "--decay_from=PATH" in line and "--resume" not in line


def test_plan_counts_a_decay_branch_by_its_own_steps():
    """plan.py times a decay branch's decay_steps, not the main run's max_steps."""
    from test_plan import ROOT, plan_json

    base = ["--config", str(ROOT / "configs" / "llama_1p7b.py"), "--gpu", "H100", "--gpus", "8", "--lr_schedule=wsd"]
    assert plan_json(*base)["tokens"] == 38_147 * 524_288
    assert plan_json(*base, "--decay_from=out/llama_1p7b", "--decay_steps=2000")["tokens"] == 2000 * 524_288
