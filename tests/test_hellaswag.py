"""HellaSwag rendering, batched scoring, distributed totals, the --hf CLI, input errors, compile."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import hellaswag as hellaswag_cli
from conftest import make_tiny_model
from llama_fineweb import hellaswag
from llama_fineweb.tokenizer import EOT, get_encoding
from model import model_config
from runs import call_main

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "data" / "hellaswag_sample.jsonl"
# A wide init, so that the endings' losses differ by more than float noise and the predictions
# depend on the tokens.
WIDE = {"init_std": 0.1}


def reference_losses(model: nn.Module, examples: list[dict]) -> torch.Tensor:
    """build-nanogpt's scoring, one unpadded row at a time, in float64 from the model's logits:
    the plain version to compare with. (len(examples), 4) summed ending losses."""
    enc = get_encoding()
    rows = []
    with torch.no_grad():
        for example in examples:
            ctx = enc.encode(example["ctx"])
            sums = []
            for ending in example["endings"]:
                ending_tokens = enc.encode(" " + ending)
                logits = model(torch.tensor([ctx + ending_tokens]))
                predicting = logits[0, len(ctx) - 1 : -1].double()  # the positions that predict the ending
                sums.append(F.cross_entropy(predicting, torch.tensor(ending_tokens), reduction="sum").item())
            rows.append(sums)
    return torch.tensor(rows, dtype=torch.float64)


def reference_predictions(model: nn.Module, examples: list[dict]) -> tuple[list[int], list[int]]:
    """The reference's predictions: lowest summed loss, lowest mean loss per ending token."""
    enc = get_encoding()
    sums = reference_losses(model, examples)
    counts = torch.tensor([[len(enc.encode(" " + e)) for e in ex["endings"]] for ex in examples])
    return sums.argmin(dim=1).tolist(), (sums / counts).argmin(dim=1).tolist()


def test_render_masks_cover_exactly_the_endings():
    """On the fixture, each row is encode(ctx) + encode(' ' + ending), masked exactly on the ending."""
    enc = get_encoding()
    examples = hellaswag.load_examples(str(FIXTURE))
    rendered = [hellaswag.render_example(ex, enc) for ex in examples]
    length = hellaswag.bucketed_length(max(len(c) + max(map(len, e)) for c, e in rendered))
    tokens, mask = hellaswag.make_batch(rendered, length, 4 * len(examples))
    for i, example in enumerate(examples):
        for j, ending in enumerate(example["endings"]):
            row, row_mask = tokens[4 * i + j], mask[4 * i + j]
            ctx = enc.encode(example["ctx"])
            assert row[row_mask].tolist() == enc.encode(" " + ending)
            assert not row_mask[: len(ctx)].any() and row[: len(ctx)].tolist() == ctx
            end = len(ctx) + len(enc.encode(" " + ending))
            assert not row_mask[end:].any() and (row[end:] == EOT).all()


def test_batched_predictions_match_one_at_a_time_reference(tiny_model):
    """Per-example acc and acc_norm predictions of the batched scorer equal the plain reference's."""
    model = tiny_model(**WIDE)
    examples = hellaswag.load_examples(str(FIXTURE), limit=16)
    # 5 does not divide 16: the last batch is padded with empty rows.
    batched = hellaswag.predict(model, examples, "cpu", batch_size=5, max_seq_len=model.config.max_seq_len)
    assert batched == reference_predictions(model, examples)


def test_per_example_losses_match_one_at_a_time_reference(tiny_model):
    """Each example's four summed ending losses (the negated log-likelihoods) from the batched,
    padded, bucketed scorer equal the unpadded one-row reference to 1e-6, on a model whose losses
    tell the examples and endings apart (a near-uniform model would pass with any example order)."""
    model = tiny_model(**WIDE)
    examples = hellaswag.load_examples(str(FIXTURE), limit=16)
    sums, counts = hellaswag.ending_losses(model, examples, "cpu", batch_size=5, max_seq_len=model.config.max_seq_len)
    reference = reference_losses(model, examples)
    torch.testing.assert_close(sums.double(), reference, rtol=1e-6, atol=0)
    enc = get_encoding()
    assert counts.tolist() == [[len(enc.encode(" " + e)) for e in ex["endings"]] for ex in examples]
    # The model tells them apart: within an example the endings differ by far more than the
    # tolerance, and no two examples have the same four losses.
    assert (reference.max(dim=1).values - reference.min(dim=1).values).min() > 0.1
    assert len({tuple(round(x, 3) for x in row) for row in reference.tolist()}) == len(examples)


def _distributed_worker(rank: int, world_size: int, init_file: str, out_dir: str, limit: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        examples = hellaswag.load_examples(str(FIXTURE), limit=limit)
        result = hellaswag.evaluate(
            make_tiny_model(**WIDE), examples, "cpu", batch_size=4, rank=rank, world_size=world_size, progress=False
        )
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_two_processes_give_the_same_totals_as_one(tmp_path, tiny_model):
    """Two gloo ranks splitting the examples (unevenly) report the same totals as one process."""
    limit = 15
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "pg"), str(tmp_path), limit), nprocs=2)
    examples = hellaswag.load_examples(str(FIXTURE), limit=limit)
    single = hellaswag.evaluate(tiny_model(**WIDE), examples, "cpu", batch_size=4, progress=False)
    assert single["n"] == limit
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == single


def test_hf_cli_matches_our_model(tmp_path, hf_llama):
    """`hellaswag.py --hf` on a random LlamaForCausalLM gives our model's accuracies for its weights."""
    from export_hf import load_hf

    hf_dir = tmp_path / "hf"
    hf_llama(model_config("tiny", n_layers=2), initializer_range=0.1).save_pretrained(hf_dir)
    out = tmp_path / "result.json"
    proc = run_cli("--hf", hf_dir, "--data", FIXTURE, "--limit", 8, "--dtype", "float32",
                   "--batch_size", 4, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "acc_norm" in proc.stdout
    from_cli = json.loads(out.read_text())
    examples = hellaswag.load_examples(str(FIXTURE), limit=8)
    ours = hellaswag.evaluate(load_hf(str(hf_dir), "cpu").eval(), examples, "cpu", batch_size=4, progress=False)
    assert {k: from_cli[k] for k in ("acc", "acc_norm", "n")} == ours


def test_checkpoint_cli_matches_in_process_and_writes_beside_it(tmp_path, tiny_model):
    """`--checkpoint RUN_DIR` scores its latest step as evaluate() does and writes hellaswag.json there."""
    from llama_fineweb import checkpoint

    model = tiny_model(n_layers=2, **WIDE)
    step_dir = checkpoint.save(tmp_path, 7, {"model": checkpoint.ModelState(model)})
    proc = run_cli("--checkpoint", tmp_path, "--data", FIXTURE, "--limit", 8, "--batch_size", 8)
    assert proc.returncode == 0, proc.stderr
    from_cli = json.loads((step_dir / "hellaswag.json").read_text())
    examples = hellaswag.load_examples(str(FIXTURE), limit=8)
    ours = hellaswag.evaluate(model, examples, "cpu", batch_size=8, progress=False)
    assert {k: from_cli[k] for k in ("acc", "acc_norm", "n")} == ours


GOOD = FIXTURE.read_text().splitlines()[0]


def _changed(**fields) -> str:
    return json.dumps({**json.loads(GOOD), **fields})


@pytest.mark.parametrize(
    "bad_line, fragment",
    [
        (GOOD[:-10], "malformed JSON"),
        (_changed(label=4), "label must be an integer in 0-3, got 4"),
        (_changed(endings=["one", "two", "three"]), "expected 4 endings, got 3"),
    ],
    ids=["malformed", "label", "endings"],
)
def test_bad_line_is_a_one_line_error_naming_it(tmp_path, bad_line, fragment):
    """Malformed JSON, a label outside 0-3, or 3 endings: a one-line ValueError naming the line."""
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([GOOD, GOOD, bad_line, GOOD]) + "\n")
    with pytest.raises(ValueError) as info:
        hellaswag.load_examples(str(path))
    message = str(info.value)
    assert f"{path} line 3" in message and fragment in message and "\n" not in message


def test_offline_without_local_copy_is_a_one_line_error(tmp_path, monkeypatch):
    """With no cached copy and no network, the error is one line saying to pass --data."""
    monkeypatch.setattr(hellaswag, "DATA_DIR", tmp_path / "cache")
    monkeypatch.setattr(hellaswag, "VAL_URL", "http://127.0.0.1:9/hellaswag_val.jsonl")  # refused at once
    with pytest.raises(FileNotFoundError) as info:
        hellaswag.load_examples()
    assert "--data" in str(info.value) and "\n" not in str(info.value)
    assert not any((tmp_path / "cache").iterdir())  # no partial file left behind


def test_long_context_is_cut_from_the_left(tiny_model):
    """A context longer than max_seq_len keeps its last tokens, the same for all 4 rows, endings whole."""
    enc = get_encoding()
    ctx = " ".join(f"word{i}" for i in range(400))
    example = {"ctx": ctx, "endings": ["a b", "c", "d e f", "g"], "label": 0}
    ctx, endings = hellaswag.render_example(example, enc, max_seq_len=64)
    assert endings == [enc.encode(" " + e) for e in example["endings"]]
    assert len(ctx) + max(map(len, endings)) == 64
    assert ctx == enc.encode(example["ctx"])[-len(ctx):]
    # The full row is longer than the tiny model's 256 positions, which its forward would reject.
    result = hellaswag.evaluate(tiny_model(**WIDE), [example], "cpu", batch_size=1, progress=False)
    assert result["n"] == 1


def test_ending_longer_than_max_seq_len_is_rejected():
    """An ending that leaves no room for context within max_seq_len is a clear ValueError."""
    example = {"ctx": "A man walks.", "endings": ["x " * 300, "b", "c", "d"], "label": 0}
    with pytest.raises(ValueError, match="max_seq_len=256"):
        hellaswag.render_example(example, max_seq_len=256)


def test_bucketed_lengths_are_few_and_bounded():
    """Every length 1..max_seq_len maps to one of max_seq_len/64 padded lengths, >= it, <= the cap."""
    buckets = {hellaswag.bucketed_length(n, 256) for n in range(1, 257)}
    assert buckets == set(range(64, 257, 64))
    assert all(n <= hellaswag.bucketed_length(n, 256) <= 256 for n in range(1, 257))
    assert hellaswag.bucketed_length(250, 240) == 240


class ShapeRecorder(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.shapes: set[tuple[int, ...]] = set()

    def forward(self, idx: torch.Tensor):
        self.shapes.add(tuple(idx.shape))
        return self.model(idx)


def test_compiled_model_matches_eager_on_bucketed_shapes(tiny_model):
    """A torch.compile'd model predicts as eager does, called only with (4 * batch, 64k) shapes."""
    model = tiny_model(n_layers=1, **WIDE)
    examples = hellaswag.load_examples(str(FIXTURE), limit=8)
    eager = hellaswag.predict(model, examples, "cpu", batch_size=3, max_seq_len=256)
    recorder = ShapeRecorder(torch.compile(model))
    compiled = hellaswag.predict(recorder, examples, "cpu", batch_size=3, max_seq_len=256)
    assert compiled == eager
    # 3 batches (3 + 3 + 2 examples, the last padded with empty rows), at most 2 shapes to compile.
    assert len(recorder.shapes) <= 2
    assert all(rows == 12 and length % 64 == 0 for rows, length in recorder.shapes)


def test_eval_compiles_once_per_bucket_and_keeps_the_training_graph(tiny_model):
    """Each padded shape compiles once, a second eval compiles nothing, training stays one graph."""
    stats = {"calls": 0, "compiles": 0}

    def counting_backend(graph_module, example_inputs):
        stats["compiles"] += 1

        def run(*args):
            stats["calls"] += 1
            return graph_module(*args)

        return run

    model = tiny_model(n_layers=1, **WIDE)
    compiled = torch.compile(model, backend=counting_backend)
    tokens = torch.randint(0, EOT, (1, 64))

    def train_step() -> dict:
        before = dict(stats)
        compiled(tokens, tokens).backward()
        return {k: stats[k] - before[k] for k in stats}

    assert train_step() == {"calls": 1, "compiles": 1}
    long_example = {"ctx": " ".join(f"word{i}" for i in range(50)), "endings": ["a", "b", "c", "d"], "label": 0}
    examples = hellaswag.load_examples(str(FIXTURE), limit=7) + [long_example]  # padded to 64 and 128
    recorder = ShapeRecorder(compiled)
    before = dict(stats)
    hellaswag.predict(recorder, examples, "cpu", batch_size=4, max_seq_len=256)
    assert stats["compiles"] - before["compiles"] == len(recorder.shapes) >= 2
    before = dict(stats)
    hellaswag.predict(recorder, examples, "cpu", batch_size=4, max_seq_len=256)
    assert stats["compiles"] == before["compiles"]
    assert train_step() == {"calls": 1, "compiles": 0}


# ----------------------------------------------------------------------------- CLI errors


def run_cli(*args) -> subprocess.CompletedProcess:
    """`hellaswag.py --device cpu ARGS` as hellaswag.main() in this process."""
    return call_main(hellaswag_cli.main, ["--device", "cpu", *map(str, args)], check=False)


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hellaswag.py: error: "), stderr
    return lines[0]


@pytest.mark.parametrize("where", ["directory", "under_a_file"])
def test_unusable_out_is_refused_before_anything_is_loaded(tmp_path, where):
    """--out naming a directory, or a place no file can be created, is one error line before the
    checkpoint is even looked at (rather than a traceback after the whole evaluation)."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a directory would have to be")
    out = tmp_path if where == "directory" else blocker / "result.json"
    proc = run_cli("--checkpoint", tmp_path / "no_such_run", "--data", FIXTURE, "--out", out)
    line = one_error_line(proc.stderr)
    assert str(out) in line and "no_such_run" not in line
    assert proc.returncode == 2


@pytest.fixture
def corrupt_hf_dir(tmp_path, hf_llama):
    """A saved LlamaForCausalLM whose model.safetensors is cut in half."""
    path = tmp_path / "hf"
    hf_llama(model_config("tiny", n_layers=1)).save_pretrained(path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return path


@pytest.mark.parametrize("case", ["malformed_data", "missing_data", "missing_checkpoint", "corrupt_hf_weights"])
def test_data_and_model_errors_are_one_line(tmp_path, request, case):
    """A malformed or missing data file, a missing checkpoint, or truncated --hf weights: exit
    status 2 and one line naming the problem, no traceback."""
    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_text(GOOD + "\n{not json\n")
    source = ["--checkpoint", tmp_path / "no_such_run"]
    data, fragment = FIXTURE, "no_such_run"
    if case == "malformed_data":
        data, fragment = bad_data, f"{bad_data} line 2"
    elif case == "missing_data":
        data, fragment = tmp_path / "missing.jsonl", "missing.jsonl"
    elif case == "corrupt_hf_weights":
        source, fragment = ["--hf", request.getfixturevalue("corrupt_hf_dir")], "not readable safetensors"
    proc = run_cli(*source, "--data", data, "--limit", "4")
    assert fragment in one_error_line(proc.stderr)
    assert proc.returncode == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_under_torchrun_only_rank_zero_prints_the_error(tmp_path):
    """Two ranks (torchrun's environment, gloo) failing to find the checkpoint: rank 0 prints one
    error line, rank 1 prints nothing, both exit with status 2."""
    world = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "hellaswag.py", "--device", "cpu", "--checkpoint", str(tmp_path / "no_such_run"),
           "--data", str(FIXTURE)]
    procs = [
        subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, **world, "RANK": str(rank), "LOCAL_RANK": str(rank)})
        for rank in range(2)
    ]
    (_, err0), (_, err1) = (p.communicate(timeout=300) for p in procs)
    assert err1.strip() == ""
    assert "no_such_run" in one_error_line(err0)
    assert [p.returncode for p in procs] == [2, 2]


def test_a_missing_data_file_says_where_it_comes_from(tmp_path):
    """--data naming a missing file: one line with the command that fetches it, not 'pass --data'."""
    missing = tmp_path / "hellaswag_val.jsonl"
    proc = call_main(hellaswag_cli.main, ["--checkpoint", str(tmp_path), "--data", str(missing)], check=False)
    line = proc.stderr.strip()
    assert proc.returncode == 2 and len(line.splitlines()) == 1, proc.stderr
    assert f"curl -L -o {missing} {hellaswag.VAL_URL}" in line and "pass --data" not in line


def test_a_checkpoint_smaller_than_gpt2s_vocabulary_is_one_line(tmp_path):
    """Our 256-token tiny model cannot read GPT-2 ids: one line naming its vocab_size, exit 2."""
    from llama_fineweb import checkpoint

    checkpoint.save(tmp_path, 1, {"model": checkpoint.ModelState(make_tiny_model(vocab_size=256))})
    proc = call_main(hellaswag_cli.main, ["--checkpoint", str(tmp_path), "--data", str(FIXTURE), "--limit", "2"],
                     check=False)
    line, = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "vocab_size=256" in line and not (tmp_path / "hellaswag.json").exists()
