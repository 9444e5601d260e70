"""Stability: spikes found and skipped or rolled back, skipped data windows, divergence, forensics,
z-loss, float16 loss scaling and hardware changes on resume (docs/stability.md)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train_llama
from llama_fineweb import checkpoint
from llama_fineweb.dataloader import GlobalOrder
from llama_fineweb.stability import Stability, StepStats
from llama_fineweb.train_config import TrainConfig
from llama_fineweb.utils import UserError
from model import chunked_cross_entropy
from runs import BASE, ROOT, SEQ, assert_close, call_main, grad_norms, losses, metric_rows, refusal, weights

GLOBAL_BATCH = 8  # sequences per step in runs.BASE
SPIKE_BATCH = 10  # the global batch (of the data order) whose tokens are random: step 11 spikes
# A learnable stream (each token is the previous + 1, mod 64) that a 256-token model picks up in
# ten steps; the score's history is short and its threshold low so that 14 steps show a spike.
LEARN = ["--shuffle=false", "--max_lr=3e-2", "--warmup_steps=1", "--max_steps=14",
         "--spike_min_history=5", "--spike_threshold=4"]


def small_vocab_config(directory: Path) -> Path:
    path = directory / "small_vocab.py"
    path.write_text("from llama_fineweb.train_config import TrainConfig\n\n\ndef config():\n"
                    "    return TrainConfig(model='tiny', model_overrides={'vocab_size': 256})\n")
    return path


def write_shards(directory: Path, random_window: bool) -> Path:
    directory.mkdir()
    tokens = np.tile(np.arange(64, dtype=np.uint16), 400)
    if random_window:
        span = GLOBAL_BATCH * (SEQ + 1)  # shuffle=false: global batch k is these tokens of the stream
        tokens[SPIKE_BATCH * span:(SPIKE_BATCH + 1) * span] = np.random.default_rng(0).integers(0, 256, span)
    np.save(directory / "edufineweb_train_000001.npy", tokens)
    np.save(directory / "edufineweb_val_000000.npy", np.tile(np.arange(64, dtype=np.uint16), 20))
    return directory


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("stability")
    return {"config": small_vocab_config(root), "clean": write_shards(root / "clean", False),
            "spiky": write_shards(root / "spiky", True)}


def train_small(small: dict, out_dir: Path, data: str, *extra: str, check: bool = True):
    argv = [str(small["config"]) if a.endswith("tiny.py") else a for a in BASE]
    return call_main(train_llama.main, [*argv, f"--data_dir={small[data]}", f"--out_dir={out_dir}", *LEARN, *extra],
                     check)


def events(out_dir: Path) -> list[dict]:
    return [r for r in metric_rows(out_dir) if "event" in r]


# ----------------------------------------------------------------------------- spikes

def test_clean_training_trips_nothing(tmp_path, small):
    """The learnable stream without its random window: no spike, skip or rollback, every step applied."""
    train_small(small, tmp_path, "clean", "--on_spike=rollback", "--save_interval=4")
    assert events(tmp_path) == []
    assert sorted(losses(tmp_path)) == list(range(1, 15))
    assert max(r["spike_score"] for r in metric_rows(tmp_path) if "spike_score" in r) < 4


@pytest.mark.parametrize("action", ["skip", "rollback"])
def test_skip_skips_only_the_spike_and_forensics_names_the_window(tmp_path, small, action):
    """--on_spike=skip (or rollback with no checkpoint yet, which falls back to skip and says so):
    only step 11 (the random batch) is skipped, and its forensics file names the shard and token
    offsets of the injected window as the worst sequences."""
    proc = train_small(small, tmp_path, "spiky", f"--on_spike={action}")
    [event] = events(tmp_path)
    assert event["event"] == "skip" and event["step"] == 11 and event["batch"] == SPIKE_BATCH
    assert ("no checkpoint confirmed before this spike" in proc.stdout) == (action == "rollback")
    assert event["score"] > 4 and event["skipped"]
    assert "loss spike" in proc.stdout and "update skipped" in proc.stdout
    assert sorted(losses(tmp_path)) == [s for s in range(1, 15) if s != 11]
    report = json.loads(Path(event["forensics"]).read_text())
    assert Path(event["forensics"]) == tmp_path / "spikes" / "step_0000011.json"
    assert report["step"] == 11 and report["batch"] == SPIKE_BATCH
    span = GLOBAL_BATCH * (SEQ + 1)
    for seq in report["worst"]:
        assert seq["shard"] == "edufineweb_train_000001.npy"
        assert SPIKE_BATCH * span <= seq["offset"] < (SPIKE_BATCH + 1) * span
        assert seq["loss"] > 2 * losses(tmp_path)[10] and isinstance(seq["snippet"], str)


def test_rollback_equals_a_hand_skipped_run(tmp_path, small):
    """--on_spike=rollback goes back to step 8 (confirmed by step 9) and skips batches [8, 11); saved
    at step 12 with the window in its checkpoint and resumed, it equals, bitwise, a fresh run given
    --skip_batches=8:11 by hand."""
    rolled, hand = tmp_path / "rolled", tmp_path / "hand"
    proc = train_small(small, rolled, "spiky", "--on_spike=rollback", "--save_interval=4", "--stop_step=12")
    [event] = events(rolled)
    assert event["event"] == "rollback" and event["skip_batches"] == [8, 11]
    assert event["to"] == str(rolled / "step_0000008")
    assert "rolling back to" in proc.stdout
    assert checkpoint.read_meta(checkpoint.resolve(rolled))["loader"]["skip_batches"] == [[8, 11]]
    train_small(small, rolled, "spiky", "--on_spike=off", "--save_interval=4")  # the window comes from the checkpoint
    train_small(small, hand, "spiky", "--on_spike=off", "--skip_batches=8:11", "--save_interval=4")
    assert losses(rolled) == losses(hand)
    for k, v in weights(hand).items():
        assert torch.equal(v, weights(rolled)[k]), k


def test_max_rollbacks_stops_naming_the_last_good_checkpoint(tmp_path, small):
    """With --max_rollbacks=0 a spike stops the run in one line naming a checkpoint that exists."""
    line = refusal_small(small, tmp_path, "spiky", "--on_spike=rollback", "--save_interval=4", "--max_rollbacks=0")
    assert "after 0 rollbacks" in line and str(tmp_path / "step_0000008") in line
    assert (tmp_path / "step_0000008" / "meta.json").is_file()


def refusal_small(small: dict, out_dir: Path, data: str, *extra: str) -> str:
    proc = train_small(small, out_dir, data, *extra, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    return lines[0]


def test_divergence_keeps_and_names_a_good_checkpoint(tmp_path, small):
    """A finished run continued with --max_lr=1e3: the loss explodes, the run stops in one line
    naming a checkpoint whose loss was normal and that pruning kept; --resume=<it> works."""
    keep = ["--save_interval=1", "--keep_last=2"]
    train_small(small, tmp_path, "clean", "--max_steps=8", *keep)
    line = refusal_small(small, tmp_path, "clean", "--max_steps=20", "--max_lr=1e3", *keep)
    assert "diverged" in line and "the last good checkpoint is" in line
    good = Path(line.split("the last good checkpoint is ")[1].split(" ")[0])
    assert (good / "meta.json").is_file() and checkpoint.read_meta(good)["step"] in (8, 9)
    rows = metric_rows(tmp_path)
    assert max(r.get("loss", 0) for r in rows) > 100
    assert losses(tmp_path)[checkpoint.read_meta(good)["step"]] < 6  # a normal loss at the good checkpoint
    resumed = train_small(small, tmp_path, "clean", "--max_steps=12", f"--resume={good}", *keep)
    assert f"resumed from {good}" in resumed.stdout


def test_skip_windows_are_global_batches_on_any_rank_count():
    """GlobalOrder.skip: windows merge, any rank count serves the same batches, seek lands past them."""
    orders = [GlobalOrder(100, 8, 2, rank, world, shuffle=False) for world in (1, 2) for rank in range(world)]
    for order in orders:
        order.skip([(2, 4), (3, 6), (9, 10)])
        assert order.skipped == [(2, 6), (9, 10)]
    served = {}
    for order in orders:
        for _ in range(order.accum_steps * 6):
            served.setdefault((order.world_size, order.rank), []).append(order.batch)
            order.step = order.following(order.step)
    assert sorted(set(served[(1, 0)])) == [0, 1, 6, 7, 8, 10]
    assert set(served[(2, 0)]) == set(served[(2, 1)]) == set(served[(1, 0)])
    fresh = GlobalOrder(100, 8, 2, shuffle=False)
    fresh.skip([(2, 6)])
    fresh.seek(3 * 8)
    assert fresh.batch == 6


def test_a_mixture_skips_windows_keeps_them_and_names_its_sources(small):
    """--skip_batches over a --data_mix: the mixed stream's batches 1 and 2 are never served, a
    resumed loader keeps skipping them, and forensics can name each sequence's source and shard."""
    from fractions import Fraction

    from llama_fineweb.mixture import MixtureLoader

    mix = [(str(small["clean"]), Fraction(1)), (str(small["spiky"]), Fraction(1))]

    def loader() -> MixtureLoader:
        return MixtureLoader(mix, SEQ, 2, GLOBAL_BATCH, log=lambda _: None)

    plain, skipping = loader(), loader()
    skipping.skip([(1, 3)])
    want = [plain.order.step_ids(4 * k) for k in (0, 3, 4)]
    got = []
    for _ in range(2):
        got.append(skipping.order.step_ids(skipping.step))
        for _ in range(skipping.accum_steps):
            skipping.next_batch()
    resumed = loader()
    resumed.load_state_dict(skipping.state_dict())
    got.append(resumed.order.step_ids(resumed.step))
    assert got == want and resumed.order.skipped == [(1, 3)]
    x, _, sources = resumed.batch_at(resumed.step)
    assert x.shape == (2, SEQ) and {s["source"] for s in sources} <= set(resumed.names)
    assert all(s["shard"] == "edufineweb_train_000001.npy" and s["offset"] % (SEQ + 1) == 0 for s in sources)


# ----------------------------------------------------------------------------- z-loss

def test_z_loss_gradient_equals_a_reference():
    """Chunked cross-entropy + z-loss: the value and both gradients of the plain computation."""
    torch.manual_seed(0)
    h = torch.randn(24, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    targets = torch.randint(0, 40, (24,))
    targets[::5] = -1
    loss, z = chunked_cross_entropy(h, weight, targets, chunk=7, z_loss=1e-2)
    loss.backward()
    grads = h.grad.clone(), weight.grad.clone()
    h.grad = weight.grad = None
    logits = h @ weight.t()
    valid = targets >= 0
    lse = torch.logsumexp(logits, dim=-1)[valid]
    ref_z = lse.square().mean()
    ref = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-1) + 1e-2 * ref_z
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(z, ref_z.detach())
    torch.testing.assert_close(grads[0], h.grad)
    torch.testing.assert_close(grads[1], weight.grad)


def test_z_loss_is_logged_separately(tmp_path, small):
    """--z_loss: metrics.jsonl has z_loss beside a loss that is the cross-entropy alone."""
    train_small(small, tmp_path, "clean", "--z_loss=1e-2", "--max_steps=2")
    rows = [r for r in metric_rows(tmp_path) if "loss" in r]
    assert all(r["z_loss"] > 0 for r in rows)
    assert rows[0]["loss"] == pytest.approx(np.log(256), abs=0.2)


# ----------------------------------------------------------------------------- precision and hardware

def test_float16_with_loss_scaling_resumed_equals_straight_and_fsdp(tmp_path, small):
    """--dtype=float16 --cpu_autocast=true: loss_scale logged; its scaler in the checkpoint, so a
    resumed run equals the straight one bitwise; two FSDP2 processes with the same scaler train
    like it, losses and gradient norms (to 1e-2: FSDP holds the gathered parameters, norms and embeddings included, in
    float16, where one process keeps them in float32 under autocast)."""
    fp16 = ["--dtype=float16", "--cpu_autocast=true", "--max_steps=4", "--save_interval=2", "--max_lr=1e-3"]
    train_small(small, tmp_path / "straight", "clean", *fp16)
    train_small(small, tmp_path / "resumed", "clean", *fp16, "--stop_step=2")
    train_small(small, tmp_path / "resumed", "clean", *fp16)
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    assert grad_norms(tmp_path / "resumed") == grad_norms(tmp_path / "straight")
    argv = [str(small["config"]) if a.endswith("tiny.py") else a for a in BASE]
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    str(ROOT / "train_llama.py"), *argv, f"--data_dir={small['clean']}",
                    f"--out_dir={tmp_path / 'fsdp'}", *LEARN, *fp16, "--parallel=fsdp"],
                   check=True, capture_output=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert_close(losses(tmp_path / "fsdp"), losses(tmp_path / "straight"), 1e-2)
    assert_close(grad_norms(tmp_path / "fsdp"), grad_norms(tmp_path / "straight"), 1e-2)
    assert_close(grad_norms(tmp_path / "fsdp"), grad_norms(tmp_path / "straight"), 1e-2)
    assert all(r["loss_scale"] == 2.0 ** 16 for r in metric_rows(tmp_path / "fsdp") if "loss" in r)
    rows = [r for r in metric_rows(tmp_path / "straight") if "loss" in r]
    assert all(r["loss_scale"] == 2.0 ** 16 for r in rows)
    assert checkpoint.read_meta(checkpoint.resolve(tmp_path / "resumed"))["scaler"]["scale"] == 2.0 ** 16


def test_float16_overflow_halves_the_scale_and_is_not_a_skip(tmp_path, small):
    """A huge initial scale overflows: the scale halves until it fits, and those steps do not count
    toward --max_skipped_steps (2 here)."""
    from llama_fineweb.stability import LossScaler

    original = LossScaler.__init__

    def huge(self, enabled, init_scale=2.0 ** 16, growth_interval=2000):
        original(self, enabled, 2.0 ** 100, growth_interval)

    mp = pytest.MonkeyPatch()
    mp.setattr(LossScaler, "__init__", huge)
    try:
        train_small(small, tmp_path, "clean", "--dtype=float16", "--cpu_autocast=true", "--max_steps=6",
                    "--max_skipped_steps=2")
    finally:
        mp.undo()
    overflows = [r for r in events(tmp_path) if r["event"] == "overflow"]
    assert len(overflows) >= 3 and overflows[-1]["loss_scale"] < 2.0 ** 100
    assert all(r["event"] == "overflow" for r in events(tmp_path))


def test_micro_batch_change_on_resume_equals_straight(tmp_path, small):
    """Saved at micro-batch 8, resumed at 4 (a smaller card: more accumulation): the straight run's
    losses within 1e-5, gradient norms within 1e-4."""
    train_small(small, tmp_path / "straight", "clean", "--micro_batch=8", "--max_steps=6")
    train_small(small, tmp_path / "resumed", "clean", "--micro_batch=8", "--max_steps=6", "--stop_step=3")
    proc = train_small(small, tmp_path / "resumed", "clean", "--micro_batch=4", "--max_steps=6")
    assert "at step 3" in proc.stdout
    for of, tol in ((losses, 1e-5), (grad_norms, 1e-4)):
        straight, resumed = of(tmp_path / "straight"), of(tmp_path / "resumed")
        assert straight.keys() == resumed.keys()
        assert all(abs(straight[s] - resumed[s]) <= tol for s in straight), of.__name__


def test_dtype_change_on_resume_warns(tmp_path, small):
    """bfloat16 -> float16 on resume (an older card): allowed, with a warning naming the change."""
    train_small(small, tmp_path, "clean", "--max_steps=2", "--save_interval=2")
    proc = train_small(small, tmp_path, "clean", "--max_steps=3", "--dtype=float16", "--cpu_autocast=true")
    assert "warning: changed on resume: dtype: checkpoint 'bfloat16' vs now 'float16'" in proc.stdout
    assert max(losses(tmp_path)) == 3


def test_bfloat16_on_a_gpu_without_it_is_refused(tmp_path, data_dir, monkeypatch):
    """A compute capability 7.5 GPU (T4) with --dtype=bfloat16: one line suggesting float16."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    line = refusal(tmp_path, data_dir, "--device=cuda", "--dtype=bfloat16")
    assert "Tesla T4" in line and "7.5" in line and "--dtype=float16" in line


def test_out_of_memory_at_the_first_step_is_one_line(tmp_path, data_dir, monkeypatch):
    """An out-of-memory error before the first step completes: one line with what to try."""
    def out_of_memory(run):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_llama, "train_step", out_of_memory)
    line = refusal(tmp_path, data_dir, "--max_steps=2")
    assert "out of memory at the first step with --micro_batch=2" in line
    assert "--micro_batch=1" in line and "--activation_checkpointing=full" in line


@pytest.mark.parametrize("knob,message", [
    ("--on_spike=panic", "--on_spike='panic'"),
    ("--skip_batches=5:3", "'5:3' is not START:END"),
    ("--spike_min_history=500", "--spike_min_history=500 is more than --spike_window"),
])
def test_stability_knobs_are_checked(tmp_path, data_dir, knob, message):
    """Bad stability knobs: one line naming the value, exit 2."""
    assert message in refusal(tmp_path, data_dir, knob)


# ----------------------------------------------------------------------------- the guard, second pass

def stats(loss: float, norm: float, finite: bool = True) -> StepStats:
    return StepStats(loss=loss, grad_norm=norm, z_loss=0.0, loss_finite=finite, norm_finite=finite, stop=False)


def guard(**knobs) -> Stability:
    cfg = TrainConfig(model="tiny", **{"spike_min_history": 10, "spike_window": 50, **knobs})
    return Stability(cfg, scaler_enabled=cfg.dtype == "float16")


def step_through(stability: Stability, series: list[tuple[float, float]]) -> list[str | None]:
    """Judge each (loss, norm) as training does; the event kinds, None for a plain step."""
    kinds = []
    for step, (loss, norm) in enumerate(series, start=1):
        applied = stability.judge(stats(loss, norm), step, step - 1, 8, forensics=lambda record: None)
        stability.after_step(applied)
        stability.check_stop()
        kinds.append(None if stability.event is None else stability.event["event"])
    return kinds


def test_heavy_tailed_gradient_norms_with_a_flat_loss_never_stop_a_run():
    """The LoRA trap: a flat loss and gradient norms that jump 30-100x for many steps in a row are
    applied (clipping bounds them), logged as "norm" events, and never stop the run."""
    rng = np.random.default_rng(0)
    quiet = [(9.85 + 0.01 * rng.standard_normal(), 0.4 + 0.1 * rng.random()) for _ in range(60)]
    heavy = [(9.85 + 0.01 * rng.standard_normal(), float(rng.uniform(5, 16))) for _ in range(12)]
    stability = guard()
    kinds = step_through(stability, quiet + heavy + quiet)
    assert "norm" in kinds and set(kinds) <= {None, "norm"}
    assert stability.consecutive_skips == 0


def test_a_level_shift_of_the_loss_is_adopted_and_a_divergence_is_not():
    """A loss that settles at a new level a little above the old one (a noisier data source) is
    skipped spike_adopt_after times, then becomes the baseline; a loss far above its level (past
    the divergence limit) is skipped until the run stops."""
    steady = [(3.0 + 0.001 * (i % 3), 0.5) for i in range(30)]
    stability = guard()
    kinds = step_through(stability, steady + [(3.3, 0.5)] * 10)
    assert kinds[30:33] == ["skip", "skip", "adopt"] and kinds[33:] == [None] * 7
    stability = guard()
    with pytest.raises(UserError, match="diverged"):
        step_through(stability, steady + [(9.0, 0.5)] * 10)
    assert stability.consecutive_skips == stability.cfg.max_skipped_steps


def test_warn_never_stops_a_run():
    """--on_spike=warn: every spike is applied and logged, however many in a row."""
    stability = guard(on_spike="warn")
    kinds = step_through(stability, [(3.0, 0.5)] * 30 + [(9.0, 0.5)] * 12)
    assert kinds[30:] == ["spike"] * 12


def test_the_divergence_limit_judges_before_the_history_is_long_enough():
    """Below spike_min_history the z-scores are blind, but a loss that climbs most of the way back
    to ln(vocab) is still a spike, and the first step of a fresh run is the only unjudged one."""
    stability = guard(spike_min_history=50)
    kinds = step_through(stability, [(6.0, 1.0), (5.5, 1.0), (5.4, 1.0), (10.8, 1.0)])
    assert kinds == [None, None, None, "skip"]
    assert stability.event["limit"] == pytest.approx(5.5 + 0.5 * (np.log(50304) - 5.5))  # the median, 5.5


def test_float16_overflowing_at_a_scale_below_one_stops_naming_the_dtype():
    """GradScaler's rules (no floor, halve on overflow) until the scale is below 1: float16 cannot
    hold the values then, and after max_skipped_steps such overflows the run stops in one line
    naming --dtype=bfloat16."""
    stability = guard(dtype="float16")
    steps = 0
    with pytest.raises(UserError, match="--dtype=bfloat16"):
        while steps < 40:
            steps += 1
            stability.judge(StepStats(2.0, math.inf, 0.0, True, False, False), steps, steps, 8, lambda r: None)
            stability.after_step(False)
            stability.check_stop()
    assert steps == 17 + stability.cfg.max_skipped_steps - 1 and stability.scaler.scale < 1


def test_a_non_finite_loss_backs_off_the_loss_scale():
    """A non-finite loss under float16 halves the scale, as GradScaler does, and never grows it."""
    stability = guard(dtype="float16", loss_scale_growth_interval=1)
    stability.judge(stats(float("nan"), 1.0, finite=False), 1, 0, 8, lambda r: None)
    stability.after_step(False)
    assert stability.scaler.scale == 2.0 ** 15


def test_a_rollback_target_that_is_gone_is_named_in_one_line(tmp_path):
    """--on_spike=rollback whose good checkpoint was pruned since: a one-line stop saying it is missing."""
    stability = guard(on_spike="rollback")
    step_through(stability, [(3.0, 0.5)] * 20)
    stability.health.good = tmp_path / "step_0000008"
    with pytest.raises(UserError, match="missing") as error:
        step_through(stability, [(9.0, 0.5)])
    assert "\n" not in str(error.value) and "corrupt" not in str(error.value)


def test_float16_loss_head_gradients_match_float32():
    """16k targets under float16 autocast, the loss scaled as training scales it: the loss head's
    gradients equal the float32 ones to 0.2% (softmax / n_valid flushed to zero in float16 before
    the scale reached it, 1% off on the output weights)."""
    torch.manual_seed(0)
    n, dim, vocab = 16 * 1024, 64, 4096
    h, w = torch.randn(n, dim), torch.randn(vocab, dim) * 0.5  # logits of std ~4: a peaked softmax
    targets = torch.randint(vocab, (n,))

    def grads(dtype):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        scale = 2.0 ** 16 if dtype == torch.float16 else 1.0
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = chunked_cross_entropy(hh, ww, targets)
        (loss * scale).backward()
        return hh.grad / scale, ww.grad / scale

    reference, half = grads(torch.float32), grads(torch.float16)
    for ref, got in zip(reference, half):
        assert ((got - ref).norm() / ref.norm()).item() < 2e-3


def test_divergence_in_the_first_steps_after_a_resume_keeps_and_names_the_last_good_checkpoint(tmp_path, small):
    """An 8-step run saved every 4, resumed with --max_lr=1e3 and the default spike_min_history (50,
    more than the 8 steps of history the checkpoint carries): the divergence limit still judges, no
    diverged checkpoint counts as good, pruning keeps step 8, and the stop names it."""
    train_small(small, tmp_path, "clean", "--max_steps=8", "--save_interval=4", "--spike_min_history=50")
    line = refusal_small(small, tmp_path, "clean", "--max_steps=30", "--max_lr=1e3", "--min_lr=1e2",
                         "--save_interval=2", "--keep_last=3", "--spike_min_history=50")
    good = tmp_path / "step_0000008"
    assert "diverged" in line and f"the last good checkpoint is {good} " in line
    assert (good / "meta.json").is_file()
    assert all(losses(tmp_path)[int(p.name[5:])] < 6 for p in checkpoint.complete_checkpoints(tmp_path))


def test_a_norm_level_shift_with_a_normal_loss_is_adopted_not_stopped(tmp_path, small):
    """Resumed with a z-loss (it adds to the gradient, not to the logged loss) and a learning rate
    too small to move the loss: every step's gradient norm is far above its history while the loss
    stays where it was. The run applies the clipped updates and finishes."""
    train_small(small, tmp_path, "clean", "--max_steps=10", "--save_interval=10")
    proc = train_small(small, tmp_path, "clean", "--max_steps=18", "--z_loss=1.0", "--max_lr=1e-7", "--min_lr=0",
                       "--warmup_steps=0", check=False)
    assert proc.returncode == 0, proc.stderr
    kinds = [r["event"] for r in events(tmp_path)]
    assert kinds and set(kinds) == {"norm"}
    assert sorted(losses(tmp_path)) == list(range(1, 19))


def test_fp16_scale_moves_before_the_save_and_resumes_exactly(tmp_path, small):
    """--loss_scale_growth_interval=1: the scale doubles every step (and halves on an overflow), so
    it differs at the save; the resumed run's losses, gradient norms and scales equal the straight
    run's."""
    fp16 = ["--dtype=float16", "--cpu_autocast=true", "--max_steps=6", "--save_interval=3", "--max_lr=1e-3",
            "--loss_scale_growth_interval=1"]
    train_small(small, tmp_path / "straight", "clean", *fp16)
    train_small(small, tmp_path / "resumed", "clean", *fp16, "--stop_step=3")
    saved = checkpoint.read_meta(tmp_path / "resumed" / "step_0000003")["scaler"]["scale"]
    assert saved != 2.0 ** 16
    train_small(small, tmp_path / "resumed", "clean", *fp16)

    def trace(run: Path) -> dict:
        return {r["step"]: (r["loss"], r["grad_norm"], r["loss_scale"]) for r in metric_rows(run)
                if "loss" in r and "event" not in r}

    assert trace(tmp_path / "resumed") == trace(tmp_path / "straight")


def write_two_window_shards(directory: Path) -> Path:
    """The learnable stream with random tokens at global batches 10 and 13."""
    directory.mkdir()
    tokens = np.tile(np.arange(64, dtype=np.uint16), 400)
    span = GLOBAL_BATCH * (SEQ + 1)
    rng = np.random.default_rng(0)
    for batch in (SPIKE_BATCH, SPIKE_BATCH + 3):
        tokens[batch * span:(batch + 1) * span] = rng.integers(0, 256, span)
    np.save(directory / "edufineweb_train_000001.npy", tokens)
    np.save(directory / "edufineweb_val_000000.npy", np.tile(np.arange(64, dtype=np.uint16), 20))
    return directory


def test_two_spikes_at_one_step_keep_their_own_forensics(tmp_path, small):
    """A rollback runs through step 11 again and meets a second random batch there: each event
    keeps its own forensics file, naming its own batch."""
    small = {**small, "twice": write_two_window_shards(tmp_path / "twice")}
    train_small(small, tmp_path / "run", "twice", "--on_spike=rollback", "--save_interval=4", "--max_steps=12")
    at_11 = [e for e in events(tmp_path / "run") if e["step"] == 11 and "forensics" in e]
    assert len(at_11) == 2 and at_11[0]["forensics"] != at_11[1]["forensics"]
    assert [json.loads(Path(e["forensics"]).read_text())["batch"] for e in at_11] == [SPIKE_BATCH, SPIKE_BATCH + 3]


def test_max_rollbacks_0_records_no_rollback_and_its_advice_gets_past(tmp_path, small):
    """--max_rollbacks=0: the spike is logged as a stop, never as a rollback, and the command the
    line gives (resume from the good checkpoint, skipping the window) trains past the bad batch."""
    line = refusal_small(small, tmp_path, "spiky", "--on_spike=rollback", "--save_interval=4", "--max_rollbacks=0")
    assert [e["event"] for e in events(tmp_path)] == ["stop"]
    assert "rolling back" not in (tmp_path / "log.txt").read_text()
    advice = line.split("resume with ")[1].split()
    assert advice == [f"--resume={tmp_path / 'step_0000008'}", "--skip_batches=8:11"]
    train_small(small, tmp_path, "spiky", "--on_spike=rollback", "--save_interval=4", "--max_rollbacks=0", *advice)
    assert max(losses(tmp_path)) == 14


class Crash(BaseException):
    """A process killed at once: nothing after it runs, no save."""


def test_a_rollback_survives_a_crash_before_the_next_save(tmp_path, small, monkeypatch):
    """Saved every 2 steps: the spike at step 11 rejects step 10's checkpoint and rolls back to step 8.
    Killed right after the rollback and resumed with the plain command, the run continues from the
    good weights with the window skipped: it equals the uninterrupted rolled-back run bitwise."""
    args = ["--on_spike=rollback", "--save_interval=2"]
    train_small(small, tmp_path / "straight", "spiky", *args)
    original = train_llama.roll_back_if_spiked

    def crash_after(run):
        if original(run):
            raise Crash
        return False

    monkeypatch.setattr(train_llama, "roll_back_if_spiked", crash_after)
    with pytest.raises(Crash):
        train_small(small, tmp_path / "crashed", "spiky", *args)
    monkeypatch.undo()
    assert (tmp_path / "crashed" / "rejected" / "step_0000010").is_dir()
    train_small(small, tmp_path / "crashed", "spiky", *args)
    assert losses(tmp_path / "crashed") == losses(tmp_path / "straight")
    for k, v in weights(tmp_path / "straight").items():
        assert torch.equal(v, weights(tmp_path / "crashed")[k]), k


def test_a_branch_rolling_back_to_its_start_keeps_one_run_id(tmp_path, small):
    """A WSD decay branch from step 8 of its parent meets the spike at step 11 and rolls back to its
    start in the parent's directory: every checkpoint the branch writes carries one run id."""
    wsd = ["--lr_schedule=wsd", "--max_steps=20", "--decay_steps=4"]
    train_small(small, tmp_path / "main", "spiky", *wsd, "--save_interval=4", "--stop_step=8")
    branch = tmp_path / "branch"
    train_small(small, branch, "spiky", "--lr_schedule=wsd", "--decay_steps=6",
                f"--decay_from={tmp_path / 'main' / 'step_0000008'}", "--on_spike=rollback", "--save_interval=2",
                "--keep_last=0")
    assert any(e["event"] == "rollback" for e in events(branch))
    ids = {checkpoint.read_meta(p)["run_id"] for p in checkpoint.complete_checkpoints(branch)}
    assert len(ids) == 1
