"""llama_fineweb.step.optimizer_step, the one training step that training and benchmarks/gpu_check.py
take, and the attention backend it runs under (--sdpa_backend)."""

import copy

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from conftest import make_tiny_model
from runs import refusal
from llama_fineweb.stability import LossScaler
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


def full_batch_norm(model, tokens: torch.Tensor) -> float:
    """The gradient norm of a plain float32 backward of the mean loss over all of `tokens`."""
    model = copy.deepcopy(model)
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    return torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()


@pytest.mark.parametrize("accum_steps,float16", [(1, False), (2, False), (4, False), (2, True)],
                         ids=["1", "2", "4", "2-float16"])
def test_step_norm_is_the_full_batch_gradient_norm(accum_steps, float16):
    """optimizer_step's pre-clip norm, over 4 sequences in accum_steps micro-batches, is the norm of
    one full-batch float32 backward (a scaled or unaccumulated gradient is not): to 1e-5, and to
    1e-2 under float16 autocast with the loss scaled by 2^16 and unscaled before the norm."""
    model = make_tiny_model(max_seq_len=SEQ).train()
    tokens = torch.randint(0, 50257, (4, SEQ + 1), generator=torch.Generator().manual_seed(1))
    reference = full_batch_norm(model, tokens)
    batches = [(t[:, :-1], t[:, 1:]) for t in tokens.chunk(accum_steps)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    settings = StepSettings(accum_steps=accum_steps, autocast_dtype=torch.float16 if float16 else None,
                            device_type="cpu")
    _, norm, applied, _ = optimizer_step(model, model, optimizer, batches, settings,
                                         scaler=LossScaler(enabled=float16))
    assert applied and norm.item() == pytest.approx(reference, rel=1e-2 if float16 else 1e-5)


@pytest.mark.parametrize("grad_clip", [0.0, 1e-3])
def test_update_is_as_large_as_clipping_allows(grad_clip):
    """Plain SGD at lr 1 through optimizer_step: the update's norm is the gradient norm, or grad_clip
    where that is smaller, and the gradients are freed after the step."""
    model = make_tiny_model(max_seq_len=SEQ).train()
    tokens = torch.randint(0, 50257, (4, SEQ + 1), generator=torch.Generator().manual_seed(2))
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    batches = [(t[:, :-1], t[:, 1:]) for t in tokens.chunk(2)]
    _, norm, _, _ = optimizer_step(model, model, optimizer, batches, StepSettings(accum_steps=2, grad_clip=grad_clip))
    update = torch.nn.utils.get_total_norm([p.detach() - b for p, b in zip(model.parameters(), before)])
    assert update.item() == pytest.approx(grad_clip or norm.item(), rel=1e-3)
    assert norm.item() > 10 * 1e-3 and all(p.grad is None for p in model.parameters())
