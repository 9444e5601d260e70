"""At scale (docs/at-scale.md): asynchronous checkpoints, profiler traces, per-layer statistics."""

import copy
import json
import signal
from pathlib import Path

import pytest
import torch

import train_llama
from conftest import make_tiny_model
from llama_fineweb import checkpoint, metrics, parallel
from llama_fineweb.layer_stats import LayerStats
from llama_fineweb.stability import Health
from llama_fineweb.step import StepSettings, optimizer_step
from llama_fineweb.utils import Dist
from runs import EVAL, assert_close, losses, metric_rows, refusal, run, weights
from test_stability import events, small, train_small  # noqa: F401 - small is a fixture
from test_train import start, wait_for_step

SLOW = checkpoint.AsyncSaver.SLOW_ENV


def test_a_checkpoint_being_written_becomes_good_only_once_complete(tmp_path):
    """A healthy judged step confirms an asynchronous save's weights; it is good once written."""
    health = Health()
    health.pending = health.writing = tmp_path / "step_0000004"
    health.judged(healthy=True)
    assert health.good is None and health.pending is not None
    health.written()
    assert health.good == tmp_path / "step_0000004" and health.pending is None


def test_an_unhealthy_step_during_the_write_never_makes_it_good(tmp_path):
    """A spike while the save is written: the checkpoint is never trusted, even once complete."""
    health = Health()
    health.pending = health.writing = tmp_path / "step_0000004"
    health.judged(healthy=False)
    health.written()
    assert health.good is None and health.pending is None


def test_sigkill_during_an_async_save_resumes_from_the_previous_checkpoint(tmp_path, data_dir, straight):
    """SIGKILL while step 8's save is in flight (the loop went on to step 10): latest is still step 4,
    the resumed run starts there and ends bitwise equal to a straight run."""
    proc = start(tmp_path, data_dir, *EVAL, "--async_save=true", "--save_interval=4", env={SLOW: "8"})
    try:
        wait_for_step(tmp_path, 10, proc)
        assert list(tmp_path.glob(".tmp_step_0000008")), "step 8's save is not in flight"
        assert checkpoint.resolve(tmp_path).name == "step_0000004"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    resumed = run(tmp_path, data_dir, *EVAL, "--async_save=true", "--save_interval=4")
    assert "at step 4" in resumed.stdout and not list(tmp_path.glob(".tmp_step_*"))
    assert losses(tmp_path) == losses(straight)
    for k, v in weights(straight).items():
        assert v.equal(weights(tmp_path)[k]), k


def test_ctrl_c_waits_for_the_save_in_flight(tmp_path, data_dir):
    """Ctrl-C while a slow background save is in flight: that save completes, then the stop's own
    save; exit 0 with both complete and nothing partial left."""
    proc = start(tmp_path, data_dir, "--max_steps=100000", "--async_save=true", "--save_interval=2",
                 env={SLOW: "2:3"})
    wait_for_step(tmp_path, 3, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    stopped_at = checkpoint.read_meta(checkpoint.resolve(tmp_path))["step"]
    assert stopped_at >= 3 and (tmp_path / "step_0000002" / checkpoint.META).is_file()
    assert f"step_0000002 (written in the background)" in out and not list(tmp_path.glob(".tmp_*"))


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_save_and_resume_asynchronously(tmp_path, data_dir, straight, parallel):
    """Two processes (DDP or FSDP) save in the background, stop at 6, resume: the straight run."""
    first = run(tmp_path, data_dir, "--async_save=true", "--save_interval=3", "--stop_step=6",
                f"--parallel={parallel}", nproc=2)
    assert "written in the background" in first.stdout
    run(tmp_path, data_dir, "--async_save=true", "--save_interval=3", f"--parallel={parallel}", nproc=2)
    assert_close(losses(tmp_path), losses(straight), 1e-5)
    assert_close(weights(tmp_path), weights(straight), 1e-5)


def test_profile_writes_a_trace_of_the_chosen_steps(tmp_path, data_dir):
    """--profile=3:4 on the CPU: a Chrome trace that json.load reads, with steps 3 and 4 and no other."""
    run(tmp_path, data_dir, "--profile=3:4", "--max_steps=5")
    [trace] = (tmp_path / "profile").glob("*.json")
    events = json.loads(trace.read_text())["traceEvents"]
    steps = {e["name"] for e in events if str(e.get("name", "")).startswith("step ")}
    assert steps == {"step 3", "step 4"}


def test_memory_snapshot_on_the_cpu_is_one_line(tmp_path, data_dir):
    """--memory_snapshot=true on the CPU: refused in one line naming the flag; no run directory left."""
    out = tmp_path / "run"
    assert "--memory_snapshot=true records the CUDA" in refusal(out, data_dir, "--memory_snapshot=true")
    assert not out.exists()


@pytest.mark.parametrize("value", ["3", "4:2", "0:2", "a:b"])
def test_a_bad_profile_range_is_one_line(tmp_path, data_dir, value):
    """--profile needs START:END with 1 <= START <= END."""
    assert "--profile=" in refusal(tmp_path / "run", data_dir, f"--profile={value}")


# ----------------------------------------------------------------------------- per-layer statistics

def test_layer_stats_equal_a_hand_computation():
    """One statistics step of the tiny model (two micro-batches, no clipping): each block's gradient
    norm, weight norm, update ratio and output RMS equal the same figures computed by hand."""
    model = make_tiny_model(max_seq_len=32).train()
    reference = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, 50257, (2, 2, 33), generator=torch.Generator().manual_seed(0))
    batches = [(t[:, :-1], t[:, 1:]) for t in tokens]
    stats = LayerStats(model.layers, 5, Dist())
    stats.begin(10)

    def agree(norm, loss, z):
        stats.gradients(1.0)
        return True, False

    optimizer_step(model, model, optimizer, batches, StepSettings(accum_steps=2, grad_clip=0.0), agree=agree,
                   after_update=stats.updated)
    row = stats.finish()
    squares, count = torch.zeros(4), 0
    for x, y in batches:  # the forward by hand, block by block
        h = reference.tok_embeddings(x)
        for i, block in enumerate(reference.layers):
            h = block(h, reference.rope[:32], 0, None)
            squares[i] += h.pow(2).sum()
        count += h.numel()
        (reference(x, y) / 2).backward()
    for i, (block, after) in enumerate(zip(reference.layers, model.layers)):
        grad = torch.cat([p.grad.flatten() for p in block.parameters()]).norm()
        weight = torch.cat([p.detach().flatten() for p in block.parameters()])
        update = torch.cat([p.detach().flatten() for p in after.parameters()]) - weight
        assert row["layer_grad_norm"][i] == pytest.approx(grad.item(), rel=1e-5)
        assert row["layer_param_norm"][i] == pytest.approx(weight.norm().item(), rel=1e-5)
        assert row["layer_update_ratio"][i] == pytest.approx((update.norm() / weight.norm()).item(), rel=1e-4)
        assert row["layer_act_rms"][i] == pytest.approx((squares[i] / count).sqrt().item(), rel=1e-5)


def test_layer_stats_are_only_taken_on_their_steps():
    """Off the interval, begin/gradients/finish record nothing and the hooks do no work."""
    model = make_tiny_model(max_seq_len=32).train()
    stats = LayerStats(model.layers, 5, Dist())
    stats.begin(7)
    model(torch.zeros(1, 8, dtype=torch.long))
    stats.gradients(1.0)
    assert stats.finish() == {} and stats.activations is None


def test_spike_forensics_name_the_layer_of_an_injected_gradient_jump(tmp_path, small, monkeypatch):
    """Block 2's gradient multiplied by 1000 at the spiking step 11: its forensics file names block 2."""
    calls = []
    clip = parallel.clip_grad_norm

    def jump_at_step_11(parameters, max_norm):
        parameters = list(parameters)
        calls.append(1)
        if len(calls) == 11:
            model_params = {id(p) for p in jumped.layers[2].parameters()}
            for p in parameters:
                if id(p) in model_params and p.grad is not None:
                    p.grad *= 1000
        return clip(parameters, max_norm)

    jumped = None
    build = train_llama.build_model

    def keep_model(*args, **kwargs):
        nonlocal jumped
        jumped = build(*args, **kwargs)
        return jumped

    monkeypatch.setattr(train_llama, "build_model", keep_model)
    monkeypatch.setattr(train_llama.parallel, "clip_grad_norm", jump_at_step_11)
    train_small(small, tmp_path, "spiky", "--on_spike=skip", "--layer_stats_interval=2")
    [event] = events(tmp_path)
    report = json.loads(Path(event["forensics"]).read_text())
    assert event["step"] == 11 and report["gradient_jump"]["layer"] == 2
    assert report["gradient_jump"]["ratio"] > 100
    rows = [r for r in metric_rows(tmp_path) if "layer_grad_norm" in r]
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12, 14] and len(rows[0]["layer_grad_norm"]) == 4


def test_layer_stats_heatmap_is_in_the_metrics_plot(tmp_path):
    """metrics.plot draws the per-block rows as heatmaps without error."""
    rows = [{"step": s, "loss": 3.0, "layer_grad_norm": [1.0, 2.0, 3.0], "layer_update_ratio": [1e-3] * 3}
            for s in (10, 20, 30)]
    metrics.plot(rows, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0
