"""Export to and import from Hugging Face `LlamaForCausalLM` directories, checked against
transformers; the output directory's replace-whole rules; import's strict reading of the files."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaForCausalLM

import export_hf
from conftest import make_hf_llama, make_tiny_model
from export_hf import EXPORT_INFO, hf_config, load_hf, load_weights, save_hf, save_weights, to_hf_state_dict
from llama_fineweb.tokenizer import get_encoding
from model import Transformer, model_config
from runs import call_main

transformers.logging.set_verbosity_error()  # progress bars and load reports, not failures


def with_random_norms(model: torch.nn.Module) -> torch.nn.Module:
    """The model with its norm weights moved off 1, so that a swapped or misnamed norm shows in
    the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def random_tiny_model(seed: int = 0) -> Transformer:
    """The tiny preset (4 heads, 2 KV heads: GQA), vocabulary 512, random norms included."""
    return with_random_norms(make_tiny_model(seed, vocab_size=512))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random Hugging Face Llama (GPT-2 vocabulary 50257, GQA) written by save_pretrained."""
    cfg = model_config("tiny", vocab_size=50257, n_layers=2, ffn_dim=160, max_seq_len=128)
    path = tmp_path_factory.mktemp("hf")
    with_random_norms(make_hf_llama(cfg, seed=1)).save_pretrained(path)
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
    """config.json carries the Llama fields and the dtype the weights are saved in; every file,
    model.safetensors included (safetensors itself writes 0600), has the same mode."""
    model = random_tiny_model()
    save_hf(model, str(tmp_path), dtype=torch.bfloat16)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config == hf_config(model.config, dtype=torch.bfloat16)
    assert config["torch_dtype"] == "bfloat16" and config["tie_word_embeddings"] is False
    assert config["rope_theta"] == 500000.0 and config["num_key_value_heads"] == 2
    weights = load_file(tmp_path / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert weights.keys() == to_hf_state_dict(model).keys()
    assert len({p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}) == 1


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


# ----------------------------------------------------------------------------- the output directory


def run_cli(*args) -> subprocess.CompletedProcess:
    """`export_hf.py ARGS` as export_hf.main in this process (test_cli_help_runs runs the script itself)."""
    return call_main(export_hf.main, list(map(str, args)), check=False)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("export_hf.py: error: "), proc.stderr
    return lines[0]


def listing(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def weights_equal(model: Transformer, other: Transformer) -> bool:
    theirs = other.state_dict()
    return all(torch.equal(t, theirs[k]) for k, t in model.state_dict().items())


@pytest.fixture
def ours_dir(tmp_path):
    """Our weights (save_weights) of random_tiny_model(seed=0): a --checkpoint source."""
    save_weights(random_tiny_model(seed=0), tmp_path / "ours")
    return tmp_path / "ours"


@pytest.fixture
def foreign_dir(tmp_path):
    """A non-empty directory that export_hf.py did not write."""
    path = tmp_path / "notes"
    path.mkdir()
    (path / "notes.txt").write_text("not an export")
    return path


def test_export_into_an_earlier_export_replaces_it_whole(tmp_path, ours_dir):
    """Exporting model B over an earlier export holding a stale sharded copy (index + shards)
    leaves exactly the new files, and load_hf and transformers then read B, not the stale copy."""
    out, stale = tmp_path / "hf_out", tmp_path / "stale"
    assert run_cli("--checkpoint", ours_dir, "--out", out).returncode == 0
    LlamaForCausalLM.from_pretrained(out).save_pretrained(stale, max_shard_size="200KB")
    for path in stale.glob("model*.safetensors*"):  # what an earlier sharded save left behind
        shutil.copy(path, out / path.name)
    model_b = random_tiny_model(seed=1)
    save_weights(model_b, tmp_path / "ours_b")
    proc = run_cli("--checkpoint", tmp_path / "ours_b", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert weights_equal(load_hf(out, pad_vocab_to=None), model_b)
    idx = torch.randint(0, 512, (1, 16))
    assert (hf_logits(LlamaForCausalLM.from_pretrained(out), idx) - our_logits(model_b, idx)).abs().max() < 1e-4
    assert sorted(p.name for p in out.iterdir()) == sorted(json.loads((out / EXPORT_INFO).read_text())["files"])


@pytest.mark.parametrize("direction", ["export", "import"])
def test_non_empty_foreign_directory_is_refused(ours_dir, hf_dir, foreign_dir, direction):
    """--out naming a non-empty directory export_hf.py did not write: one error line, exit 2,
    the directory untouched."""
    source = ["--checkpoint", ours_dir] if direction == "export" else ["--from_hf", hf_dir]
    before = listing(foreign_dir)
    line = one_error_line(run_cli(*source, "--out", foreign_dir))
    assert str(foreign_dir) in line and "--force" in line
    assert listing(foreign_dir) == before


def test_force_replaces_a_foreign_directory_whole(hf_dir, foreign_dir):
    """With --force the foreign directory is replaced: it holds exactly the new output."""
    proc = run_cli("--from_hf", hf_dir, "--out", foreign_dir, "--force")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in foreign_dir.iterdir()) == [EXPORT_INFO, "model.safetensors", "model_config.json"]
    assert load_weights(foreign_dir).config.vocab_size == 50304


@pytest.mark.parametrize("direction", ["export", "import"])
def test_output_is_checked_before_the_checkpoint_is_read(tmp_path, foreign_dir, direction):
    """A refused --out is reported even when the source does not exist: it was checked first."""
    source = "--checkpoint" if direction == "export" else "--from_hf"
    line = one_error_line(run_cli(source, tmp_path / "no_such_source", "--out", foreign_dir))
    assert str(foreign_dir) in line and "no_such_source" not in line


def test_output_that_is_the_source_is_refused(ours_dir):
    """--out naming the --checkpoint directory itself (an earlier output of ours) is refused, and
    the source is left as it was."""
    before = listing(ours_dir)
    assert "would replace the source" in one_error_line(run_cli("--checkpoint", ours_dir, "--out", ours_dir))
    assert listing(ours_dir) == before


def test_failed_export_leaves_the_previous_one(tmp_path, monkeypatch):
    """An export that fails halfway (here: writing the tokenizer) leaves the previous export as it
    was, and no half-written directory beside it."""
    out = tmp_path / "hf_out"
    model_a = random_tiny_model(seed=0)
    save_hf(model_a, out)

    def fail(*args, **kwargs):
        raise OSError("simulated failure while writing the tokenizer")

    monkeypatch.setattr(export_hf, "save_tokenizer", fail)
    with pytest.raises(OSError, match="simulated"):
        save_hf(random_tiny_model(seed=1), out)
    assert weights_equal(load_hf(out, pad_vocab_to=None), model_a)
    assert [p.name for p in tmp_path.iterdir()] == ["hf_out"]


@pytest.mark.parametrize("exchange", [True, False], ids=["rename_exchange", "two_renames"])
def test_replacing_leaves_only_the_new_files(tmp_path, monkeypatch, exchange):
    """save_weights over an earlier output holding a stray file: the directory then holds exactly
    the new files and nothing is left beside it, with or without an atomic rename-exchange."""
    if not exchange:
        monkeypatch.setattr(export_hf, "_exchange", lambda a, b: False)
    out = tmp_path / "ours"
    save_weights(random_tiny_model(seed=0), out)
    (out / "stale.safetensors").write_bytes(b"left over")
    model_b = random_tiny_model(seed=1)
    save_weights(model_b, out)
    assert sorted(p.name for p in out.iterdir()) == [EXPORT_INFO, "model.safetensors", "model_config.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["ours"]
    assert weights_equal(load_weights(out), model_b)


# ----------------------------------------------------------------------------- strict import


@pytest.fixture
def sharded_dir(hf_dir, tmp_path):
    """hf_dir's model saved in several shards with model.safetensors.index.json."""
    path = tmp_path / "sharded"
    LlamaForCausalLM.from_pretrained(hf_dir).save_pretrained(path, max_shard_size="2MB")
    assert len(list(path.glob("*.safetensors"))) > 2
    return path


def test_import_refuses_a_single_file_beside_an_index(hf_dir, sharded_dir):
    """model.safetensors next to model.safetensors.index.json is an error naming both."""
    shutil.copy(hf_dir / "model.safetensors", sharded_dir / "model.safetensors")
    with pytest.raises(ValueError, match=r"both model\.safetensors and model\.safetensors\.index\.json"):
        load_hf(sharded_dir)


def test_import_refuses_a_file_the_index_does_not_list(sharded_dir):
    """A *.safetensors file the index does not list is an error naming it."""
    shard = sorted(sharded_dir.glob("*.safetensors"))[0]
    shutil.copy(shard, sharded_dir / "model-old.safetensors")
    with pytest.raises(ValueError, match="model-old.safetensors is not listed"):
        load_hf(sharded_dir)


def test_import_refuses_shards_without_an_index(sharded_dir):
    """Shards with no index (it was deleted) are an error, not read all together."""
    (sharded_dir / "model.safetensors.index.json").unlink()
    with pytest.raises(ValueError, match="no model.safetensors.index.json"):
        load_hf(sharded_dir)


@pytest.mark.parametrize("change", ["moved", "unlisted", "invented"])
def test_import_refuses_shards_that_disagree_with_the_index(sharded_dir, change):
    """The index puts a tensor in another shard, leaves one out, or lists one no shard holds:
    each is an error naming the tensor."""
    index_path = sharded_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    weight_map = index["weight_map"]
    # The tensor comes from the fullest shard, so that the shard is still listed afterwards.
    files = sorted(set(weight_map.values()), key=list(weight_map.values()).count, reverse=True)
    tensor = next(name for name, file in weight_map.items() if file == files[0])
    if change == "moved":
        weight_map[tensor] = files[1]
    elif change == "unlisted":
        del weight_map[tensor]
    else:
        tensor = "model.layers.0.mlp.extra_proj.weight"
        weight_map[tensor] = files[0]
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=tensor.replace(".", r"\.")):
        load_hf(sharded_dir)


@pytest.mark.parametrize("config", [{}, "no_heads"])
def test_cli_config_without_a_key_is_one_line(hf_dir, tmp_path, config):
    """--from_hf with config.json = {} or without num_attention_heads: one line naming the key."""
    bad = tmp_path / "bad"
    shutil.copytree(hf_dir, bad)
    if config == "no_heads":
        config = json.loads((hf_dir / "config.json").read_text())
        del config["num_attention_heads"]
    (bad / "config.json").write_text(json.dumps(config))
    line = one_error_line(run_cli("--from_hf", bad, "--out", tmp_path / "out"))
    assert ("'model_type'" if not config else "'num_attention_heads'") in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["truncated_shard", "corrupt_index"])
def test_cli_unreadable_file_is_one_line_naming_it(sharded_dir, tmp_path, damage):
    """A truncated shard or an index that is not JSON: one line naming the file, nothing written."""
    if damage == "truncated_shard":
        bad = sorted(sharded_dir.glob("*.safetensors"))[1]
        bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    else:
        bad = sharded_dir / "model.safetensors.index.json"
        bad.write_text(bad.read_text()[:100])
    line = one_error_line(run_cli("--from_hf", sharded_dir, "--out", tmp_path / "out"))
    assert str(bad) in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("entry", ["export_hf", "chat", "eval_suite", "hellaswag", "init_from"])
@pytest.mark.parametrize("vocabulary", ["32k", "other_ids"])
def test_a_model_with_another_vocabulary_is_refused_everywhere(tmp_path, data_dir, monkeypatch, entry, vocabulary):
    """A 32k-token Llama, or one whose tokenizer gives GPT-2's tokens other ids: every entry point that
    takes a Hugging Face directory refuses it in one line (one shared check), before reading weights."""
    import chat
    import eval_suite
    import hellaswag
    from runs import refusal

    hf = tmp_path / "hf"
    hf.mkdir()
    vocab_size = 32000 if vocabulary == "32k" else 50304
    (hf / "config.json").write_text(json.dumps(hf_config(model_config("tiny", vocab_size=vocab_size))))
    if vocabulary == "other_ids":
        (hf / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": {"!": 1, '"': 0}}}))
    expected = "vocab_size=32000, not GPT-2's 50257" if vocabulary == "32k" else "to other ids"
    if entry == "init_from":
        assert expected in refusal(tmp_path / "run", data_dir, f"--init_from={hf}")
        return
    main, argv = {
        "export_hf": (export_hf.main, ["--from_hf", str(hf), "--out", str(tmp_path / "out")]),
        "chat": (chat.main, ["--hf", str(hf), "--prompt", "Hi", "--device", "cpu"]),
        "eval_suite": (eval_suite.main, ["--hf", str(hf), "--tasks", "x", "--device", "cpu"]),
        "hellaswag": (hellaswag.main, ["--hf", str(hf), "--device", "cpu", "--data",
                                       str(Path(__file__).parent / "data" / "hellaswag_sample.jsonl")]),
    }[entry]
    if entry == "eval_suite":  # its tasks load first (before any model); these are not the point here
        monkeypatch.setattr(eval_suite, "task_manager", lambda tasks, include_path: None)
    proc = call_main(main, argv, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0], proc.stderr
