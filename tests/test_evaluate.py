"""eval_suite.py: lm-evaluation-harness on our checkpoints, offline, with local tasks and tiny models."""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import eval_suite
import export_hf
from conftest import make_tiny_model
from llama_fineweb import checkpoint, hellaswag
from llama_fineweb.tokenizer import EOT, N_VOCAB, get_encoding
from model import model_config
from runs import call_main

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the cat dog ran over a hill and then sat under tree while birds sang loudly in "
         "morning light river stone slowly quiet green").split()


def make_examples(n: int, seed: int = 0) -> list[dict]:
    """HellaSwag-shaped examples: a context, four endings of different lengths, a label."""
    rng = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    return [{"ind": i, "ctx": words(8).capitalize(), "label": rng.randrange(4),
             "endings": [words(rng.randint(1, 7)) + "." for _ in range(4)]} for i in range(n)]


def write_task(task_dir: Path, name: str, examples: list[dict], dataset: str | None = None) -> Path:
    """A multiple-choice task YAML scored like hellaswag.py (context, then " " + ending) over a
    local jsonl in HellaSwag's form; `dataset` names a hub dataset instead."""
    task_dir.mkdir(parents=True, exist_ok=True)
    data = task_dir / f"{name}.jsonl"
    data.write_text("".join(json.dumps(ex) + "\n" for ex in examples))
    source = (f"dataset_path: {dataset}\n" if dataset else
              f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    validation: {data}\n")
    metric = "  - metric: {}\n    aggregation: mean\n    higher_is_better: true\n"
    (task_dir / f"{name}.yaml").write_text(
        f"task: {name}\n{source}validation_split: validation\noutput_type: multiple_choice\n"
        'doc_to_text: "{{ctx}}"\ndoc_to_choice: "{{endings}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n" + metric.format("acc") + metric.format("acc_norm"))
    return data


def run_main(*args: str) -> None:
    eval_suite.main([*args, "--device", "cpu", "--batch_size", "8"])


def scores(path: Path) -> dict:
    return json.loads(path.read_text())["scores"]


@pytest.fixture(scope="module")
def mc_run(tmp_path_factory):
    """A tiny checkpoint and a 24-example local task, evaluated once by eval_suite.py with the
    per-example log-likelihoods logged. The wide init makes the endings' losses differ by far more
    than float noise, so the scores depend on which example is which."""
    tmp = tmp_path_factory.mktemp("mc")
    model = make_tiny_model(init_std=0.1)
    ckpt = tmp / "weights"
    export_hf.save_weights(model, ckpt)  # our weights and config: --checkpoint reads them too
    data = write_task(tmp / "tasks", "local_mc", make_examples(24))
    out = tmp / "result.json"
    run_main("--checkpoint", str(ckpt), "--tasks", "local_mc", "--include_path", str(tmp / "tasks"),
             "--out", str(out), "--log_samples")
    return {"model": model, "data": data, "out": out, "ckpt": ckpt}


def logged_samples(out: Path) -> dict:
    rows = [json.loads(line) for line in out.with_suffix(".samples.jsonl").read_text().splitlines()]
    return {row["id"]: row for row in rows}


def reference_logliks(model, examples: list[dict]) -> np.ndarray:
    """Per example and ending, an independent computation of lm-eval's multiple-choice score: the
    summed float64 log-probability of the ending's tokens (" " + ending) after the context."""
    enc = get_encoding()
    rows = []
    with torch.no_grad():
        for ex in examples:
            ctx = enc.encode_ordinary(ex["ctx"])
            loglik = []
            for ending in ex["endings"]:
                tokens = ctx + enc.encode_ordinary(" " + ending)
                logprobs = F.log_softmax(model(torch.tensor([tokens]))[0, :-1].double(), dim=-1)
                targets = torch.tensor(tokens[1:])
                loglik.append(logprobs[torch.arange(len(targets)), targets][len(ctx) - 1:].sum().item())
            rows.append(loglik)
    return np.array(rows)


def test_per_example_logliks_equal_our_models(mc_run):
    """Each example's logged per-choice log-likelihoods equal the independent float64 computation
    to 1e-6 (relative), matched by the example's own id; acc and acc_norm, per example and in
    total, are the argmax of those (acc_norm over the ending's characters)."""
    examples = hellaswag.load_examples(str(mc_run["data"]))
    reference = reference_logliks(mc_run["model"], examples)
    logged = logged_samples(mc_run["out"])
    assert sorted(logged) == [ex["ind"] for ex in examples]
    got = np.array([logged[ex["ind"]]["loglikelihoods"] for ex in examples])
    np.testing.assert_allclose(got, reference, rtol=1e-6, atol=0)
    # The model tells the examples apart: the endings' scores differ by far more than the tolerance.
    assert np.ptp(reference, axis=1).min() > 0.1
    chars = np.array([[len(e) for e in ex["endings"]] for ex in examples], dtype=float)
    acc = [int(np.argmax(row) == ex["label"]) for row, ex in zip(reference, examples)]
    acc_norm = [int(np.argmax(row / c) == ex["label"]) for row, c, ex in zip(reference, chars, examples)]
    assert [logged[ex["ind"]]["acc"] for ex in examples] == acc
    assert [logged[ex["ind"]]["acc_norm"] for ex in examples] == acc_norm
    total = scores(mc_run["out"])["local_mc"]
    assert total["acc"] == pytest.approx(np.mean(acc), abs=1e-12)
    assert total["acc_norm"] == pytest.approx(np.mean(acc_norm), abs=1e-12)


def test_per_example_logliks_equal_hellaswag_py(mc_run):
    """The same examples in HellaSwag's jsonl form: eval_suite.py's per-choice log-likelihoods are
    hellaswag.py's summed ending losses, negated, to 1e-6."""
    examples = hellaswag.load_examples(str(mc_run["data"]))
    sums, _ = hellaswag.ending_losses(mc_run["model"], examples, "cpu", batch_size=4)
    logged = logged_samples(mc_run["out"])
    got = np.array([logged[ex["ind"]]["loglikelihoods"] for ex in examples])
    np.testing.assert_allclose(got, -sums.double().numpy(), rtol=1e-6, atol=0)


def test_acc_equals_hellaswag_py(mc_run):
    """The same examples in HellaSwag's jsonl form: eval_suite.py's acc is hellaswag.py's acc."""
    examples = hellaswag.load_examples(str(mc_run["data"]))
    ours = hellaswag.evaluate(mc_run["model"], examples, "cpu", batch_size=4, progress=False)
    result = json.loads(mc_run["out"].read_text())
    assert result["scores"]["local_mc"]["acc"] == pytest.approx(ours["acc"], abs=1e-12)
    assert result["n_samples"]["local_mc"] == ours["n"] == 24
    assert mc_run["out"].with_suffix(".md").is_file()


def test_to_llama_shares_our_tensors_and_logits(tiny_model):
    """The model handed to lm-eval holds our tensors (no copy) and computes our logits."""
    ours = tiny_model()
    hf_model = eval_suite.to_llama(ours)
    assert hf_model.lm_head.weight.data_ptr() == ours.output.weight.data_ptr()
    assert hf_model.model.layers[1].mlp.up_proj.weight.data_ptr() == ours.layers[1].feed_forward.w3.weight.data_ptr()
    idx = torch.randint(0, N_VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(idx).logits, ours(idx), rtol=0, atol=1e-5)
    assert (hf_model.config.eos_token_id, hf_model.generation_config.eos_token_id) == (EOT, EOT)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, straight) -> dict:
    """A copy of the shared reference run (checkpoints at steps 5, 10 and 12, 256 tokens a step),
    and a local task."""
    tmp = tmp_path_factory.mktemp("run")
    out = tmp / "out"
    shutil.copytree(straight, out, symlinks=True)
    write_task(tmp / "tasks", "local_mc", make_examples(8))
    return {"out": out, "tasks": tmp / "tasks"}


def all_steps_args(run: dict) -> list[str]:
    return ["--checkpoint", str(run["out"]), "--all_steps", "--tasks", "local_mc", "--include_path", str(run["tasks"]),
            "--device", "cpu", "--batch_size", "8"]


def all_steps(run: dict) -> subprocess.CompletedProcess:
    """`eval_suite.py --all_steps` on the run, as eval_suite.main in this process."""
    return call_main(eval_suite.main, all_steps_args(run))


def all_steps_under_torchrun(run: dict, nproc: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "eval_suite.py"), *all_steps_args(run)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_all_steps_under_torchrun_writes_each_result_and_a_plot(tiny_run):
    """Two processes split a run's three checkpoints: three results, then the run's summary and plot."""
    all_steps_under_torchrun(tiny_run, nproc=2)
    results = sorted(tiny_run["out"].glob("step_*/lm_eval_*.json"))
    assert [p.parent.name for p in results] == ["step_0000005", "step_0000010", "step_0000012"]
    summary_path = next(tiny_run["out"].glob("lm_eval_*.json"))
    summary = json.loads(summary_path.read_text())
    assert [(s["step"], s["tokens_seen"]) for s in summary["steps"]] == [(5, 1280), (10, 2560), (12, 3072)]
    assert all(0 <= s["scores"]["local_mc"]["acc"] <= 1 for s in summary["steps"])
    assert summary_path.with_suffix(".png").stat().st_size > 0
    assert summary_path.with_suffix(".md").is_file()


def test_all_steps_again_evaluates_nothing(tiny_run):
    """A second --all_steps with the same settings evaluates no checkpoint again."""
    if not list(tiny_run["out"].glob("step_*/lm_eval_*.json")):
        all_steps(tiny_run)
    before = {p: p.stat().st_mtime_ns for p in tiny_run["out"].glob("step_*/lm_eval_*.json")}
    proc = all_steps(tiny_run)
    assert "3 already evaluated with these settings, 0 to evaluate" in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_run_summary_keeps_steps_whose_checkpoints_were_pruned(tiny_run, tmp_path):
    """A step evaluated earlier stays in the run's summary after keep_last deletes its checkpoint."""
    if not list(tiny_run["out"].glob("step_*/lm_eval_*.json")):
        all_steps(tiny_run)
    pruned = tiny_run["out"] / "step_0000005"
    pruned.rename(tmp_path / pruned.name)
    try:
        all_steps(tiny_run)
    finally:
        (tmp_path / pruned.name).rename(pruned)
    summary = json.loads(next(tiny_run["out"].glob("lm_eval_*.json")).read_text())
    assert [s["step"] for s in summary["steps"]] == [5, 10, 12]


def save_released_style(hf_model, out_dir: Path) -> None:
    """A HF Llama directory as DMaS-LLaMa-Lite released theirs: vocab 50257, untied, float32,
    sharded safetensors, bos 1 / eos 2 in config.json and generation_config.json."""
    hf_model.save_pretrained(out_dir, max_shard_size="5MB")
    assert len(list(out_dir.glob("*.safetensors"))) > 1
    generation = json.loads((out_dir / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)


def test_hf_dir_scores_equal_checkpoint_scores(tmp_path, hf_llama):
    """--hf on a released-style directory scores exactly as the same weights through --checkpoint."""
    hf_dir = tmp_path / "hf"
    save_released_style(hf_llama(model_config("tiny", vocab_size=N_VOCAB), bos_token_id=1, eos_token_id=2), hf_dir)
    ckpt = tmp_path / "ours"
    export_hf.save_weights(export_hf.load_hf(str(hf_dir), pad_vocab_to=None), ckpt)
    write_task(tmp_path / "tasks", "local_mc", make_examples(12, seed=1))
    common = ["--tasks", "local_mc", "--include_path", str(tmp_path / "tasks")]
    run_main("--hf", str(hf_dir), "--out", str(tmp_path / "hf.json"), *common)
    run_main("--checkpoint", str(ckpt), "--out", str(tmp_path / "ckpt.json"), *common)
    assert scores(tmp_path / "hf.json") == scores(tmp_path / "ckpt.json")


def test_generation_ends_at_endoftext_not_token_2(tmp_path, hf_llama):
    """A released-style directory naming eos 2 ("#") generates past "#": GPT-2's 50256 ends text."""
    hf_dir = tmp_path / "hf"
    hf_model = hf_llama(model_config("tiny", vocab_size=N_VOCAB), bos_token_id=1, eos_token_id=2)
    with torch.no_grad():  # every hidden state points along dimension 0, whose only reader is token 2
        hf_model.model.embed_tokens.weight[:, 0] = 10.0
        hf_model.model.norm.weight.zero_()
        hf_model.model.norm.weight[0] = 1.0
        hf_model.lm_head.weight.zero_()
        hf_model.lm_head.weight[2, 0] = 100.0
    save_released_style(hf_model, hf_dir)
    model = eval_suite.load_hf_dir(hf_dir, torch.device("cpu"))
    tokenizer = eval_suite.gpt2_tokenizer()
    out = model.generate(torch.tensor([tokenizer.encode("The cat")]), max_new_tokens=4, do_sample=False)
    assert tokenizer.decode(out[0, 2:]) == "####"
    assert (tokenizer.eos_token_id, model.generation_config.eos_token_id) == (EOT, EOT)


def test_task_that_cannot_load_offline_names_include_path(tmp_path, monkeypatch, capsys):
    """A task whose dataset is on the hub fails offline with one line that names --include_path."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty_cache"))
    write_task(tmp_path / "tasks", "hub_task", make_examples(2), dataset="no-such-org/no-such-dataset")
    with pytest.raises(SystemExit) as exit_info:
        run_main("--checkpoint", str(tmp_path / "never_loaded"), "--tasks", "hub_task",
                 "--include_path", str(tmp_path / "tasks"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "could not load task(s) hub_task" in err[0] and "--include_path" in err[0], err


def test_local_task_without_its_data_says_how_to_fetch_it(tmp_path, monkeypatch, capsys):
    """hellaswag_local with no data/hellaswag_val.jsonl: one line giving the fetch command, not the
    --include_path just passed."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(Path(eval_suite.__file__).parent / "tasks", tmp_path / "tasks")
    with pytest.raises(SystemExit) as exit_info:
        run_main("--checkpoint", str(tmp_path / "never_loaded"), "--tasks", "hellaswag_local",
                 "--include_path", "tasks")
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1, err
    assert "reads data/hellaswag_val.jsonl, which does not exist" in err[0] and "curl -L -o" in err[0]
    assert "--include_path" not in err[0]


def test_all_steps_cache_and_summary_follow_the_task_data_and_the_run(tmp_path, straight):
    """(d) an --out that is a directory fails before any evaluation; (a) changed task data is evaluated
    afresh; (c) a result survives its checkpoint's pruning before the summary; (b) a run started over in
    the same directory does not inherit the old run's points."""
    run = {"out": tmp_path / "out", "tasks": tmp_path / "tasks"}
    run["out"].mkdir()
    shutil.copytree(straight / "step_0000012", run["out"] / "step_0000012")
    write_task(run["tasks"], "local_mc", make_examples(4))
    proc = call_main(eval_suite.main, [*all_steps_args(run), "--out", str(tmp_path)], check=False)
    assert proc.returncode == 2 and "is a directory" in proc.stderr and "evaluate:" not in proc.stdout
    assert not list(run["out"].rglob("lm_eval_*"))
    assert "0 already evaluated" in all_steps(run).stdout
    write_task(run["tasks"], "local_mc", make_examples(4, seed=5))  # same task name, other data
    assert "0 already evaluated with these settings, 1 to evaluate" in all_steps(run).stdout
    summary = max(run["out"].glob("lm_eval_*.json"), key=lambda p: p.stat().st_mtime_ns)
    summary.unlink()  # as if keep_last pruned the step before the summary was written
    shutil.rmtree(run["out"] / "step_0000012")
    shutil.copytree(straight / "step_0000010", run["out"] / "step_0000010")
    all_steps(run)
    assert [s["step"] for s in json.loads(summary.read_text())["steps"]] == [10, 12]
    checkpoint.start_over(run["out"], "archive")  # a new run in the same out_dir
    shutil.copytree(straight / "step_0000005", run["out"] / "step_0000005")
    meta = json.loads((run["out"] / "step_0000005" / "meta.json").read_text())
    (run["out"] / "step_0000005" / "meta.json").write_text(json.dumps({**meta, "run_id": "new-run"}))
    all_steps(run)
    assert [s["step"] for s in json.loads(summary.read_text())["steps"]] == [5]


def test_a_checkpoint_smaller_than_gpt2s_vocabulary_is_one_line(tmp_path, monkeypatch):
    """Our 256-token tiny model on the evaluation script: one line naming its vocab_size, exit 2."""
    export_hf.save_weights(make_tiny_model(vocab_size=256), tmp_path / "weights")
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    proc = call_main(eval_suite.main, ["--checkpoint", str(tmp_path / "weights"), "--tasks", "hellaswag_sample",
                                       "--include_path", "tasks", "--limit", "2", "--device", "cpu",
                                       "--out", str(tmp_path / "result.json")], check=False)
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert proc.returncode == 2 and len(errors) == 1 and "vocab_size=256" in errors[0], proc.stderr[-2000:]
    assert not (tmp_path / "result.json").exists()
