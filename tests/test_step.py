"""llama_fineweb.step.optimizer_step, the one training step that training and benchmarks/gpu_check.py
take, and the attention backend it runs under (--sdpa_backend)."""

import torch
from torch.profiler import ProfilerActivity, profile

from conftest import make_tiny_model
from runs import refusal
from llama_fineweb.step import StepSettings, optimizer_step

SEQ = 32


def attention_ops(sdpa_backend: str) -> set[str]:
    """The SDPA kernels (aten ops) one optimizer step of the tiny model ran under sdpa_backend."""
    model = make_tiny_model(max_seq_len=SEQ).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 50257, (2, 2, SEQ + 1), generator=torch.Generator().manual_seed(0))
    batches = [(t[:, :-1], t[:, 1:]) for t in tokens]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss, norm, applied, stop = optimizer_step(model, model, optimizer, batches,
                                                   StepSettings(accum_steps=2, sdpa_backend=sdpa_backend))
    assert applied and not stop and torch.isfinite(loss) and norm > 0
    return {e.key for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot_product")}


def test_sdpa_backend_chooses_the_attention_kernel_of_the_step():
    """--sdpa_backend reaches the model's attention from the step: on the CPU "auto" runs SDPA's
    flash kernel, "math" the math one only."""
    assert any("flash" in op for op in attention_ops("auto"))
    math_ops = attention_ops("math")
    assert math_ops and all("math" in op for op in math_ops), math_ops


def test_unknown_sdpa_backend_is_a_one_line_error(tmp_path, data_dir):
    """A backend SDPA does not have: one line naming the choices, exit 2."""
    line = refusal(tmp_path, data_dir, "--sdpa_backend=fast")
    assert "--sdpa_backend='fast': choose one of auto, flash, cudnn, efficient, math" in line
