"""The LLaMa model: preset shapes, loss, generation, RoPE, init and input checks (CPU)."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_model
from model import ModelConfig, Transformer, apply_rope, build_model, chunked_cross_entropy, model_config, rope_table


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    return make_tiny_model(seed, **overrides).train()


def test_1p7b_preset_on_meta_has_paper_shapes_and_parameter_count():
    """`1p7b` builds on the meta device (no storage, no initialization) with the paper's shapes and
    1,716,144,128 parameters."""
    with torch.device("meta"):
        model = Transformer(model_config("1p7b"))
    assert all(p.is_meta for p in model.parameters())
    cfg = model.config
    assert (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim) == (36, 2048, 32, 8, 5120)
    assert (cfg.vocab_size, cfg.max_seq_len, cfg.rope_theta, cfg.norm_eps) == (50304, 1024, 500000.0, 1e-5)
    assert model.num_params() == 1_716_144_128
    assert len(model.layers) == 36
    attention, ffn = model.layers[0].attention, model.layers[0].feed_forward
    assert attention.wq.weight.shape == (2048, 2048)
    assert attention.wk.weight.shape == attention.wv.weight.shape == (8 * 64, 2048)
    assert ffn.w1.weight.shape == ffn.w3.weight.shape == (5120, 2048)
    assert ffn.w2.weight.shape == (2048, 5120)
    assert model.tok_embeddings.weight.shape == model.output.weight.shape == (50304, 2048)
    assert model.output.weight is not model.tok_embeddings.weight  # untied


def test_loss_at_init_is_near_log_vocab():
    """At init the predictions are near uniform: loss within 0.2 of ln(50304)."""
    model = tiny_model()
    idx = torch.randint(0, 50304, (4, 64))
    targets = torch.randint(0, 50304, (4, 64))
    loss = model(idx, targets)
    assert abs(loss.item() - math.log(50304)) < 0.2


def test_tiny_model_overfits_one_batch():
    """Training on one fixed batch drives the loss below 0.5."""
    model = tiny_model(vocab_size=256)
    data = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(1))
    idx, targets = data[:, :-1], data[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # matrices this small gain nothing from threads, which stall on a busy machine
    try:
        for _ in range(60):
            loss = model(idx, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    assert loss.item() < 0.5


def test_greedy_generation_with_kv_cache_equals_without():
    """Greedy decoding with the KV cache gives the same tokens as recomputing the whole prefix."""
    model = tiny_model(vocab_size=512, init_std=0.2).eval()  # larger weights: no near-ties
    prompt = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(2))
    cached = model.generate(prompt, 24, temperature=0.0, use_cache=True)
    uncached = model.generate(prompt, 24, temperature=0.0, use_cache=False)
    assert cached.shape == (2, 31)
    assert torch.equal(cached, uncached)
    assert all(layer.attention.cache is None for layer in model.layers)  # freed afterwards


def test_seeded_sampling_is_reproducible():
    """Sampling with equal generator seeds gives equal tokens, different seeds different ones."""
    model = tiny_model(vocab_size=512).eval()
    prompt = torch.zeros(2, 3, dtype=torch.long)

    def sample(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return model.generate(prompt, 20, temperature=1.0, top_k=100, generator=generator)

    assert torch.equal(sample(3), sample(3))
    assert not torch.equal(sample(3), sample(4))


def test_chunked_loss_and_gradients_equal_full_cross_entropy():
    """The chunked loss and its gradients equal F.cross_entropy on full float32 logits, with
    ignored (-1) rows and a chunk size that does not divide the rows."""
    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(101, 16, requires_grad=True)
    targets = torch.randint(0, 101, (37,))
    targets[[0, 5, 36]] = -1
    (2.5 * chunked_cross_entropy(h, weight, targets, chunk=8)).backward()
    loss, grad_h, grad_w = chunked_cross_entropy(h, weight, targets, chunk=8), h.grad, weight.grad

    h_ref, w_ref = h.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    ref = F.cross_entropy(h_ref @ w_ref.t(), targets, ignore_index=-1)
    (2.5 * ref).backward()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(grad_h, h_ref.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(grad_w, w_ref.grad, atol=1e-5, rtol=0)


def test_chunked_loss_refuses_a_second_backward_instead_of_scaling_twice():
    """The weight gradient is scaled in place in backward: a second backward through the same loss
    (retain_graph) is an error, never a silently doubled scale; one chunk or several."""
    for chunk in (8, 64):
        torch.manual_seed(0)
        h = torch.randn(37, 16, requires_grad=True)
        weight = torch.randn(101, 16, requires_grad=True)
        loss = chunked_cross_entropy(h, weight, torch.randint(0, 101, (37,)), chunk=chunk)
        (3 * loss).backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


def test_chunked_loss_under_bf16_autocast_is_close_with_float32_gradients():
    """Under bf16 autocast (the training path) the loss stays close to float32 and the
    gradients keep the parameters' dtype."""
    torch.manual_seed(0)
    h = torch.randn(50, 32, requires_grad=True)
    weight = (0.1 * torch.randn(200, 32)).requires_grad_()
    targets = torch.randint(0, 200, (50,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_cross_entropy(h, weight, targets, chunk=16)
    loss.backward()
    ref = F.cross_entropy(h.detach() @ weight.detach().t(), targets)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) < 2e-2
    assert h.grad.dtype == weight.grad.dtype == torch.float32


def test_model_loss_equals_cross_entropy_of_its_logits():
    """forward(idx, targets) returns the cross-entropy of forward(idx)'s logits."""
    model = tiny_model(vocab_size=300, loss_chunk_size=50)  # 2 * 40 rows: chunks do not divide
    idx = torch.randint(0, 300, (2, 40))
    targets = torch.randint(0, 300, (2, 40))
    targets[:, :3] = -1
    logits = model(idx)
    loss = model(idx, targets)
    assert logits.shape == (2, 40, 300) and loss.dim() == 0
    ref = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=0)


def test_loss_under_no_grad_computes_no_gradients():
    """Under no_grad (evaluation) the chunked loss skips the gradient work."""
    h = torch.randn(10, 8, requires_grad=True)
    weight = torch.randn(20, 8, requires_grad=True)
    targets = torch.randint(0, 20, (10,))
    with torch.no_grad(), torch.profiler.profile() as prof:
        loss = chunked_cross_entropy(h, weight, targets, chunk=4)
    assert not loss.requires_grad
    assert "aten::scatter_add_" not in {event.name for event in prof.events()}


def test_rope_score_depends_only_on_position_difference():
    """With RoPE, q at position m dotted with k at position n depends only on m - n."""
    torch.manual_seed(0)
    head_dim, T = 16, 48
    rope = rope_table(head_dim, T, theta=10000.0)
    q = apply_rope(torch.randn(head_dim).expand(1, T, 1, head_dim), rope)[0, :, 0]  # (T, head_dim)
    k = apply_rope(torch.randn(head_dim).expand(1, T, 1, head_dim), rope)[0, :, 0]
    scores = q @ k.t()  # scores[m, n]
    for shift in (1, 5, 20):
        torch.testing.assert_close(scores[shift:, shift:], scores[:-shift, :-shift], atol=1e-4, rtol=0)
    assert not torch.allclose(scores[0, 1], scores[0, 2])  # and it does depend on the difference


@pytest.mark.parametrize(
    "overrides, words",
    [
        (dict(dim=100, n_heads=3, n_kv_heads=1), ["dim=100", "n_heads=3"]),
        (dict(n_heads=4, n_kv_heads=3), ["n_heads=4", "n_kv_heads=3"]),
        (dict(dim=12, n_heads=4, n_kv_heads=2), ["head_dim=3"]),
    ],
)
def test_bad_config_raises_value_error_naming_values(overrides, words):
    """Inconsistent head counts or an odd head dim fail at config time, naming the values."""
    with pytest.raises(ValueError) as err:
        model_config("1p7b", **overrides)
    assert all(word in str(err.value) for word in words)


@pytest.mark.parametrize(
    "length, bad_id, words",
    [(257, 0, ["257", "max_seq_len=256"]), (8, 512, ["512", "512)"]), (8, -1, ["-1"])],
)
def test_bad_input_raises_value_error_before_any_work(length, bad_id, words):
    """An input longer than max_seq_len or with an id outside the vocabulary fails before the
    embedding runs, naming the values."""
    model = tiny_model(vocab_size=512)
    embedded = []
    model.tok_embeddings.register_forward_hook(lambda *args: embedded.append(True))
    idx = torch.zeros(1, length, dtype=torch.long)
    idx[0, -1] = bad_id
    with pytest.raises(ValueError) as err:
        model(idx)
    assert all(word in str(err.value) for word in words)
    assert not embedded


def test_generate_too_long_raises_before_allocating_cache():
    """generate() refuses prompt + new tokens beyond max_seq_len before building a KV cache."""
    model = tiny_model(vocab_size=512)
    with pytest.raises(ValueError, match="max_seq_len=256"):
        model.generate(torch.zeros(1, 250, dtype=torch.long), 10)
    assert all(layer.attention.cache is None for layer in model.layers)


def test_unknown_preset_names_choices():
    """An unknown preset name lists the valid ones."""
    with pytest.raises(ValueError, match="1p7b"):
        model_config("7b")


@pytest.mark.parametrize("depth_scaled", [False, True])
def test_depth_scaled_init_scales_output_projections(depth_scaled):
    """depth_scaled_init scales the std of wo and w2 by 1/sqrt(2 * n_layers), and only theirs."""
    cfg = ModelConfig(vocab_size=64, n_layers=8, dim=256, n_heads=4, n_kv_heads=4, ffn_dim=512,
                      max_seq_len=16, depth_scaled_init=depth_scaled)
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights()
    scaled = 0.02 / math.sqrt(2 * 8) if depth_scaled else 0.02
    block = model.layers[3]
    assert block.attention.wo.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert block.feed_forward.w2.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert block.attention.wq.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert block.feed_forward.w1.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.equal(block.ffn_norm.weight, torch.ones(256))


def test_meta_build_then_to_empty_and_init_weights_gives_working_model():
    """build_model: meta build -> to_empty -> init_weights fills every parameter and the RoPE buffer."""
    cfg = model_config("tiny", vocab_size=512)
    torch.manual_seed(0)
    model = build_model(cfg)
    assert torch.equal(model.rope, rope_table(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    loss = model(torch.randint(0, 512, (2, 16)), torch.randint(0, 512, (2, 16)))
    assert abs(loss.item() - math.log(512)) < 0.2


def test_build_model_from_a_state_dict_equals_the_source_model():
    """build_model(cfg, state_dict=...) assigns the tensors and computes the RoPE table."""
    source = tiny_model(vocab_size=512)
    copy = build_model(source.config, state_dict={k: v.clone() for k, v in source.state_dict().items()})
    idx = torch.randint(0, 512, (2, 16))
    assert torch.equal(copy(idx), source(idx))


def test_config_differences_can_ignore_the_fields_that_do_not_change_the_weights():
    """differences(weights_only=True) ignores max_seq_len, init and loss chunking, not shapes."""
    cfg = model_config("tiny")
    runtime_only = model_config("tiny", max_seq_len=64, init_std=0.1, loss_chunk_size=7)
    assert cfg.differences(runtime_only, weights_only=True) == []
    assert len(cfg.differences(runtime_only)) == 3
    assert cfg.differences(model_config("tiny", n_kv_heads=4), weights_only=True) == ["n_kv_heads: 2 vs 4"]


def test_config_refuses_non_positive_sizes():
    """A zero or negative size is a ValueError naming the field."""
    with pytest.raises(ValueError, match="n_layers must be positive"):
        model_config("tiny", n_layers=0)


def test_compiled_forward_has_no_graph_break_with_a_symbolic_length():
    """A symbolic sequence length (dynamo's choice after a second shape) compiles without a break."""
    torch.manual_seed(0)
    model = Transformer(model_config("tiny", vocab_size=256))
    model.init_weights()
    x = torch.randint(0, 256, (2, 24))
    torch._dynamo.mark_dynamic(x, 1)
    explanation = torch._dynamo.explain(model)(x)  # the logits path that evaluation compiles
    assert explanation.graph_break_count == 0, explanation.break_reasons
