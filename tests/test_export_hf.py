"""Export to and import from Hugging Face `LlamaForCausalLM` directories, checked against transformers."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import export_hf
from export_hf import hf_config, load_hf, save_hf, to_hf_state_dict
from model import Transformer, model_config
from tokenizer import get_encoding

transformers.logging.set_verbosity_error()  # progress bars and load reports, not failures


def random_tiny_model(vocab_size: int = 512) -> Transformer:
    """The tiny preset (4 heads, 2 KV heads: GQA) with random weights, norms included, so that a
    swapped or misnamed tensor shows in the logits."""
    torch.manual_seed(0)
    model = Transformer(model_config("tiny", vocab_size=vocab_size))
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random Hugging Face Llama (GPT-2 vocabulary 50257, GQA) written by save_pretrained."""
    config = LlamaConfig(
        vocab_size=50257, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
        bos_token_id=50256, eos_token_id=50256,
    )
    torch.manual_seed(1)
    hf = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(path)
    return path


def hf_logits(hf_model: LlamaForCausalLM, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(idx).logits


def our_logits(model: Transformer, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx)


def test_exported_model_matches_transformers(tmp_path):
    """transformers' LlamaForCausalLM loads our export and gives our logits within 1e-4."""
    model = random_tiny_model()
    save_hf(model, str(tmp_path))
    hf = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 512, (2, 64))
    diff = (hf_logits(hf, idx) - our_logits(model, idx)).abs().max().item()
    assert diff < 1e-4


def test_export_slices_vocabulary_only_when_asked(tmp_path):
    """vocab_size=N keeps the first N rows; the real tokens' logits are unchanged."""
    model = random_tiny_model()
    assert to_hf_state_dict(model)["lm_head.weight"].shape[0] == 512
    save_hf(model, str(tmp_path), vocab_size=500)
    hf = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert hf.config.vocab_size == 500
    idx = torch.randint(0, 500, (1, 32))
    diff = (hf_logits(hf, idx) - our_logits(model, idx)[..., :500]).abs().max().item()
    assert diff < 1e-4


def test_export_writes_config_and_dtype(tmp_path):
    """config.json carries the Llama fields and the dtype the weights are saved in."""
    model = random_tiny_model()
    save_hf(model, str(tmp_path), dtype=torch.bfloat16)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config == hf_config(model.config, dtype=torch.bfloat16)
    assert config["torch_dtype"] == "bfloat16" and config["tie_word_embeddings"] is False
    assert config["rope_theta"] == 500000.0 and config["num_key_value_heads"] == 2
    weights = load_file(tmp_path / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert weights.keys() == to_hf_state_dict(model).keys()


def test_exported_tokenizer_encodes_like_ours(tmp_path):
    """AutoTokenizer on the export encodes and decodes like tokenizer.get_encoding()."""
    save_hf(random_tiny_model(), str(tmp_path))
    hf_tok = AutoTokenizer.from_pretrained(tmp_path)
    enc = get_encoding()
    text = "Hello, I am a language model, naïve café 🤗\n\n  don't  stop"
    assert hf_tok.encode(text) == enc.encode_ordinary(text)
    assert hf_tok.eos_token_id == 50256 and len(hf_tok) == 50257
    assert hf_tok.decode(enc.encode_ordinary(text)) == text


def test_imported_model_matches_transformers(hf_dir):
    """load_hf of a Hugging Face Llama (vocab 50257) gives its logits within 1e-4, the padded
    vocabulary rows (to 50304) being zero."""
    model = load_hf(str(hf_dir)).eval()
    hf = LlamaForCausalLM.from_pretrained(hf_dir).eval()
    assert model.config.vocab_size == 50304
    idx = torch.randint(0, 50257, (2, 48))
    ours = our_logits(model, idx)
    assert (hf_logits(hf, idx) - ours[..., :50257]).abs().max().item() < 1e-4
    assert torch.equal(ours[..., 50257:], torch.zeros(2, 48, 47))
    assert not model.tok_embeddings.weight[50257:].any()


def test_import_without_padding_keeps_vocabulary(hf_dir):
    """pad_vocab_to=None keeps the checkpoint's vocabulary, so the softmax is the same too."""
    model = load_hf(str(hf_dir), pad_vocab_to=None)
    hf = LlamaForCausalLM.from_pretrained(hf_dir).eval()
    idx = torch.randint(0, 50257, (1, 16))
    assert model.config.vocab_size == 50257
    assert (hf_logits(hf, idx) - our_logits(model, idx)).abs().max().item() < 1e-4


def test_import_reads_sharded_checkpoints(hf_dir, tmp_path):
    """A checkpoint split over several safetensors files (with an index) loads the same."""
    LlamaForCausalLM.from_pretrained(hf_dir).save_pretrained(tmp_path, max_shard_size="2MB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    sharded, single = load_hf(str(tmp_path)).state_dict(), load_hf(str(hf_dir)).state_dict()
    assert sharded.keys() == single.keys()
    assert all(torch.equal(sharded[k], single[k]) for k in single)


def test_export_then_import_is_exact(tmp_path):
    """save_hf followed by load_hf gives back every weight bit for bit."""
    model = random_tiny_model()
    save_hf(model, str(tmp_path))
    loaded = load_hf(str(tmp_path), pad_vocab_to=None)
    assert loaded.config == model.config
    original = model.state_dict()
    assert all(torch.equal(t, original[k]) for k, t in loaded.state_dict().items())


def test_import_refuses_pickle_only_checkpoints(hf_dir, tmp_path):
    """A directory with only pytorch_model.bin is refused (pickle can run code)."""
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_hf(str(tmp_path))


def test_import_refuses_unsupported_llama_variants(hf_dir, tmp_path):
    """A Llama with attention biases (which our model lacks) is refused, naming the field."""
    config = json.loads((hf_dir / "config.json").read_text())
    config["attention_bias"] = True
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="attention_bias=True"):
        load_hf(str(tmp_path))


def test_cli_imports_then_exports(hf_dir, tmp_path, monkeypatch, capsys):
    """`--from_hf` then `--checkpoint` on its output gives back the original Hugging Face model."""
    ours, back = tmp_path / "ours", tmp_path / "back"
    for argv in (["--from_hf", str(hf_dir), "--out", str(ours)],
                 ["--checkpoint", str(ours), "--out", str(back), "--vocab_size", "50257"]):
        monkeypatch.setattr(sys, "argv", ["export_hf.py", *argv])
        export_hf.main()
    assert "imported" in capsys.readouterr().out
    original, exported = load_file(hf_dir / "model.safetensors"), load_file(back / "model.safetensors")
    assert original.keys() == exported.keys()
    assert all(torch.equal(original[k], exported[k]) for k in original)


def test_cli_help_runs():
    """`python export_hf.py --help` prints the usage and exits 0."""
    script = Path(export_hf.__file__).resolve()
    result = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                            cwd=script.parent)
    assert result.returncode == 0 and "--from_hf" in result.stdout
