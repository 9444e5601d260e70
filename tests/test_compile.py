"""CPU stand-ins for the CUDA training path: the compiled loss traces as one graph under bf16
autocast, and DDP around the compiled model (torchrun, gloo) trains the same losses as eager."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from conftest import make_tiny_model
from runs import metric_rows, run

SEQ = 32


@pytest.mark.parametrize("grad", [True, False], ids=["train", "validation"])
def test_compiled_loss_is_one_graph_under_bf16_autocast(grad):
    """The forward with targets compiles with fullgraph=True under CPU bf16 autocast (the chunked
    loss's autocast branch is traced, not broken out), and matches eager, gradients included, to
    1e-6: aot_eager runs the same ops in the same order (the difference measured is 0), so the
    float32 branch traced by mistake (1e-3 away) fails."""
    torch._dynamo.reset()
    counters.clear()
    model = make_tiny_model(max_seq_len=SEQ).train()
    tokens = torch.randint(0, 50257, (2, SEQ + 1), generator=torch.Generator().manual_seed(0))
    x, y = tokens[:, :-1], tokens[:, 1:]
    # aot_eager traces what inductor would (dynamo and AOTAutograd, backward included) without a
    # C++ build; fullgraph=True turns any graph break into an error.
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, model):
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn(x, y)
        if grad:
            loss.backward()
        results.append((loss.detach(), model.output.weight.grad, model.layers[0].attention.wq.weight.grad))
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == 1
    (loss_c, *grads_c), (loss_e, *grads_e) = results
    assert torch.allclose(loss_c, loss_e, rtol=0, atol=1e-6), (loss_c, loss_e)
    for g_c, g_e in zip(grads_c, grads_e, strict=True):
        if grad:
            assert torch.allclose(g_c, g_e, rtol=0, atol=1e-6)
        else:
            assert g_c is None and g_e is None


def train(out_dir: Path, data_dir: Path, *extra: str, nproc: int = 1, env: dict | None = None):
    """train_llama.py on the tiny model for 3 steps of 8 x 32 tokens; returns (metrics.jsonl rows, process)."""
    proc = run(out_dir, data_dir, "--max_steps=3", "--warmup_steps=2", *extra, nproc=nproc, timeout=600, env=env)
    return metric_rows(out_dir), proc


def test_ddp_compiled_on_two_gloo_processes_matches_eager(tmp_path, data_dir):
    """torchrun with 2 gloo processes, DDP around the inductor-compiled model, validating and
    sampling at step 3: the losses, gradient norms and validation loss of one eager process to
    1e-4, a sample, and no graph break."""
    evaluate = ["--eval_interval=3", "--val_sequences=6", "--sample_interval=3", "--sample_tokens=8"]
    eager, _ = train(tmp_path / "eager", data_dir, *evaluate)
    cache = tmp_path / "inductor_cache"
    compiled, proc = train(tmp_path / "ddp", data_dir, "--compile_cpu=true", *evaluate, nproc=2,
                           env={"TORCHINDUCTOR_CACHE_DIR": str(cache), "TORCH_LOGS": "graph_breaks"})
    assert any(cache.rglob("*.py")), "inductor compiled nothing: the run was not compiled"
    assert "graph break" not in proc.stderr.lower(), proc.stderr[-3000:]
    assert "compile model | ddp" in proc.stdout and "step 3: sample: " in proc.stdout
    for key in ("loss", "grad_norm", "val_loss"):
        e, c = ({r["step"]: r[key] for r in rows if key in r} for rows in (eager, compiled))
        assert sorted(c) == sorted(e) == ([0, 3] if key == "val_loss" else [1, 2, 3])
        for step in e:
            assert abs(c[step] - e[step]) <= 1e-4, (key, step, c[step], e[step])
    assert any(r["step"] == 3 and "sample_s" in r for r in compiled)


def test_configure_compiler_in_a_fresh_interpreter():
    """parallel.configure_compiler sets torch._functorch.config and torch._dynamo.config options in
    a fresh interpreter that imported nothing else of torch's (it imports those modules itself)."""
    code = ("import torch; from llama_fineweb import parallel; "
            "from llama_fineweb.train_config import TrainConfig; "
            "parallel.configure_compiler(TrainConfig(seq_len=2048)); "
            "print(torch._functorch.config.backward_pass_autocast, torch._dynamo.config.recompile_limit)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["off", str(8 + 2 * 2048 // 64)]


def test_fsdp_compiles_every_block_and_skips_no_frame(tmp_path):
    """Under FSDP (one gloo process), --compile_mode=model compiles per block, as the setup line
    says: dynamo skips no frame, breaks no graph, and builds one graph, the block's, which every
    block runs (Transformer.forward, which FSDP's hooks would make dynamo skip, is not compiled)."""
    import torch.distributed as dist
    from torch._dynamo.utils import clear_compilation_metrics, get_compilation_metrics

    from llama_fineweb import parallel
    from llama_fineweb.train_config import TrainConfig
    from llama_fineweb.utils import Dist
    from model import TransformerBlock

    torch._dynamo.reset()
    counters.clear()
    clear_compilation_metrics()  # earlier tests' compilations stay listed otherwise
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        cfg = TrainConfig(seq_len=SEQ, parallel="fsdp", compile_cpu=True, compile_mode="model")
        d = Dist(0, 0, 1, torch.device("cpu"))
        model = make_tiny_model(max_seq_len=SEQ).train()
        train_model, _ = parallel.parallelize(model, cfg, d, backend="eager")
        said = parallel.compile_mode(cfg, d)  # what train_llama's setup line prints
        tokens = torch.randint(0, 50257, (2, SEQ + 1), generator=torch.Generator().manual_seed(0))
        for _ in range(2):
            train_model(tokens[:, :-1], tokens[:, 1:]).backward()
    finally:
        dist.destroy_process_group()
    frames = counters["frames"]
    assert frames["total"] == frames["ok"] > 0, dict(frames)  # a skipped frame counts in total only
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1
    code = TransformerBlock.forward.__code__
    assert {(m.co_name, m.co_firstlineno) for m in get_compilation_metrics()} == {(code.co_name, code.co_firstlineno)}
    assert all(block._compiled_call_impl is not None for block in model.layers)
    assert said == "blocks" and parallel.is_sharded(model)
