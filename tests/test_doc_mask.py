"""--doc_mask: a packed sequence attends within each document only, exactly as if each document
were run alone (logits, loss, gradients), eager and compiled, both forms of the mask."""

import pytest
import torch

from conftest import make_tiny_model
from llama_fineweb.doc_mask import document_ids, document_mask
from llama_fineweb.tokenizer import EOT
from runs import assert_close, grad_norms, losses, metric_rows, run, run_here

SEQ = 32
VOCAB, TEST_EOT = 512, 500  # a small vocabulary keeps the output layer cheap; its EOT stands for 50256
# Each row: the tail of a document cut by the window (no EOT), then whole documents ([EOT] + text).
LAYOUTS = [[3, 7, 10, 12], [9, 1, 16, 6]]


def packed_batch() -> tuple[torch.Tensor, torch.Tensor, list[list[tuple[int, int]]]]:
    """x, y: (2, SEQ) packed rows; each row's document spans [start, end)."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, TEST_EOT, (len(LAYOUTS), SEQ + 1), generator=g)
    spans = []
    for row, lengths in enumerate(LAYOUTS):
        starts = [sum(lengths[:i]) for i in range(len(lengths))]
        tokens[row, starts[1:]] = TEST_EOT
        spans.append(list(zip(starts, starts[1:] + [SEQ])))
    tokens[:, SEQ] = TEST_EOT  # the next window's document begins: the last token's target
    return tokens[:, :-1], tokens[:, 1:], spans


def alone(model, x, y, spans):
    """Logits of each document run by itself, pasted together, and the loss and gradients of the
    whole batch computed that way (each document's mean loss weighted by its tokens)."""
    model.zero_grad(set_to_none=True)
    logits = torch.cat([torch.cat([model(x[r:r + 1, a:b]) for a, b in row], dim=1) for r, row in enumerate(spans)])
    loss = sum(model(x[r:r + 1, a:b], y[r:r + 1, a:b]) * (b - a) for r, row in enumerate(spans) for a, b in row)
    loss = loss / y.numel()
    loss.backward()
    return logits.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def packed(fn, model, x, y, mask, grad: bool = True):
    model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(grad):
        logits = fn(x, mask=mask)
        loss = fn(x, y, mask=mask)
        if grad:
            loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()} if grad else None
    return logits.detach(), loss.detach(), grads


def assert_same(got, want, tol: float = 1e-5) -> None:
    (logits, loss, grads), (logits_ref, loss_ref, grads_ref) = got, want
    assert (logits - logits_ref).abs().max() <= tol
    assert (loss - loss_ref).abs() <= tol
    if grads is not None:
        for name, g in grads.items():
            assert (g - grads_ref[name]).abs().max() <= tol, name


def test_document_ids_start_at_each_eot():
    """Tokens before the first EOT are document 0; each EOT opens the next."""
    x = torch.tensor([[5, EOT, 7, 8, EOT, EOT, 9]])
    assert document_ids(x).tolist() == [[0, 1, 1, 1, 2, 3, 3]]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_dense_mask_equals_documents_alone(compiled):
    """The CPU's form (boolean mask through SDPA): logits, loss and gradients of each document alone,
    to 1e-5 in float32; also through torch.compile (dynamo and AOTAutograd, one graph)."""
    model = make_tiny_model(max_seq_len=SEQ, vocab_size=VOCAB).train()
    x, y, spans = packed_batch()
    want = alone(model, x, y, spans)
    torch._dynamo.reset()
    fn = torch.compile(model, fullgraph=True, backend="aot_eager") if compiled else model
    assert_same(packed(fn, model, x, y, document_mask(x, flex=False, eot=TEST_EOT)), want)
    plain = packed(model, model, x, y, None)
    assert (plain[0] - want[0]).abs().max() > 1e-3, "without the mask documents do see each other"


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_flex_block_mask_equals_documents_alone(compiled):
    """The CUDA form (flex_attention BlockMask), forward only (flex_attention has no CPU backward):
    logits and loss of each document alone, eager and compiled (aot_eager: inductor's CPU flex
    kernel takes minutes to build; benchmarks/gpu_check.py's doc_mask row runs the CUDA one)."""
    model = make_tiny_model(max_seq_len=SEQ, vocab_size=VOCAB).eval()
    x, y, spans = packed_batch()
    want = alone(model, x, y, spans)
    torch._dynamo.reset()
    fn = torch.compile(model, fullgraph=True, backend="aot_eager") if compiled else model
    assert_same(packed(fn, model, x, y, document_mask(x, flex=True, eot=TEST_EOT), grad=False), (*want[:2], None))


@pytest.fixture(scope="module")
def documents_dir(tmp_path_factory):
    """Shards of short documents ([EOT] + 5 to 20 tokens each), so every window holds several."""
    import numpy as np

    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("documents")
    for i, split in enumerate(["val", "train"]):
        docs = [np.concatenate([[EOT], rng.integers(0, EOT, size=rng.integers(5, 21))]) for _ in range(800)]
        np.save(path / f"edufineweb_{split}_{i:06d}.npy", np.concatenate(docs).astype(np.uint16))
    return path


def test_training_with_doc_mask_changes_training_not_validation(tmp_path, documents_dir):
    """train_llama.py --doc_mask=true: the first step's loss differs from the plain run's, the
    validation loss before any update does not."""
    rows = {}
    for flag in ("false", "true"):
        out = tmp_path / flag
        run_here(out, documents_dir, f"--doc_mask={flag}", "--max_steps=1", "--eval_interval=1", "--val_sequences=4")
        rows[flag] = metric_rows(out)
    (val_plain, val_masked), (loss_plain, loss_masked) = (
        [next(r[key] for r in rows[flag] if key in r and r["step"] == step) for flag in ("false", "true")]
        for key, step in (("val_loss", 0), ("loss", 1)))
    assert val_plain == val_masked
    assert abs(loss_plain - loss_masked) > 1e-4


def test_doc_mask_under_fsdp_on_two_processes_matches_one(tmp_path, documents_dir):
    """--doc_mask through FSDP2 on two gloo processes (the mask passed through the wrapper, each rank
    its own rows) trains the one-process run's losses to 1e-5, its gradient norms to 2e-4."""
    args = ["--doc_mask=true", "--max_steps=3"]
    run_here(tmp_path / "one", documents_dir, *args)
    run(tmp_path / "fsdp", documents_dir, *args, "--parallel=fsdp", nproc=2)
    assert_close(losses(tmp_path / "fsdp"), losses(tmp_path / "one"), 1e-5)
    assert_close(grad_norms(tmp_path / "fsdp"), grad_norms(tmp_path / "one"), 2e-4)
