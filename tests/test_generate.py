"""Fast generation: the compiled decode over a static KV cache gives the eager decode's tokens, from
one graph for every token and prompt; benchmarks/bench_generate.py runs."""

import sys
from pathlib import Path

import torch
from torch._dynamo.utils import counters

import chat
from conftest import make_tiny_model
from llama_fineweb.tokenizer import get_encoding

ROOT = Path(__file__).resolve().parent.parent


def test_compiled_decode_equals_eager_decode_token_for_token():
    """Greedy and seeded sampling, two prompt lengths, model.generate and chat's stream: the
    inductor-compiled decode picks the eager decode's tokens; one graph, never recompiled."""
    model = make_tiny_model(n_layers=2, max_seq_len=64)
    ids = get_encoding().encode_ordinary("The capital of France is Paris, and the capital of Italy is")
    idx = torch.tensor([ids])
    torch._dynamo.reset()
    counters.clear()
    eager = model.generate(idx, 12, temperature=0)
    assert torch.equal(eager, model.generate(idx, 12, temperature=0, use_cache=False))
    assert torch.equal(model.generate(idx, 12, temperature=0, compile=True), eager)
    with torch._dynamo.config.patch(error_on_recompile=True):
        short = idx[:, :5]
        assert torch.equal(model.generate(short, 20, temperature=0, compile=True),
                           model.generate(short, 20, temperature=0))
        sampled = [model.generate(idx, 10, temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(1),
                                  compile=c) for c in (False, True)]
        assert torch.equal(*sampled)
        streamed = [list(chat.stream_tokens(model, ids[:7], 10, stop=None, compile=c)) for c in (False, True)]
        assert streamed[0] == streamed[1]
    assert counters["stats"]["unique_graphs"] == 1


def test_bench_generate_runs_on_the_tiny_model():
    """benchmarks/bench_generate.py (smoke, dynamo's eager backend: no C++ build): every way
    produces the eager decode's greedy tokens, transformers' generate on our export included."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_generate

    result = bench_generate.main(["--model=tiny", "--backend=eager", "--prompt_tokens=8", "--new_tokens=6",
                                  "--repeats=1", "--device=cpu"])
    assert result["match"] == {"ours_eager": True, "ours_compiled": True, "transformers": True}
    assert set(result["tokens_per_s"]) == {"ours_eager", "ours_compiled", "transformers"}


def test_eager_decode_attends_only_to_the_filled_part_of_the_cache():
    """With every cache slot poisoned (NaN) before decoding, the eager decode still gives the full
    forward's last-position logits at every step and generate the uncached tokens: the slots not
    yet written are never read."""
    model = make_tiny_model(n_layers=2, max_seq_len=64)
    idx = torch.tensor([get_encoding().encode_ordinary("The capital of France is Paris, and")])
    T, n = idx.size(1), 8

    def poison():
        model.setup_cache(1, T + n)
        for layer in model.layers:
            layer.attention.cache.k.fill_(float("nan"))
            layer.attention.cache.v.fill_(float("nan"))

    expected = model.generate(idx, n, temperature=0, use_cache=False)
    poison()  # generate keeps a cache of the shape it needs
    assert torch.equal(model.generate(idx, n, temperature=0), expected)
    poison()
    with torch.no_grad():
        logits = model.step(idx, 0)
        for i in range(n):
            full = model(expected[:, : T + i])[:, -1, :]
            torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)
            logits = model.step(expected[:, T + i : T + i + 1], T + i)
    model.clear_cache()


def test_benchmark_verdict_names_no_winner_when_the_spread_exceeds_the_difference():
    """benchmarks/compare.py: medians 1.00 vs 1.05 s with a 0.2 s spread name no winner; with tight
    times the faster way is named."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from compare import summary, verdict

    noisy, other = summary([0.9, 1.0, 1.1]), summary([1.05, 1.05, 1.05])
    assert verdict("ours", noisy, "theirs", other).startswith("no winner")
    tight, slow = summary([1.0, 1.0, 1.01]), summary([1.2, 1.21, 1.2])
    assert verdict("ours", tight, "theirs", slow).startswith("ours faster than theirs")
    assert verdict("theirs", slow, "ours", tight).startswith("ours faster than theirs")


def test_compiled_decode_cache_is_sized_to_the_request():
    """The compiled decode's cache is the request's length rounded up to a power of two from 64, not
    the model's whole context: one graph per such length (two requests of one length: no
    recompile; a longer request: one more graph), the eager decode's tokens in each."""
    model = make_tiny_model(n_layers=2, max_seq_len=512)
    idx = torch.tensor([get_encoding().encode_ordinary("The capital of France is Paris, and the capital of")])
    T = idx.size(1)
    assert [model.cache_length(n, True) for n in (1, 64, 65, 200, 512, 600)] == [64, 64, 128, 256, 512, 512]
    assert model.cache_length(77, False) == 77
    torch._dynamo.reset()
    counters.clear()
    for n in (10, 20, 100):  # T + 10 and T + 20 share a length, T + 100 needs the next one
        compiled = model.generate(idx, n, temperature=0, compile=True)
        assert model.layers[0].attention.cache.k.size(2) == model.cache_length(T + n, True) < 512
        assert torch.equal(compiled, model.generate(idx, n, temperature=0))
    assert model.cache_length(T + 10, True) == model.cache_length(T + 20, True) < model.cache_length(T + 100, True)
    assert counters["stats"]["unique_graphs"] == 2
