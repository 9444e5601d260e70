"""CPU stand-ins for the CUDA training path: the compiled loss traces as one graph under bf16
autocast, and DDP around the compiled model (torchrun, gloo) trains the same losses as eager."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from conftest import make_tiny_model

ROOT = Path(__file__).resolve().parent.parent
SEQ = 32


@pytest.mark.parametrize("grad", [True, False], ids=["train", "validation"])
def test_compiled_loss_is_one_graph_under_bf16_autocast(grad):
    """The forward with targets compiles with fullgraph=True under CPU bf16 autocast (the chunked
    loss's autocast branch is traced, not broken out), and matches eager, gradients included."""
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
    assert torch.allclose(loss_c, loss_e, atol=1e-3), (loss_c, loss_e)
    for g_c, g_e in zip(grads_c, grads_e, strict=True):
        if grad:
            assert torch.allclose(g_c, g_e, rtol=1e-2, atol=1e-5)
        else:
            assert g_c is None and g_e is None


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Random-token shards under the reference names: a val shard and two train shards."""
    path = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    for i, split in enumerate(["val", "train", "train"]):
        np.save(path / f"edufineweb_{split}_{i:06d}.npy", rng.integers(0, 50257, size=20_000, dtype=np.uint16))
    return path


def train(out_dir: Path, data_dir: Path, *extra: str, nproc: int = 1, env: dict | None = None):
    """train_llama.py on the tiny model for 3 steps of 8 x 32 tokens; returns (step -> loss, stderr)."""
    args = ["--config", str(ROOT / "configs" / "tiny.py"), "--prepare_local_data=false", f"--seq_len={SEQ}",
            f"--total_batch_tokens={8 * SEQ}", "--micro_batch=2", "--max_steps=3", "--warmup_steps=2",
            "--eval_interval=0", "--sample_interval=0", "--save_interval=0", "--device=cpu",
            f"--data_dir={data_dir}", f"--out_dir={out_dir}", *extra]
    launcher = ([sys.executable] if nproc == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"])
    proc = subprocess.run([*launcher, str(ROOT / "train_llama.py"), *args], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}, proc.stderr


def test_ddp_compiled_on_two_gloo_processes_matches_eager(tmp_path, data_dir):
    """torchrun with 2 gloo processes, DDP around the inductor-compiled model: the losses of one
    eager process to 1e-4, and no graph break."""
    eager, _ = train(tmp_path / "eager", data_dir)
    cache = tmp_path / "inductor_cache"
    compiled, stderr = train(tmp_path / "ddp", data_dir, "--compile_cpu=true", nproc=2,
                             env={"TORCHINDUCTOR_CACHE_DIR": str(cache), "TORCH_LOGS": "graph_breaks"})
    assert any(cache.rglob("*.py")), "inductor compiled nothing: the run was not compiled"
    assert "graph break" not in stderr.lower(), stderr[-3000:]
    assert sorted(compiled) == sorted(eager) == [1, 2, 3]
    for step in eager:
        assert abs(compiled[step] - eager[step]) <= 1e-4, (step, compiled[step], eager[step])
