"""The benchmark contamination audit (contamination.py) and its uses: clean-subset scores and
decontaminated shards."""

import json
import random

import numpy as np
import pytest
from conftest import make_tiny_model
from runs import call_main
from test_evaluate import make_examples, run_main, write_task
from test_fineweb_edu import build, read_shards

import contamination as contamination_script
import hellaswag as hellaswag_cli
from llama_fineweb import checkpoint, contamination, hellaswag
from llama_fineweb.hellaswag import FORMAT_SAMPLE
from llama_fineweb.tokenizer import EOT, get_encoding

EXAMPLES = hellaswag.load_examples(str(FORMAT_SAMPLE))
FILLER = ("the committee met on tuesday to review the budget and agreed that further study was needed "
          "before any decision could be taken about the new library building ").split()
PLANTED = (100, 107, EXAMPLES[5]["ind"])  # examples whose 13-grams go into the corpus


def source_text(ex: dict) -> str:
    return f"{ex['ctx']} {ex['endings'][ex['label']]}"


def filler(rng: random.Random, k: int) -> str:
    return " ".join(rng.choice(FILLER) for _ in range(k))


def shout(text: str) -> str:
    """The same words as the web might quote them: other case, other punctuation."""
    return " ".join(f"{w.upper()}," if i % 3 == 0 else w.strip(".") for i, w in enumerate(text.split()))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Text files, one document each, built into small shards: filler documents; a 13-word window of
    each PLANTED example's source text (changed case and punctuation) after the val shard (not
    training data), one of them cut by a shard end;
    and near misses that must not count: 12 words of an example, 13 words of a wrong ending."""
    root = tmp_path_factory.mktemp("contamination")
    rng = random.Random(0)
    by_ind = {ex["ind"]: ex for ex in EXAMPLES}
    docs = [filler(rng, 300) for _ in range(6)]
    for k, ind in enumerate(PLANTED):
        window = " ".join(source_text(by_ind[ind]).split()[2:15])
        docs.insert(2 * k + 3, f"{filler(rng, 150 + 40 * k)} {shout(window)} {filler(rng, 60)}")
    near = EXAMPLES[10]
    docs.append(f"{filler(rng, 20)} {' '.join(source_text(near).split()[:12])} {filler(rng, 20)}")
    wrong = next(e for i, e in enumerate(EXAMPLES[12]["endings"]) if i != EXAMPLES[12]["label"])
    docs.append(f"{filler(rng, 20)} {EXAMPLES[12]['ctx'].split()[-1]} {wrong} {filler(rng, 20)}")
    (root / "text").mkdir()
    for i, doc in enumerate(docs):
        (root / "text" / f"doc{i:02d}.txt").write_text(doc)
    data = root / "shards"
    build(data, [str(root / "text" / "*.txt")], shard=550)
    report = root / "report.json"
    proc = call_main(contamination_script.main, ["--data_dir", str(data), "--hellaswag_data", str(FORMAT_SAMPLE),
                                                 "--out", str(report)])
    return {"root": root, "data": data, "docs": docs, "report": json.loads(report.read_text()),
            "report_path": report, "stdout": proc.stdout}


def test_audit_finds_exactly_the_planted_examples(corpus):
    """The planted examples are flagged, by their `ind`, and nothing else (no near miss, no wrong ending)."""
    task = corpus["report"]["tasks"]["hellaswag"]
    assert {e["id"] for e in task["contaminated_examples"]} == {str(i) for i in PLANTED}
    assert task["contaminated"] == 3 and task["share"] == pytest.approx(3 / len(EXAMPLES))
    assert "| hellaswag | 32 | 3 | 9.4% |" in corpus["stdout"]


def test_lm_eval_task_is_audited_like_the_built_in_hellaswag(corpus, tmp_path):
    """The same examples as a local lm-eval task (a YAML over a jsonl, --include_path): the audit
    flags the same examples by their `ind`, at the same places; an unknown task is one line naming
    --include_path."""
    write_task(tmp_path / "tasks", "hellaswag_toy", EXAMPLES)
    report = tmp_path / "report.json"
    proc = call_main(contamination_script.main, ["--data_dir", str(corpus["data"]), "--tasks", "hellaswag_toy",
                                                 "--include_path", str(tmp_path / "tasks"), "--out", str(report)])
    assert "| hellaswag_toy | 32 | 3 | 9.4% |" in proc.stdout
    via_lm_eval = json.loads(report.read_text())["tasks"]["hellaswag_toy"]["contaminated_examples"]
    built_in = corpus["report"]["tasks"]["hellaswag"]["contaminated_examples"]
    assert sorted(via_lm_eval, key=lambda e: e["id"]) == sorted(built_in, key=lambda e: e["id"])
    # Its report decontaminates a build as the built-in one does (the YAMLs' place read from the report).
    out = tmp_path / "clean"
    build(out, [str(corpus["root"] / "text" / "*.txt")], "--decontaminate", str(report), shard=550)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["decontaminated_documents"] == len(PLANTED)
    assert manifest["decontaminate"]["include_path"] == str(tmp_path / "tasks")
    bad = call_main(contamination_script.main, ["--data_dir", str(corpus["data"]), "--tasks", "no_such_task",
                                                "--out", str(tmp_path / "bad.json")], check=False)
    assert bad.returncode == 2 and "no_such_task" in bad.stderr and "--include_path" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_audit_places_each_overlap_at_its_token_offset(corpus):
    """Each reported place (shard, token offset) decodes to text starting with its n-gram's first word,
    also for the document that a shard's end cuts."""
    enc, shards = get_encoding(), dict(read_shards(str(corpus["data"])))
    crossing = 0
    for example in corpus["report"]["tasks"]["hellaswag"]["contaminated_examples"]:
        for place in example["places"]:
            tokens = shards[place["shard"]][place["token_offset"]:place["token_offset"] + 40].tolist()
            assert contamination.words(enc.decode(tokens))[0] == place["ngram"].split()[0]
            crossing += EOT not in shards[place["shard"]][:place["token_offset"]].tolist()
    assert crossing >= 1  # the planted document cut by a shard boundary


def brute_force(docs: list[str], items: list[tuple[str, str]], n: int) -> dict[str, int]:
    """{example id: documents x distinct n-grams of it found there}, by comparing word lists directly."""
    counts = {}
    for example_id, text in items:
        ws = contamination.words(text)
        grams = {tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)} if len(ws) >= n else {tuple(ws)}
        for doc in docs:
            dw = contamination.words(doc)
            found = {g for g in grams for j in range(len(dw) - len(g) + 1) if tuple(dw[j:j + len(g)]) == g}
            if found:
                counts[example_id] = counts.get(example_id, 0) + len(found)
    return counts


def test_audit_agrees_with_a_brute_force_count(tmp_path):
    """With 3-grams over a small vocabulary (many chance overlaps), the per-example overlap counts
    equal a brute-force comparison of word lists."""
    rng = random.Random(1)
    vocab = "a b c d e f g".split()
    items = [(str(i), " ".join(rng.choice(vocab) for _ in range(rng.randint(2, 8)))) for i in range(12)]
    docs = [" ".join(rng.choice(vocab + ["z"]) for _ in range(rng.randint(5, 30))) for _ in range(15)]
    index = contamination.Index(n=3)
    index.add("toy", items)
    tokens = np.concatenate([[EOT, *get_encoding().encode_ordinary(d)] for d in docs]).astype(np.uint16)
    np.save(tmp_path / "x_train_000001.npy", tokens[: len(tokens) // 2])
    np.save(tmp_path / "x_train_000002.npy", tokens[len(tokens) // 2:])
    report = contamination.scan(index, contamination.train_shards([str(tmp_path)]))
    got = {e["id"]: e["overlaps"] for e in report["tasks"]["toy"]["contaminated_examples"]}
    assert got == brute_force(docs, items, 3) and got
    assert report["documents"] == len(docs)


def test_hellaswag_clean_subset_equals_scoring_the_filtered_examples(corpus, tmp_path):
    """hellaswag.py --contamination scores the unflagged examples as evaluate() does on them directly."""
    model = make_tiny_model()
    checkpoint.save(tmp_path, 1, {"model": checkpoint.ModelState(model)})
    out = tmp_path / "h.json"
    call_main(hellaswag_cli.main, ["--device", "cpu", "--checkpoint", str(tmp_path), "--data", str(FORMAT_SAMPLE),
                                   "--contamination", str(corpus["report_path"]), "--out", str(out)])
    clean = [ex for ex in EXAMPLES if ex["ind"] not in PLANTED]
    direct = hellaswag.evaluate(model, clean, "cpu", progress=False)
    got = json.loads(out.read_text())
    assert {k: got["clean"][k] for k in ("acc", "acc_norm", "n")} == direct and got["n"] == len(EXAMPLES)


def test_eval_suite_clean_scores_equal_scoring_the_filtered_examples(tmp_path):
    """eval_suite.py --contamination: a covered task's clean scores equal lm-eval on the unflagged examples."""
    import export_hf

    examples = make_examples(16)
    flagged = {1, 4, 5, 11}
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"n": 13, "tasks": {"hellaswag": {"contaminated_examples": [
        {"id": str(i)} for i in flagged]}}}))
    write_task(tmp_path / "tasks", "hellaswag_toy", examples)
    write_task(tmp_path / "tasks", "toy_clean", [ex for ex in examples if ex["ind"] not in flagged])
    export_hf.save_weights(make_tiny_model(), tmp_path / "w")
    common = ["--checkpoint", str(tmp_path / "w"), "--include_path", str(tmp_path / "tasks")]
    run_main(*common, "--tasks", "hellaswag_toy", "--contamination", str(report), "--out", str(tmp_path / "a.json"))
    run_main(*common, "--tasks", "toy_clean", "--out", str(tmp_path / "b.json"))
    clean = json.loads((tmp_path / "a.json").read_text())["clean_scores"]["hellaswag_toy"]
    direct = json.loads((tmp_path / "b.json").read_text())["scores"]["toy_clean"]
    assert clean["n"] == 12 and clean["acc"] == pytest.approx(direct["acc"]) \
        and clean["acc_norm"] == pytest.approx(direct["acc_norm"])


def test_decontaminated_build_holds_none_of_the_flagged_ngrams(corpus, tmp_path):
    """fineweb_edu.py --decontaminate=REPORT drops the planted documents: the shards hold none of the
    report's n-grams, the other documents are all there, and the manifest counts the drops."""
    out = tmp_path / "clean"
    build(out, [str(corpus["root"] / "text" / "*.txt")], "--decontaminate", str(corpus["report_path"]), shard=550)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["decontaminated_documents"] == len(PLANTED)
    assert manifest["decontaminate"]["tasks"] == ["hellaswag"]
    tokens = np.concatenate([t for _, t in read_shards(str(out))])
    text = contamination.words(get_encoding().decode(tokens.tolist()))
    flagged = {tuple(p["ngram"].split()) for e in corpus["report"]["tasks"]["hellaswag"]["contaminated_examples"]
               for p in e["places"]}
    assert flagged and not flagged & set(contamination.ngrams(text, 13))
    assert int(np.count_nonzero(tokens == EOT)) == len(corpus["docs"]) - len(PLANTED)
