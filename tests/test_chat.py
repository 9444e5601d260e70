"""chat.py: streamed KV-cache decoding, UTF-8 across tokens, the context limit, and the exported
tokenizer's chat template against our prompt tokens."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import chat
from conftest import make_tiny_model
from export_hf import save_hf, save_weights
from finetune import TEMPLATES, encode
from llama_fineweb.tokenizer import EOT, N_VOCAB, get_encoding
from model import pick_next_token
from runs import call_main

ROOT = Path(__file__).resolve().parent.parent
CONTEXT = 64
CONVERSATIONS = [
    [{"role": "user", "content": "Name a primary color."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Translate to French.\n\nGood morning"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Sky color?"},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Grass? (ünïcødé 😀 \"quoted\")"}],
]


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory) -> Path:
    """A random tiny model with a 64-token context, saved as weights (chat.py --checkpoint reads it)."""
    path = tmp_path_factory.mktemp("chat") / "weights"
    save_weights(make_tiny_model(max_seq_len=CONTEXT), path)
    return path


def chat_cli(*args: str) -> subprocess.CompletedProcess:
    """`python chat.py ARGS` in a fresh interpreter."""
    return subprocess.run([sys.executable, str(ROOT / "chat.py"), *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("temperature,top_k", [(0.0, None), (1.0, 50)])
def test_streamed_tokens_equal_decoding_without_cache(temperature, top_k):
    """The KV-cache stream picks, token by token, what a full forward over the whole text picks."""
    model = make_tiny_model(max_seq_len=CONTEXT)
    ids = get_encoding().encode_ordinary("The capital of France is")
    streamed = list(chat.stream_tokens(model, ids, 12, temperature, top_k, torch.Generator().manual_seed(3),
                                       stop=None))
    generator, reference = torch.Generator().manual_seed(3), list(ids)
    with torch.no_grad():
        for _ in range(12):
            logits = model(torch.tensor([reference]))[:, -1, :].float()
            logits[:, N_VOCAB:] = float("-inf")
            reference.append(int(pick_next_token(logits, temperature, top_k, generator)))
    assert streamed == reference[len(ids):]


def test_stream_stops_after_end_of_text(monkeypatch):
    """Generation ends with the <|endoftext|> it picked."""
    picks = iter([464, 3139, EOT, 464])
    monkeypatch.setattr(chat, "pick_next_token", lambda *args: torch.tensor([[next(picks)]]))
    assert list(chat.stream_tokens(make_tiny_model(max_seq_len=CONTEXT), [464], 10)) == [464, 3139, EOT]


def test_text_stream_holds_back_partial_characters():
    """Characters split across BPE tokens come out whole, once their last byte is decoded."""
    text = "naïve café, 日本語 and 😀🎉!"
    stream = chat.TextStream()
    pieces = [stream.add(token) for token in get_encoding().encode_ordinary(text)] + [stream.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert "" in pieces  # some tokens were incomplete characters, held back


def test_build_prompt_keeps_the_conversation_and_drops_oldest_turns():
    """The prompt holds every earlier turn in the template; when it outgrows the context the oldest go first."""
    vicuna = TEMPLATES["vicuna"]
    history = [("Hi", "Hello."), ("Name a color.", "Red.")]
    ids, dropped = chat.build_prompt(vicuna, history, "And another?", context=1024, reserve=16)
    messages = [{"role": r, "content": c} for u, a in history for r, c in (("user", u), ("assistant", a))]
    full = encode(vicuna.segments([*messages, {"role": "user", "content": "And another?"}], True))[0]
    assert dropped == 0 and ids == full
    short, dropped = chat.build_prompt(vicuna, history, "And another?", context=len(full) + 4, reserve=16)
    assert dropped >= 1 and len(short) + 16 <= len(full) + 4
    assert short == encode(vicuna.segments([*messages[2 * dropped:], {"role": "user", "content": "And another?"}],
                                           True))[0]
    with pytest.raises(chat.UserError, match="shorten it"):
        chat.build_prompt(vicuna, history, "word " * 100, context=CONTEXT, reserve=16)


def test_prompt_longer_than_the_context_is_one_line(weights_dir):
    """--prompt past the model's context: `python chat.py` prints one line on stderr and exits 2."""
    # The one run of the script itself; the other CLI tests call chat.main in this process.
    proc = chat_cli("--checkpoint", str(weights_dir), "--prompt", "word " * 100)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("chat.py: error: the prompt is ")
    assert "Traceback" not in proc.stderr


def test_one_shot_answer_is_limited_by_the_context(weights_dir):
    """A prompt that leaves less room than --max_new_tokens: a note on stderr, a shorter answer on stdout."""
    proc = call_main(chat.main, ["--checkpoint", str(weights_dir), "--prompt", "Hi", "--max_new_tokens", "200",
                                 "--temperature", "0"], check=False)
    assert proc.returncode == 0, proc.stderr
    assert "the answer can have at most" in proc.stderr
    assert proc.stdout.endswith("\n") and len(proc.stdout.strip()) > 0


def test_interactive_session_drops_oldest_turns_and_exits(weights_dir, monkeypatch):
    """Several turns on a 64-token context: the oldest are dropped with a line saying so; /exit leaves."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\nName a color.\nAnd another?\n/exit\n"))
    proc = call_main(chat.main, ["--checkpoint", str(weights_dir), "--max_new_tokens", "8", "--temperature", "0"],
                     check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("Assistant: ") == 3
    assert "to fit the 64-token context]" in proc.stdout


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_exported_chat_template_gives_our_prompt_tokens(tmp_path, name):
    """AutoTokenizer.apply_chat_template of an export builds exactly our tokens: single and multi-turn,
    with a system message, with and without the generation prompt."""
    from transformers import AutoTokenizer

    template = TEMPLATES[name]
    save_hf(make_tiny_model(), tmp_path / "hf", chat_template=template.jinja())
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for messages in CONVERSATIONS:
        ours = encode(template.segments(messages, add_generation_prompt=True))[0]
        assert tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"] == ours
        answered = [*messages, {"role": "assistant", "content": "Fine."}]
        assert tokenizer.apply_chat_template(answered)["input_ids"] == encode(template.segments(answered))[0]


def always_says(token: int) -> torch.nn.Module:
    """A tiny model whose greedy next token is `token` after any input: every position carries the
    same embedding through blocks whose outputs are zero, and only `token`'s output row is set."""
    model = make_tiny_model(max_seq_len=CONTEXT)
    with torch.no_grad():
        model.tok_embeddings.weight.copy_(torch.randn(model.config.dim))
        for layer in model.layers:
            layer.attention.wo.weight.zero_()
            layer.feed_forward.w2.weight.zero_()
        model.output.weight.zero_()
        model.output.weight[token] = model.norm(model.tok_embeddings.weight[0])
    return model


@pytest.mark.parametrize("token, reply", [(2, "#" * 6), (EOT, "")])
def test_hf_model_declaring_eos_2_answers_in_vicuna_and_stops_at_end_of_text(tmp_path, monkeypatch, token, reply):
    """chat.py --hf on a directory whose configs say bos 1 / eos 2 (as the released instruct model's do):
    the prompt is Vicuna 1.1's, token 2 ('#') does not end the answer, <|endoftext|> does."""
    save_hf(always_says(token), tmp_path / "hf", vocab_size=N_VOCAB)
    for name in ("config.json", "generation_config.json"):
        config = json.loads((tmp_path / "hf" / name).read_text())
        (tmp_path / "hf" / name).write_text(json.dumps({**config, "bos_token_id": 1, "eos_token_id": 2}))
    prompts = []
    real_stream = chat.stream_tokens
    monkeypatch.setattr(chat, "stream_tokens",
                        lambda model, ids, *a, **k: prompts.append(ids) or real_stream(model, ids, *a, **k))
    proc = call_main(chat.main, ["--hf", str(tmp_path / "hf"), "--prompt", "Hi", "--max_new_tokens", "6",
                                 "--temperature", "0", "--device", "cpu"])
    vicuna, _ = encode(TEMPLATES["vicuna"].segments([{"role": "user", "content": "Hi"}], add_generation_prompt=True))
    assert prompts == [vicuna]
    assert proc.stdout == reply + "\n"
