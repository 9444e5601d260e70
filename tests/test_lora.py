"""LoRA fine-tuning (finetune.py --lora_rank, lora.py through PEFT): it learns, resumes exactly,
matches across process counts, never touches its base, refuses a changed base, and exports merged
or as a PEFT adapter that transformers + peft load with our logits."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_finetune import BASE, FIXTURE, SEQ, metrics, prompt_of, two_processes_match

import chat
import export_hf
import finetune
from conftest import make_tiny_model
from export_hf import save_weights
from llama_fineweb import checkpoint
from llama_fineweb.metrics import flops_per_token
from runs import ROOT, call_main, one_line, run_here

LORA = ["--lora_rank=8", "--lora_alpha=16", "--max_steps=6", "--eval_interval=3"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A random tiny model (weights directory) whose last norm has a trained model's scale: a random
    model's logits are near uniform (|logit| < 2), and frozen output rows could never single out an
    answer token however the adapters move the hidden state."""
    model = make_tiny_model(max_seq_len=SEQ)
    with torch.no_grad():
        model.norm.weight.fill_(20.0)
    path = tmp_path_factory.mktemp("lora_base") / "weights"
    save_weights(model, path)
    return path


def lora_run(out_dir: Path, base: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    return call_main(finetune.main, [*BASE, *LORA, f"--init_from={base}", f"--out_dir={out_dir}", *extra],
                     check=check)


def digest(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def adapter_tensors(run: Path) -> dict[str, torch.Tensor]:
    model = checkpoint.load_model(run, merge=False)
    return {k: v for k, v in model.state_dict().items() if ".lora_" in k}


@pytest.fixture(scope="module")
def straight(tmp_path_factory, base) -> Path:
    """An uninterrupted 6-step LoRA run, the reference; the base's bytes are checked unchanged."""
    before = digest(base)
    out = tmp_path_factory.mktemp("lora_straight")
    proc = lora_run(out, base)
    assert "lora: rank 8, alpha 16, dropout 0 on wq,wk,wv,wo,w1,w2,w3" in proc.stdout
    assert digest(base) == before
    return out


def test_checkpoint_holds_the_adapters_and_the_base_reference(straight, base):
    """Only lora_A/lora_B tensors (and their AdamW state) are saved; meta.json names the base by
    path and sha256; the loaded model's frozen weights are the base's, bit for bit (and count 4,
    not 6, FLOPs per multiply-add for MFU: no weight gradient)."""
    ckpt = checkpoint.resolve(straight)
    meta = checkpoint.read_meta(ckpt)
    assert meta["lora"]["base"] == checkpoint.base_reference(base)
    assert meta["lora"]["spec"] == {"rank": 8, "alpha": 16.0, "dropout": 0.0,
                                    "targets": ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]}
    saved = checkpoint.SafeReader(ckpt).read_metadata().state_dict_metadata
    model_keys = [k for k in saved if k.startswith("model.")]
    assert model_keys and all(".lora_" in k for k in model_keys)
    assert all(".lora_" in k for k in saved if k.startswith("optim.state."))
    model = checkpoint.load_model(straight, merge=False)
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base_matmuls = sum(p.numel() for p in model.parameters() if not p.requires_grad) - 50304 * 64
    assert flops_per_token(model, SEQ) == 6 * adapters + 4 * base_matmuls + 12 * 4 * 64 * SEQ  # for MFU
    tuned = model.state_dict()
    for name, tensor in make_base(base).state_dict().items():
        ours = name.replace(".weight", ".base_layer.weight") if name.split(".")[-2].startswith("w") else name
        assert torch.equal(tuned[ours], tensor), name


def make_base(base: Path) -> torch.nn.Module:
    from llama_fineweb.hf_io import load_weights

    return load_weights(base).eval()


def test_resume_equals_straight_run(tmp_path, base, straight):
    """3 steps, then a resumed 3: bitwise the same losses, gradient norms, validation losses and adapters."""
    lora_run(tmp_path, base, "--stop_step=3")
    proc = lora_run(tmp_path, base)
    assert "resumed from" in proc.stdout and "at step 3" in proc.stdout
    assert metrics(tmp_path, "loss") == metrics(straight, "loss")
    assert metrics(tmp_path, "grad_norm") == metrics(straight, "grad_norm")
    assert metrics(tmp_path, "val_loss") == metrics(straight, "val_loss")
    ours, reference = adapter_tensors(tmp_path), adapter_tensors(straight)
    assert ours.keys() == reference.keys() and len(ours) == 2 * 7 * 4
    for k, v in reference.items():
        assert torch.equal(v, ours[k]), k


def test_two_processes_match_one(tmp_path, base, straight):
    """torchrun with 2 gloo processes (DDP over the adapters) equals 1 process within 1e-5."""
    two_processes_match(tmp_path, straight, *BASE, *LORA, f"--init_from={base}")
    ours, reference = adapter_tensors(tmp_path), adapter_tensors(straight)
    assert all((ours[k] - v).abs().max() < 1e-5 for k, v in reference.items())


def test_a_changed_base_is_refused(tmp_path, base):
    """Resuming, chatting with or exporting a LoRA run whose base changed since: one line, exit 2."""
    copy = tmp_path / "base"
    shutil.copytree(base, copy)
    out = tmp_path / "run"
    lora_run(out, copy, "--stop_step=1", "--eval_interval=0")
    save_weights(make_tiny_model(seed=5, max_seq_len=SEQ), copy, force=True)
    line = one_line(lora_run(out, copy, "--eval_interval=0", check=False))
    assert "base model of the LoRA adapters" in line and "changed since" in line
    line = one_line(call_main(chat.main, ["--checkpoint", str(out), "--prompt", "Hi"], check=False))
    assert "changed since" in line
    line = one_line(call_main(export_hf.main, ["--checkpoint", str(out), "--out", str(tmp_path / "x")], check=False))
    assert "changed since" in line


def test_the_base_survives_pruning_and_can_move(tmp_path, base, data_dir):
    """A base inside a pretraining run with keep_last outlives its pruning; moved with its bytes
    unchanged, it is named with --lora_base (chat, export) or --init_from (a resume)."""
    pretraining, out = tmp_path / "pretraining", tmp_path / "lora"
    run_here(pretraining, data_dir, "--keep_last=1", "--save_interval=1", "--stop_step=1")
    lora_run(out, pretraining / "step_0000001", "--stop_step=1", "--eval_interval=0")
    run_here(pretraining, data_dir, "--keep_last=1", "--save_interval=1", "--stop_step=4")
    kept = [p.name for p in checkpoint.complete_checkpoints(pretraining)]
    assert "step_0000001" in kept and "step_0000002" not in kept
    moved = tmp_path / "moved"
    (pretraining / "step_0000001").rename(moved)
    assert "is gone" in one_line(call_main(chat.main, ["--checkpoint", str(out), "--prompt", "Hi"], check=False))
    call_main(chat.main, ["--checkpoint", str(out), "--prompt", "Hi", "--max_new_tokens=2", f"--lora_base={moved}"])
    lora_run(out, moved, "--stop_step=2", "--eval_interval=0")
    assert checkpoint.read_meta(checkpoint.resolve(out))["lora"]["base"]["path"] == str(moved.resolve())


def test_adapter_export_on_a_hugging_face_base_loads_as_advised(tmp_path, hf_llama):
    """An adapter trained on a Hugging Face directory: the export's advice loads that directory as
    it is (no export of a base that is not our checkpoint), and the advised line runs."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from model import model_config

    hf_dir, out = tmp_path / "hf_base", tmp_path / "lora"
    hf_llama(model_config("tiny", max_seq_len=SEQ)).save_pretrained(hf_dir)
    lora_run(out, hf_dir, "--stop_step=1", "--eval_interval=0")
    proc = call_main(export_hf.main, ["--checkpoint", str(out), "--out", str(tmp_path / "adapter"), "--adapter"])
    advice = f"PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained({str(hf_dir.resolve())!r}), "
    assert advice in proc.stdout and "export_hf.py --checkpoint" not in proc.stdout
    PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(hf_dir.resolve()), tmp_path / "adapter")


def test_fsdp_and_a_changed_rank_are_refused(tmp_path, base, straight):
    """--parallel=fsdp with LoRA is refused saying why; a resume with another rank names it."""
    line = one_line(lora_run(tmp_path, base, "--parallel=fsdp", check=False))
    assert "--parallel=fsdp with --lora_rank" in line and "use --parallel=ddp" in line
    line = one_line(lora_run(straight, base, "--lora_rank=4", "--max_steps=7", check=False))
    assert "lora_rank: checkpoint 8 vs now 4" in line


# ----------------------------------------------------------------------------- learning and exports

@pytest.fixture(scope="module")
def tuned(tmp_path_factory, base) -> tuple[Path, list[dict]]:
    """30 LoRA steps on 4 examples at a high learning rate, and those examples."""
    tmp = tmp_path_factory.mktemp("lora_tuned")
    rows = json.loads(FIXTURE.read_text())[:4]
    data = tmp / "four.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lora_run(tmp / "out", base, f"--data={data}", "--micro_batch=4", "--max_steps=30", "--warmup_steps=3",
             "--max_lr=1e-2", "--min_lr=1e-3", "--val_fraction=0", "--eval_interval=0")
    return tmp / "out", rows


def test_lora_run_answers_its_training_instructions(tuned):
    """Greedy `chat.py --prompt` on the LoRA run prints a trained answer."""
    out, rows = tuned
    for row in (rows[0], rows[2]):
        proc = call_main(chat.main, ["--checkpoint", str(out), "--prompt", prompt_of(row), "--temperature", "0",
                                     "--max_new_tokens", "16"])
        assert proc.stdout == row["output"] + "\n", proc.stdout


def test_merged_and_adapter_exports_give_our_logits(tuned, base, tmp_path):
    """export_hf.py: the merged model's logits equal the unmerged LoRA model's within 1e-5 (relative),
    and the PEFT adapter on our export of the base, through PeftModel.from_pretrained, gives them too."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    out, _ = tuned
    call_main(export_hf.main, ["--checkpoint", str(out), "--out", str(tmp_path / "merged")])
    call_main(export_hf.main, ["--checkpoint", str(out), "--out", str(tmp_path / "adapter"), "--adapter"])
    call_main(export_hf.main, ["--checkpoint", str(base), "--out", str(tmp_path / "base")])
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base.resolve()) and config["r"] == 8
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    ours = checkpoint.load_model(out, merge=False)
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    adapted = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    idx = torch.randint(0, 50257, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = ours(idx)
        assert (reference - make_base(base)(idx)).abs().max() > 1e-2  # the adapters change the logits
        # Relative to the largest logit: this base's logits are ~20x a random model's (see `base`).
        scale = reference.abs().max()
        assert (merged(idx).logits - reference).abs().max() < 1e-5 * scale
        assert (adapted.eval()(idx).logits - reference).abs().max() < 1e-5 * scale


def test_each_rank_draws_its_own_dropout_masks(tmp_path, base):
    """Under torchrun with 2 gloo processes the ranks' dropout streams differ (they drew the same
    masks before): the RNG states each rank saves are not equal."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "finetune.py"), *BASE, *LORA, "--lora_dropout=0.5", "--max_steps=1", "--eval_interval=0",
           f"--init_from={base}", f"--out_dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    states = checkpoint.read_meta(checkpoint.resolve(tmp_path))["rng"]
    assert len(states) == 2 and states[0]["torch"] != states[1]["torch"]


def test_cuda_lora_holds_only_frozen_linears_in_bf16(base):
    """On CUDA (its dtype rule, run here on the CPU) the frozen linear weights go bf16, embeddings and
    norms stay float32: under autocast a fresh adapter's logits equal the base model's, bit for bit."""
    from types import SimpleNamespace

    import train_llama
    from llama_fineweb.lora import LoraSpec
    from llama_fineweb.train_config import SFTConfig

    plain, adapted = (make_tiny_model(max_seq_len=SEQ) for _ in range(2))
    cuda = SimpleNamespace(device=SimpleNamespace(type="cuda"))
    train_llama.attach_adapters(adapted, LoraSpec(8, 16.0, 0.0, ("wq", "w2")), SFTConfig(dtype="bfloat16"), cuda,
                                SimpleNamespace(print=lambda line: None))
    assert adapted.tok_embeddings.weight.dtype == adapted.norm.weight.dtype == torch.float32
    assert adapted.output.weight.dtype == adapted.layers[0].feed_forward.w1.weight.dtype == torch.bfloat16
    idx = torch.randint(0, 1000, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(plain(idx), adapted(idx))
