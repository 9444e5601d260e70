"""finetune.py: the answer-only loss, the template, the data's order and checks, and the real script
end to end (fine-tune, resume, chat with the result)."""

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import chat
import export_hf
import finetune
import train_llama
from conftest import make_tiny_model
from export_hf import save_weights
from finetune import TEMPLATES, SFTConfig, SFTData, SFTLoader, collate, encode, to_messages
from llama_fineweb import checkpoint
from llama_fineweb.tokenizer import EOT, get_encoding
from llama_fineweb.train_config import load_config
from runs import call_main, one_line

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "data" / "alpaca_tiny.json"
SEQ = 64  # the fixture's longest example is 61 tokens in the Vicuna template
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
          "helpful, detailed, and polite answers to the user's questions.")
# 4 examples per step = 256 / 64 tokens: 2 micro-steps of 2 examples on one process.
BASE = [
    "--config", str(ROOT / "configs" / "sft_tiny.py"), f"--data={FIXTURE}", f"--seq_len={SEQ}",
    "--total_batch_tokens=256", "--micro_batch=2", "--max_steps=8", "--warmup_steps=2", "--max_lr=1e-3",
    "--val_fraction=0.1", "--eval_interval=4", "--sample_interval=0", "--save_interval=0", "--keep_last=0",
    "--device=cpu",
]


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    """A random tiny model as a weights directory (what export_hf.py --from_hf writes): the --init_from."""
    path = tmp_path_factory.mktemp("base") / "weights"
    save_weights(make_tiny_model(max_seq_len=SEQ), path)
    return path


def finetune_run(out_dir: Path, base: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    """finetune.py's main in this process (tests/runs.py's call_main: no interpreter start)."""
    return call_main(finetune.main, [*BASE, f"--init_from={base}", f"--out_dir={out_dir}", *extra], check=check)


def metrics(out_dir: Path, key: str) -> dict[int, float]:
    """step -> value of `key` in metrics.jsonl (a resumed run's entries replace earlier ones)."""
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


def config(*extra: str) -> SFTConfig:
    return load_config([*BASE, "--init_from=unused", *extra], kind=SFTConfig)


# ----------------------------------------------------------------------------- template and loss

def test_vicuna_template_is_fastchat_v1_1():
    """Single and multi-turn Vicuna 1.1, <|endoftext|> ending each answer; a system message replaces ours."""
    t = TEMPLATES["vicuna"]
    one = [{"role": "user", "content": "Hi"}]
    assert t.render(one, add_generation_prompt=True) == f"{SYSTEM} USER: Hi ASSISTANT:"
    two = [*one, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
           {"role": "assistant", "content": "Bye."}]
    assert t.render(two) == f"{SYSTEM} USER: Hi ASSISTANT: Hello.<|endoftext|>USER: Bye ASSISTANT: Bye.<|endoftext|>"
    assert t.render([{"role": "system", "content": "Be brief."}, *one], True) == "Be brief. USER: Hi ASSISTANT:"
    assert to_messages({"instruction": "Add.", "input": "2 and 3", "output": " 5 "}, "row") == [
        {"role": "user", "content": "Add.\n\n2 and 3"}, {"role": "assistant", "content": "5"}]
    for name, template in TEMPLATES.items():
        template.check(name)


def test_masked_loss_equals_cross_entropy_over_answer_tokens():
    """The model's loss on a padded SFT batch equals cross-entropy over the answer tokens (and each
    answer's <|endoftext|>) of each example alone, built by hand."""
    enc = get_encoding()
    conversations = [
        to_messages({"instruction": "Name a color.", "output": "Red."}, "row 0"),
        to_messages({"messages": [
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."},
            {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye."}]}, "row 1"),
    ]
    # Each example by hand: (text, is_answer) pieces; an answer is followed by <|endoftext|>.
    by_hand = [
        [(f"{SYSTEM} USER: Name a color. ASSISTANT:", False), (" Red.", True)],
        [(f"{SYSTEM} USER: Hi ASSISTANT:", False), (" Hello there.", True), ("USER: Bye ASSISTANT:", False),
         (" Bye.", True)],
    ]
    model = make_tiny_model(max_seq_len=SEQ)
    examples = [finetune.Example(*map(np.array, encode(TEMPLATES["vicuna"].segments(c)))) for c in conversations]
    x, y = collate(examples, SEQ, pad_multiple=16)
    assert x.shape == (2, 64)
    total, count = 0.0, 0
    for row, pieces in enumerate(by_hand):
        ids, answer_positions = [], []
        for text, is_answer in pieces:
            tokens = enc.encode_ordinary(text) + ([EOT] if is_answer else [])
            if is_answer:
                answer_positions += range(len(ids), len(ids) + len(tokens))
            ids += tokens
        assert x[row, :len(ids) - 1].tolist() == ids[:-1]  # our pipeline built the same tokens
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0]
        predicting = [p - 1 for p in answer_positions]  # logits at p - 1 predict token p
        total += F.cross_entropy(logits[predicting], torch.tensor(ids)[answer_positions], reduction="sum").item()
        count += len(answer_positions)
    with torch.no_grad():
        loss = model(x, y).item()
    assert (y >= 0).sum().item() == count
    assert loss == pytest.approx(total / count, rel=1e-5)


# ----------------------------------------------------------------------------- data: order and checks

def test_batches_are_the_same_on_any_world_size():
    """Global batch k is examples [k*G, (k+1)*G) of a seeded per-epoch permutation; 2 ranks take
    exactly what 1 process takes, over three epochs."""
    cfg = config()
    data = SFTData(cfg)
    one = SFTLoader(data.train, data.identity, 4, cfg, 0, 1, log=lambda _: None)
    two = [SFTLoader(data.train, data.identity, 4, cfg, r, 2, log=lambda _: None) for r in range(2)]
    seen = []
    for _ in range(-(-3 * len(data.train) // 4)):  # steps: 2 micro-steps on 1 process, 1 on each of 2
        single = [one.example_ids(one.step + m) for m in range(2)]
        one.order.step += 2
        split = [loader.example_ids(loader.step) for loader in two]
        for loader in two:
            loader.order.step += 1
        assert single == split
        seen += single[0] + single[1]
    n = len(data.train)
    for epoch in range(3):  # every epoch is a permutation of all training examples
        assert sorted(seen[epoch * n:(epoch + 1) * n]) == list(range(n))
    assert seen[:n] != seen[n:2 * n]


def test_skipped_batches_are_never_served_and_kept_in_the_state():
    """--skip_batches in fine-tuning: the SFT loader serves global batches 0, 3, 4 with [1, 3)
    skipped, and a loader given its state (a resume) keeps skipping them."""
    cfg = config()
    data = SFTData(cfg)
    plain = SFTLoader(data.train, data.identity, 4, cfg, log=lambda _: None)
    skipping = SFTLoader(data.train, data.identity, 4, cfg, log=lambda _: None)
    skipping.skip([(1, 3)])
    batches = [plain.order.step_ids(2 * k) for k in range(5)]
    served = []
    for _ in range(2):
        served.append(skipping.order.step_ids(skipping.step))
        skipping.next_batch(), skipping.next_batch()
    resumed = SFTLoader(data.train, data.identity, 4, cfg, log=lambda _: None)
    resumed.load_state_dict(skipping.state_dict())
    assert resumed.state_dict()["skip_batches"] == [[1, 3]]
    served.append(resumed.order.step_ids(resumed.step))
    assert served == [batches[0], batches[3], batches[4]]


def test_validation_split_is_fixed_and_held_out():
    """The validation rows do not depend on the seed and never appear in training."""
    a, b = SFTData(config()), SFTData(config("--seed=7"))
    val = {tuple(e.ids) for e in a.val}
    assert val == {tuple(e.ids) for e in b.val} and len(val) == 2
    assert not val & {tuple(e.ids) for e in a.train}


def test_resume_on_other_data_is_refused_unless_accepted(tmp_path):
    """A checkpoint's loader state names its data: other data or another template is refused in
    one line, and accepted with accept_new_data."""
    cfg = config()
    data = SFTData(cfg)
    loader = SFTLoader(data.train, data.identity, 4, cfg)
    loader.order.step = 6
    state = loader.state_dict()
    assert state["position"] == 12
    rows = json.loads(FIXTURE.read_text())
    (tmp_path / "other.json").write_text(json.dumps(rows[:-1]))
    for extra in ([f"--data={tmp_path / 'other.json'}"], ["--template=alpaca"]):
        other = SFTData(config(*extra))
        fresh = SFTLoader(other.train, other.identity, 4, cfg, log=lambda _: None)
        with pytest.raises(finetune.DataError, match="--accept_new_data=true") as e:
            fresh.load_state_dict(state)
        assert len(str(e.value).splitlines()) == 1
        fresh.load_state_dict(state, accept_new_data=True)
        assert fresh.step == 6


def test_overlong_examples_are_dropped_or_truncated_and_counted():
    """Examples over seq_len + 1 tokens: dropped (default) or cut, with a count in the log."""
    dropped = SFTData(config("--seq_len=48", "--total_batch_tokens=192", "--val_fraction=0", "--eval_interval=0"))
    cut = SFTData(config("--seq_len=48", "--total_batch_tokens=192", "--val_fraction=0", "--eval_interval=0",
                         "--overlong=truncate"))
    n_long = 24 - len(dropped.train)
    assert n_long > 0 and len(cut.train) > len(dropped.train)
    assert f"{n_long} examples longer than seq_len + 1 = 49 tokens dropped" in "\n".join(dropped.notes)
    lost = len(dropped.train) + n_long - len(cut.train)  # cut inside the prompt: nothing left to predict
    assert (f"{n_long} examples longer than seq_len + 1 = 49 tokens truncated to 49 tokens (12 train, 0 val); "
            f"{lost} of them dropped all the same") in "\n".join(cut.notes)
    assert max(len(e.ids) for e in cut.train) == 49


def bad_data(tmp_path: Path, name: str) -> tuple[list[str], str]:
    """(extra arguments, the message expected) for one kind of bad input."""
    path = tmp_path / "data.jsonl"
    good = json.dumps({"instruction": "Say hi.", "output": "Hi."})
    if name == "no output":
        path.write_text(good + "\n" + json.dumps({"instruction": "Say hi.", "input": ""}) + "\n")
        return [f"--data={path}"], f"{path} line 2: no 'output'"
    if name == "empty file":
        path.write_text("\n")
        return [f"--data={path}"], f"{path} is empty"
    if name == "bad json":
        path.write_text(good + "\n{oops\n")
        return [f"--data={path}"], f"{path} line 2: not valid JSON"
    if name == "roles":
        path = tmp_path / "data.json"
        messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
        path.write_text(json.dumps([{"messages": messages}]))
        return [f"--data={path}"], f"{path} row 0: roles ['user', 'user'] must alternate"
    if name == "template placeholder":
        template = {**dataclasses.asdict(TEMPLATES["vicuna"]), "turn": "USER: "}
        del template["name"]
        (tmp_path / "mine.json").write_text(json.dumps(template))
        return ([f"--template={tmp_path / 'mine.json'}"],
                f"{tmp_path / 'mine.json'}: template field 'turn' = 'USER: ' lacks the placeholder {{prompt}}")
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["no output", "empty file", "bad json", "roles", "template placeholder"])
def test_bad_data_is_one_line_naming_file_and_row(tmp_path, capsys, name):
    """A row without output, an empty file, broken JSON, wrong roles, a template without a placeholder."""
    extra, message = bad_data(tmp_path, name)
    with pytest.raises(SystemExit) as e:
        finetune.main([*BASE, f"--init_from={tmp_path}", f"--out_dir={tmp_path / 'out'}", *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("finetune.py: error: ") and message in err, err


def test_hub_dataset_offline_is_one_line_naming_the_local_route(tmp_path, capsys, monkeypatch):
    """A hub name with no network (HF_DATASETS_OFFLINE): one line saying how to pass a local file."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit):
        finetune.main([*BASE, f"--init_from={tmp_path}", "--data=nobody/no-such-instructions", f"--out_dir={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--data=nobody/no-such-instructions: cannot load it" in err
    assert "--data=FILE.jsonl" in err


def test_init_from_is_required(tmp_path, capsys):
    """Fine-tuning needs a model to start from."""
    with pytest.raises(SystemExit):
        finetune.main([*BASE, "--init_from=", f"--out_dir={tmp_path}"])
    assert "pass --init_from=" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the script end to end

@pytest.fixture(scope="module")
def straight(tmp_path_factory, base_model) -> Path:
    """An uninterrupted 8-step fine-tuning run, the reference for the resumed one."""
    out = tmp_path_factory.mktemp("straight")
    proc = finetune_run(out, base_model)
    assert "sft data: " in proc.stdout and "22 train / 2 val examples" in proc.stdout
    return out


def test_resume_equals_straight_run(tmp_path, base_model, straight):
    """4 steps, then a resumed 4: bitwise the same losses, gradient norms, validation losses and final weights."""
    finetune_run(tmp_path, base_model, "--stop_step=4")
    assert sorted(metrics(tmp_path, "loss")) == [1, 2, 3, 4]
    proc = finetune_run(tmp_path, base_model)
    assert "resumed from" in proc.stdout and "at step 4" in proc.stdout
    assert metrics(tmp_path, "loss") == metrics(straight, "loss")
    assert metrics(tmp_path, "grad_norm") == metrics(straight, "grad_norm")
    assert metrics(tmp_path, "val_loss") == metrics(straight, "val_loss")
    assert sorted(metrics(straight, "val_loss")) == [0, 4, 8]
    ours, reference = checkpoint.load_model(tmp_path).state_dict(), checkpoint.load_model(straight).state_dict()
    for k, v in reference.items():
        assert torch.equal(v, ours[k]), k
    assert finetune.checkpoint_template(tmp_path) == TEMPLATES["vicuna"]


def test_step_loss_is_the_mean_over_answer_tokens_whatever_the_micro_batch(tmp_path, base_model, straight):
    """Examples hold different numbers of answer tokens: 4 examples per step as 4 micro-steps of 1
    or 1 of 4 give the 2 x 2 run's losses (to 1e-5) and gradient norms (1e-4), each micro-batch
    weighted by its tokens."""
    for micro_batch in (1, 4):
        out = tmp_path / f"mb{micro_batch}"
        finetune_run(out, base_model, f"--micro_batch={micro_batch}", "--stop_step=3", "--eval_interval=0")
        for key in ("loss", "grad_norm"):
            ours, reference = metrics(out, key), metrics(straight, key)
            assert sorted(ours) == [1, 2, 3]
            tol = 1e-5 if key == "loss" else 1e-4
            assert all(abs(ours[k] - reference[k]) < tol for k in ours), (micro_batch, key, ours, reference)
    cfg = config("--micro_batch=1")
    data = SFTData(cfg)
    loader = SFTLoader(data.train, data.identity, 4, cfg, log=lambda _: None)
    for _ in range(3):  # targets_in_step counts what the step's micro-batches then mark as targets
        expected = loader.targets_in_step()
        assert expected == sum(int((loader.next_batch()[1] >= 0).sum()) for _ in range(loader.accum_steps))


def two_processes_match(out_dir: Path, reference_dir: Path, *args: str) -> None:
    """finetune.py `args` under torchrun with 2 gloo processes (one micro-step each) into `out_dir`:
    its losses and validation losses equal `reference_dir`'s within 1e-5, its gradient norms within 1e-4."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "finetune.py"), *args, f"--out_dir={out_dir}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 accumulation x 2 processes" in proc.stdout
    for key in ("loss", "grad_norm", "val_loss"):
        ours, reference = metrics(out_dir, key), metrics(reference_dir, key)
        assert ours.keys() == reference.keys()
        tol = 1e-4 if key == "grad_norm" else 1e-5
        assert all(abs(ours[k] - reference[k]) < tol for k in ours), (key, ours, reference)


def test_two_processes_match_one(tmp_path, base_model, straight):
    """torchrun with 2 gloo processes equals 1 process with twice the accumulation (losses, val, weights)."""
    two_processes_match(tmp_path, straight, *BASE, f"--init_from={base_model}")
    ours, reference = checkpoint.load_model(tmp_path).state_dict(), checkpoint.load_model(straight).state_dict()
    assert all((ours[k] - v).abs().max() < 1e-5 for k, v in reference.items())


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, base_model) -> tuple[Path, list[dict]]:
    """The run directory of 60 steps on 4 examples at a high learning rate, and those examples."""
    tmp = tmp_path_factory.mktemp("tuned")
    rows = json.loads(FIXTURE.read_text())[:4]
    data = tmp / "four.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    finetune_run(tmp / "out", base_model, f"--data={data}", "--total_batch_tokens=256", "--micro_batch=4",
                 "--max_steps=60", "--warmup_steps=5", "--max_lr=5e-3", "--min_lr=5e-4", "--val_fraction=0",
                 "--eval_interval=0")
    return tmp / "out", rows


def prompt_of(row: dict) -> str:
    return f"{row['instruction']}\n\n{row['input']}" if row["input"] else row["instruction"]


def test_finetuned_model_answers_its_training_instructions(tuned):
    """Greedy `chat.py --prompt` with a training instruction prints its trained answer."""
    out, rows = tuned
    for row in (rows[0], rows[2]):  # one without an input, one with
        proc = call_main(chat.main, ["--checkpoint", str(out), "--prompt", prompt_of(row), "--temperature", "0",
                                     "--max_new_tokens", "24"])
        assert proc.stdout == row["output"] + "\n", proc.stdout
        assert "template vicuna (the checkpoint's)" in proc.stderr


def test_in_loop_sample_is_what_chat_answers(tuned):
    """SFT's in-loop sample is greedy by default: the trained answer, as `chat.py --temperature 0` gives it."""
    out, rows = tuned
    prompt = TEMPLATES["vicuna"].render([{"role": "user", "content": prompt_of(rows[0])}], add_generation_prompt=True)
    cfg = SFTConfig(sample_prompt=prompt, sample_tokens=24)
    run = SimpleNamespace(cfg=cfg, dist=SimpleNamespace(device=torch.device("cpu")),
                          model=checkpoint.load_model(out), autocast=contextlib.nullcontext)
    sample = train_llama.sample_text(run)
    assert sample.startswith(prompt) and sample[len(prompt):].split("<|endoftext|>")[0].strip() == rows[0]["output"]


def test_export_carries_the_chat_template(tuned, tmp_path):
    """export_hf.py of a fine-tuned run: transformers' apply_chat_template builds our prompt tokens and
    its greedy generate() gives the trained answer, stopping at <|endoftext|>."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    out, rows = tuned
    proc = call_main(export_hf.main, ["--checkpoint", str(out), "--out", str(tmp_path / "hf")])
    assert "with the vicuna chat template" in proc.stdout
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    model = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    messages = [{"role": "user", "content": prompt_of(rows[1])}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert ids == encode(TEMPLATES["vicuna"].segments(messages, add_generation_prompt=True))[0]
    generated = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    assert generated[-1] == EOT
    assert tokenizer.decode(generated[:-1]).strip() == rows[1]["output"]


# ----------------------------------------------------------------------------- one run, one kind, one base

@pytest.fixture(scope="module")
def finished(tmp_path_factory, base_model) -> Path:
    """A finished 3-step fine-tuning run (--epochs=0.5: max_steps is not on the command line)."""
    out = tmp_path_factory.mktemp("finished")
    finetune_run(out, base_model, "--epochs=0.5", "--eval_interval=0")
    assert checkpoint.read_meta(checkpoint.resolve(out))["step"] == 3
    return out


def test_pretraining_and_fine_tuning_never_resume_each_other(tmp_path, base_model, finished):
    """train_llama.py on a fine-tuning out_dir and finetune.py on a pretraining one (even with
    --accept_new_data): one line naming both kinds and the way out; no checkpoint changes."""
    import train_llama
    from runs import BASE as PRETRAIN

    line = one_line(call_main(train_llama.main, [*PRETRAIN, "--data_dir=/unused", f"--out_dir={finished}"], False))
    assert "written by a fine-tuning run (finetune.py)" in line and "a pretraining run (train_llama.py)" in line
    assert "another --out_dir" in line and "--init_from=" in line
    # A pretraining checkpoint from before run kinds were recorded: its loader names shards.
    pretrained = tmp_path / "pretrained"
    model = make_tiny_model(max_seq_len=SEQ)
    checkpoint.save(pretrained, 4, {"model": checkpoint.ModelState(model)}, meta={"loader": {"data": {"shards": {}}}})
    line = one_line(finetune_run(pretrained, base_model, "--accept_new_data=true", check=False))
    assert "written by a pretraining run (train_llama.py)" in line and "a fine-tuning run (finetune.py)" in line
    assert [p.name for p in checkpoint.complete_checkpoints(pretrained)] == ["step_0000004"]
    assert checkpoint.read_meta(checkpoint.resolve(finished))["run_kind"] == "fine-tuning"


def test_a_changed_init_from_on_resume_is_refused(tmp_path, base_model, finished):
    """Pointing a fine-tuning out_dir at another base model refuses, naming both; the old one resumes."""
    other = tmp_path / "newer_base"
    save_weights(make_tiny_model(seed=3, max_seq_len=SEQ), other)
    line = one_line(finetune_run(finished, other, "--epochs=1", "--eval_interval=0", check=False))
    assert f"--init_from={other}" in line and f"started from --init_from={base_model}" in line
    assert "another --out_dir" in line


def test_a_finished_run_trains_nothing_and_says_so(finished, base_model):
    """Rerunning a finished run exits 2 with the step, how to continue and how to start over; naming
    that step as --max_steps exits 0."""
    line = one_line(finetune_run(finished, base_model, "--epochs=0.5", "--eval_interval=0", check=False))
    assert "already complete at step 3 (max_steps 3): nothing to do; raise --max_steps to continue" in line
    assert "--resume=never --start_over=archive" in line
    proc = finetune_run(finished, base_model, "--max_steps=3", "--eval_interval=0")
    assert "already at step 3, as --max_steps=3 asks: nothing to do" in proc.stdout


def test_refusal_hints_hold_for_the_command_given(tmp_path, base_model):
    """--overlong=truncate is not suggested when it is set, and a checkpoint that records no config
    is named as such rather than compared as "checkpoint None"."""
    line = one_line(finetune_run(tmp_path / "a", base_model, "--seq_len=16", "--total_batch_tokens=64",
                                 "--overlong=truncate", check=False))
    assert "prompts that fill seq_len + 1 = 17 tokens" in line and "--overlong=truncate" not in line
    assert "--overlong=truncate" in one_line(finetune_run(tmp_path / "b", base_model, "--seq_len=16",
                                                          "--total_batch_tokens=64", check=False))
    checkpoint.save(tmp_path / "c", 2, {"model": checkpoint.ModelState(make_tiny_model(max_seq_len=SEQ))})
    line = one_line(finetune_run(tmp_path / "c", base_model, check=False))
    assert "records no train_config" in line and "None" not in line


def test_in_loop_sample_stops_at_end_of_text():
    """The in-loop sample ends where chat.py's answer does: at the first <|endoftext|>."""
    enc = get_encoding()
    prompt, answer = "### Human: Hi\n### Assistant:", " Hello there."

    class Model:  # answers, ends its turn, then runs on as a model without a stop would
        def generate(self, idx, max_new_tokens, **kwargs):
            rest = enc.encode_ordinary(answer) + [EOT] + enc.encode_ordinary(" ### Human: more")
            return torch.cat([idx, torch.tensor([rest[:max_new_tokens]])], dim=1)

    run = SimpleNamespace(cfg=SFTConfig(sample_prompt=prompt, sample_tokens=16), model=Model(),
                          dist=SimpleNamespace(device=torch.device("cpu")), autocast=contextlib.nullcontext)
    assert train_llama.sample_text(run) == prompt + answer
