"""reproduce.py: a tiny run against three stand-in reference checkpoints (Hugging Face Llama
directories written by our export, their configs naming bos/eos 1/2 as the released ones do), each
number checked against transformers' own forward on the same data."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import reproduce
from conftest import make_tiny_model
from export_hf import save_hf
from llama_fineweb import checkpoint
from llama_fineweb import reproduction as rp
from llama_fineweb.hellaswag import load_examples
from llama_fineweb.utils import UserError
from runs import ROOT, SEQ, call_main, one_line

STEPS = (5, 10, 12)  # the `straight` run's checkpoints; 8 x 32 = 256 tokens per step
TOKENS_PER_STEP = 8 * SEQ
SAMPLE = ROOT / "tests" / "data" / "hellaswag_sample.jsonl"
LIMIT = 8
VAL_SEQUENCES = 5  # the `straight` run's --val_sequences, which reproduce.py takes over
RESAMPLES = 300


def stand_in(path: Path, seed: int) -> Path:
    """A random tiny model exported as a Hugging Face Llama with GPT-2's 50257 tokens, its config and
    generation config declaring bos 1 / eos 2 as the released checkpoints do."""
    save_hf(make_tiny_model(seed, max_seq_len=SEQ), path, vocab_size=50257)
    for name in ("config.json", "generation_config.json"):
        config = json.loads((path / name).read_text())
        (path / name).write_text(json.dumps({**config, "bos_token_id": 1, "eos_token_id": 2}))
    return path


def command(straight: Path, references: str, out: Path) -> list[str]:
    return [f"--run={straight}", f"--reference={references}", f"--reference_tokens_per_step={TOKENS_PER_STEP}",
            f"--out={out}", f"--hellaswag_data={SAMPLE}", "--tasks=hellaswag_sample",
            f"--include_path={ROOT / 'tasks'}", f"--limit={LIMIT}", f"--n_resamples={RESAMPLES}",
            "--batch_size=4", "--device=cpu"]


@pytest.fixture(scope="module")
def made(tmp_path_factory, straight):
    """The stand-ins, the report directory and the stdout of two identical reproduce.py calls."""
    root = tmp_path_factory.mktemp("reproduce")
    refs = {step: stand_in(root / f"ref_{step}", seed) for seed, step in enumerate(STEPS, start=7)}
    argv = command(straight, ",".join(f"{p}@{s}" for s, p in refs.items()), root / "report")
    first = call_main(reproduce.main, argv)
    second = call_main(reproduce.main, argv)
    return {"refs": refs, "out": root / "report", "first": first.stdout, "second": second.stdout,
            "report": json.loads((root / "report" / "reproduction.json").read_text())}


def stored(out: Path, label: str) -> dict:
    """The per-example results the cache keeps for one checkpoint."""
    (path,) = (out / "cache").glob(f"{label}_*.json")
    return json.loads(path.read_text())["results"]


def transformers_scores(hf_dir: Path, data_dir: Path) -> dict[str, list[float]]:
    """Per-example scores computed independently: transformers' forward, GPT-2's transformers
    tokenizer, the validation windows read with numpy, lm-eval's acc_norm written out by hand."""
    from transformers import AutoModelForCausalLM, GPT2TokenizerFast

    from llama_fineweb.tokenizer import vocab_file

    model = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True, dtype=torch.float32).eval()
    tok = GPT2TokenizerFast(str(vocab_file("encoder.json")), str(vocab_file("vocab.bpe")))
    (val,) = sorted(data_dir.glob("*_val_*.npy"))
    tokens = np.load(val).astype(np.int64)
    windows = torch.from_numpy(tokens[: VAL_SEQUENCES * (SEQ + 1)].reshape(VAL_SEQUENCES, SEQ + 1))

    def logprobs(ids: list[int]) -> torch.Tensor:  # log p(ids[t + 1] | ids[:t + 1])
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1]
        return torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]

    with torch.no_grad():
        logits = model(windows[:, :-1]).logits
    val_loss = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten(), reduction="none")
    val_loss = val_loss.view(VAL_SEQUENCES, SEQ)
    completion, acc_norm = [], []
    for ex in load_examples(str(SAMPLE), limit=LIMIT):
        ctx, endings = tok.encode(ex["ctx"]), [tok.encode(" " + e) for e in ex["endings"]]
        ctx = ctx[-(SEQ - max(len(e) for e in endings)):]  # the context cut from the left, endings whole
        mean_loss = [-logprobs(ctx + e)[-len(e):].mean().item() for e in endings]
        completion.append(float(int(np.argmin(mean_loss)) == ex["label"]))
        lls = []
        for ending in ex["endings"]:  # lm-eval: the continuation is what `ctx + " " + ending` adds
            context = tok.encode(ex["ctx"])
            continuation = tok.encode(ex["ctx"] + " " + ending)[len(context):]
            ids = (context + continuation)[-(SEQ + 1):]
            lls.append(logprobs(ids)[-len(continuation):].sum().item() / len(ending))
        acc_norm.append(float(int(np.argmax(lls)) == ex["label"]))
    return {"val_loss": val_loss.mean(1).tolist(), "hellaswag_completion": completion,
            "lm_eval/hellaswag_sample/acc_norm": acc_norm}


def assert_same_scores(ours: dict, independent: dict) -> None:
    assert np.allclose(ours["val_loss"], independent["val_loss"], atol=1e-4)
    for name in ("hellaswag_completion", "lm_eval/hellaswag_sample/acc_norm"):
        assert ours[name] == independent[name], name


def test_reference_scores_equal_transformers_forward(made, data_dir):
    """A stand-in's validation losses, HellaSwag (both flavours) equal transformers' on the same data."""
    for step, path in made["refs"].items():
        assert_same_scores(stored(made["out"], f"reference_{step}"), transformers_scores(path, data_dir))


def test_our_scores_equal_transformers_forward(made, straight, data_dir, tmp_path):
    """Our checkpoint's scores equal transformers' forward of its export on the same data."""
    save_hf(checkpoint.load_model(straight / "step_0000010"), tmp_path / "hf")
    assert_same_scores(stored(made["out"], "ours_10"), transformers_scores(tmp_path / "hf", data_dir))


def test_reference_import_has_logit_parity_with_transformers(made):
    """A stand-in as reproduce.py imports it gives transformers' own logits, over its 50,257 tokens."""
    from transformers import AutoModelForCausalLM

    path = made["refs"][5]
    ids = torch.randint(0, 50257, (2, SEQ), generator=torch.Generator().manual_seed(0))
    theirs = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
    with torch.no_grad():
        ours = reproduce.load_reference(path, torch.device("cpu"))(ids)
        expected = theirs(ids).logits
    assert ours.shape == expected.shape == (2, SEQ, 50257)
    assert torch.allclose(ours, expected, atol=1e-4)


def test_without_a_run_the_reference_series_alone(made, data_dir, tmp_path):
    """No --run: the references are reported (here from a copy of the cache), with no verdicts."""
    shutil.copytree(made["out"] / "cache", tmp_path / "cache")
    refs = ",".join(f"{p}@{s}" for s, p in made["refs"].items())
    argv = [a for a in command(Path("unused"), refs, tmp_path) if not a.startswith("--run=")]
    # the run's validation settings, given by hand: the same cache keys
    proc = call_main(reproduce.main, [*argv, f"--val_data={data_dir}", f"--val_sequences={VAL_SEQUENCES}"])
    report = json.loads((tmp_path / "reproduction.json").read_text())
    assert "reproduce: 3 checkpoints, 3 cached" in proc.stdout
    assert report["run"] is None
    assert [(r["step"], r["ours"], r["verdict"]) for r in report["metrics"]["val_loss"]["rows"]] == [
        (s, None, "-") for s in STEPS]


def plain_bootstrap(a: list[float], b: list[float], seed: int) -> tuple[float, float]:
    """One resample at a time: the 2.5th and 97.5th percentiles of the mean paired difference."""
    rng, d = np.random.default_rng(seed), np.asarray(a) - np.asarray(b)
    means = [d[rng.integers(0, len(d), len(d))].mean() for _ in range(RESAMPLES)]
    return tuple(np.percentile(means, [2.5, 97.5]))


def test_intervals_equal_a_plain_bootstrap_of_the_stored_results(made):
    """Every interval in reproduction.json is a plain bootstrap of the cached per-example results."""
    for name, entry in made["report"]["metrics"].items():
        for row in entry["rows"]:
            ours = stored(made["out"], f"ours_{row['our_step']}")[name]
            ref = stored(made["out"], f"reference_{row['step']}")[name]
            assert row["difference"] == pytest.approx(np.mean(ours) - np.mean(ref))
            assert (row["low"], row["high"]) == pytest.approx(plain_bootstrap(ours, ref, 0))


def test_report_has_a_table_per_metric_and_what_the_configs_declare(made):
    """REPRODUCTION.md: a table per metric, each row matched at equal tokens, and bos/eos 1/2 shown."""
    text = (made["out"] / "REPRODUCTION.md").read_text()
    assert [h for h in text.splitlines() if h.startswith("## ")][:3] == [
        "## Validation loss", "## HellaSwag, completion-style acc_norm", "## lm-eval hellaswag_sample acc_norm"]
    rows = made["report"]["metrics"]["val_loss"]["rows"]
    assert [(r["step"], r["our_step"], r["tokens"] == r["our_tokens"]) for r in rows] == [(s, s, True) for s in STEPS]
    assert all(r["verdict"] in ("reproduced", "ahead", "behind") for r in rows)
    assert "| 5 | " + str(made["refs"][5]) + " | 500000.0 | False | 50257 | 1 / 2 | 1 / 2 |" in text
    assert (made["out"] / "reproduction.png").stat().st_size > 0


def test_second_call_reuses_the_cache(made):
    """The same command again evaluates nothing: all six checkpoints come from the cache."""
    assert "reproduce: 6 checkpoints, 0 cached" in made["first"]
    assert "reproduce: 6 checkpoints, 6 cached" in made["second"]
    assert "[rank 0]" not in made["second"]


def test_hub_references_offline_fail_in_one_line(straight, tmp_path):
    """The paper's hub checkpoints with the hub out of reach: one line saying to pass directories."""
    line = one_line(call_main(reproduce.main, [f"--run={straight}", f"--out={tmp_path}",
                                               f"--hellaswag_data={SAMPLE}"], check=False))
    assert "McGill-DMaS/DMaS-LLaMa-Lite-step-2.7k is no local directory, so it is read from the Hugging Face hub" in line
    assert "--reference=DIR@STEP" in line


def test_reference_steps_parse_as_the_hub_names_them():
    """'2.7k' is step 2700; the series comes back ordered by step."""
    refs = rp.parse_references("b@43.5k,a@2.7k,c@100")
    assert [(r.source, r.step) for r in refs] == [("c", 100), ("a", 2700), ("b", 43500)]
    assert [r.step for r in rp.paper_references()][:2] == [2700, 3300]
    with pytest.raises(UserError, match="no @STEP"):
        rp.parse_references("path/without/step")


def test_nearest_checkpoint_and_its_signed_gap():
    """Our checkpoint nearest in tokens is chosen, and the gap is a signed fraction of the reference's."""
    ours = [(1, 100, Path("a")), (2, 210, Path("b")), (3, 300, Path("c"))]
    assert rp.nearest(200, ours) == ((2, 210, Path("b")), 0.05)


@pytest.mark.parametrize("difference, low, high, higher_is_better, expected", [
    (0.02, -0.01, 0.05, True, "reproduced"),   # the interval holds 0
    (0.004, 0.001, 0.007, True, "reproduced"),  # within the tolerance of 0.005
    (0.02, 0.01, 0.03, True, "ahead"),
    (0.02, 0.01, 0.03, False, "behind"),        # a higher loss
    (-0.02, -0.03, -0.01, False, "ahead"),
])
def test_verdicts(difference, low, high, higher_is_better, expected):
    """reproduced when the interval holds 0 or within tolerance, else ahead/behind by the metric's direction."""
    assert rp.verdict(difference, low, high, 0.005, higher_is_better) == expected
