import glob
import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import fineweb_edu
from llama_fineweb.dataloader import TrainLoader, val_batches

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from llama_fineweb.tokenizer import EOT, get_encoding  # noqa: E402

SHARD = 3000  # tokens per shard in the small corpus


def fineweb_table(texts: list[str]):
    """A pyarrow table in FineWeb-Edu's schema."""
    import pyarrow as pa

    n = len(texts)
    return pa.table({
        "text": texts, "id": [f"<urn:uuid:{i}>" for i in range(n)], "dump": ["CC-MAIN-2024-10"] * n,
        "url": [f"https://example.org/{i}" for i in range(n)],
        "file_path": ["s3://commoncrawl/x.warc.gz"] * n, "language": ["en"] * n,
        "language_score": [0.9] * n, "token_count": [len(t) // 4 for t in texts],
        "score": [3.1] * n, "int_score": [3] * n,
    })


CORPUS = Path(__file__).parent / "data" / "corpus"


def corpus_texts(chars: int, piece: int = 3000) -> list[str]:
    """Real text shipped with the tests (tests/data/corpus), cut into document-sized pieces: pass
    n over it rotates each file's lines by n, so no two passes give the same documents."""
    files = [path.read_text(encoding="utf-8").splitlines(keepends=True) for path in sorted(CORPUS.iterdir())]
    texts, total, n = [], 0, 0
    while True:
        for lines in files:
            source = "".join(lines[n % len(lines):] + lines[:n % len(lines)])
            for i in range(0, len(source), piece):
                texts.append(source[i:i + piece])
                total += len(texts[-1])
                if total >= chars:
                    return texts
        n += 1


def expected_stream(texts: list[str]) -> np.ndarray:
    enc = get_encoding()
    return np.concatenate([[EOT] + enc.encode_ordinary(t) for t in texts]).astype(np.uint16)


def read_shards(out: str) -> list[tuple[str, np.ndarray]]:
    names = sorted((n for n in os.listdir(out) if n.endswith(".npy")), key=lambda n: n[-10:])
    return [(n, np.load(os.path.join(out, n))) for n in names]


def files_bytes(out: str) -> dict[str, bytes]:
    return {n: open(os.path.join(out, n), "rb").read() for n in sorted(os.listdir(out))}


def build(out, source, *extra, cache=None, shard=SHARD) -> None:
    argv = ["--local", *source, "--out", str(out), "--shard_size", str(shard)]
    fineweb_edu.main(argv + ["--cache_dir", str(cache or out) + "_cache", *extra])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two parquet files in FineWeb-Edu's schema, with the awkward documents first."""
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("corpus")
    long_doc = " ".join(corpus_texts(40_000))  # more tokens than a shard
    special = [
        "", "   \n\t  ", "naïve café — 日本語のテキスト, Ελληνικά, emoji 🤖🚀",
        "special strings stay text: <|endoftext|> and <|endoftext|>", long_doc,
    ]
    texts = special + corpus_texts(150_000, piece=1500)
    pq.write_table(fineweb_table(texts[:40]), root / "part-000.parquet", row_group_size=7)
    pq.write_table(fineweb_table(texts[40:]), root / "part-001.parquet", row_group_size=50)
    return {"glob": str(root / "*.parquet"), "texts": texts, "root": root}


@pytest.fixture(scope="module")
def clean(corpus, tmp_path_factory):
    """An uninterrupted build of the corpus with 2 workers."""
    out = tmp_path_factory.mktemp("clean") / "out"
    build(out, [corpus["glob"]], "--workers", "2")
    return str(out)


def test_round_trip(corpus, clean):
    """Shards concatenate to [EOT] + encode_ordinary(doc) in source order; val first; uint16; manifest matches."""
    shards = read_shards(clean)
    names = [n for n, _ in shards]
    assert names[0] == "edufineweb_val_000000.npy"
    assert names[1:] == [f"edufineweb_train_{i:06d}.npy" for i in range(1, len(names))]
    assert all(a.dtype == np.uint16 and a.ndim == 1 for _, a in shards)
    assert all(len(a) == SHARD for _, a in shards[:-1]) and 0 < len(shards[-1][1]) <= SHARD
    expected = expected_stream(corpus["texts"])
    assert np.array_equal(np.concatenate([a for _, a in shards]), expected)

    manifest = json.load(open(os.path.join(clean, "manifest.json")))
    assert manifest["complete"] and manifest["vocab_size"] == 50257 and manifest["tokenizer"] == "gpt2"
    assert manifest["tokens"] == len(expected) and manifest["documents"] == len(corpus["texts"])
    assert (manifest["next_document"], manifest["next_document_offset"]) == (len(corpus["texts"]), 0)
    for entry, (name, tokens) in zip(manifest["shards"], shards):
        data = open(os.path.join(clean, name), "rb").read()
        assert entry["file"] == name and entry["tokens"] == len(tokens) and entry["bytes"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry["documents"] == int(np.count_nonzero(tokens == EOT))
        assert entry["max_token"] == int(tokens.max())


def test_shards_load_in_the_reference_loader_and_ours(corpus, clean):
    """build-nanogpt's loader (split name in file name, np.load -> int64) and ours read the same tokens."""
    expected = expected_stream(corpus["texts"])
    theirs = {split: sorted(s for s in os.listdir(clean) if split in s) for split in ("train", "val")}
    assert theirs["val"] == ["edufineweb_val_000000.npy"] and "manifest.json" not in theirs["train"]
    loaded = np.concatenate([np.load(os.path.join(clean, s)).astype(np.int32) for s in theirs["train"]])
    assert np.array_equal(loaded, expected[SHARD:])
    loader = TrainLoader(clean, 63, 4, 4, shuffle=False, vocab_size=50257, log=lambda s: None)
    x, y = loader.next_batch()
    assert np.array_equal(x.numpy().ravel(), np.concatenate([expected[SHARD + 64 * i:][:63] for i in range(4)]))
    assert loader.stream.tokens_checked == 0, "the manifest's max_token vouches for every shard"
    assert all("sha256" in s for s in loader.state_dict()["data"]["shards"].values()), "identity read from it"
    x, _ = next(val_batches(clean, 63, 2))
    assert np.array_equal(x[0].numpy(), expected[:63])


def test_workers_do_not_change_a_byte(corpus, clean, tmp_path):
    """--workers 1 gives byte-identical shards and manifest to --workers 2."""
    build(tmp_path / "one", [corpus["glob"]], "--workers", "1")
    assert files_bytes(tmp_path / "one") == files_bytes(clean)


def test_jsonl_and_text_files(tmp_path):
    """jsonl.gz rows and whole text files (one file = one document) are read in glob order."""
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        for text in ["first row", "", "third <|endoftext|> row"]:
            f.write(json.dumps({"content": text}) + "\n")
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "b.txt").write_text("a whole file\n\nis one document\n", encoding="utf-8")
    (tmp_path / "txt" / "a.txt").write_text("sorted before b", encoding="utf-8")
    build(tmp_path / "out", [str(tmp_path / "a.jsonl.gz"), str(tmp_path / "txt" / "*.txt")],
          "--text_column", "content")
    texts = ["first row", "", "third <|endoftext|> row", "sorted before b",
             "a whole file\n\nis one document\n"]
    got = np.concatenate([a for _, a in read_shards(tmp_path / "out")])
    assert np.array_equal(got, expected_stream(texts))


@pytest.fixture(scope="module")
def big(corpus, tmp_path_factory):
    """~1.5M tokens in one parquet, and its uninterrupted build in 100k-token shards."""
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("big")
    parquet = root / "big.parquet"
    pq.write_table(fineweb_table(corpus["texts"] + corpus_texts(4_500_000, piece=4000)), parquet,
                   row_group_size=100)
    build(root / "straight", [str(parquet)], cache=root / "cache", shard=100_000)
    return {"parquet": str(parquet), "straight": root / "straight", "cache": root / "cache"}


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_killed_run_resumes_byte_identical(big, tmp_path, sig):
    """A build killed (SIGKILL or Ctrl-C) after its first shard, then rerun, ends byte-identical to a clean run."""
    out = tmp_path / "killed"
    # fineweb_edu.main, pausing 3 s after the manifest first lists a shard: the signal always lands
    # mid-build, however fast the machine (without the pause, the shards of one tokenizing task
    # can all be written before the test sees the first).
    # SIGINT handled as in a terminal even when the tests run in a background job (which ignores it).
    run_main = f"""
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path.insert(0, {REPO!r})
import fineweb_edu
write = fineweb_edu._write_manifest
def write_then_pause(out_dir, manifest):
    write(out_dir, manifest)
    if len(manifest["shards"]) == 1:
        time.sleep(3)
fineweb_edu._write_manifest = write_then_pause
fineweb_edu.main(sys.argv[1:])
"""
    argv = [sys.executable, "-c", run_main, "--local", big["parquet"], "--out", str(out),
            "--shard_size", "100000", "--workers", "1", "--cache_dir", str(big["cache"])]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    child = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    manifest = out / "manifest.json"
    deadline = time.time() + 60
    while time.time() < deadline and child.poll() is None:
        if manifest.exists() and json.loads(manifest.read_text() or "{}").get("shards"):
            break
        time.sleep(0.002)
    child.send_signal(sig)
    _, err = child.communicate()
    if sig == signal.SIGKILL:
        assert child.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    else:
        assert child.returncode == 130 and "rerun the same command to resume" in err, err[-3000:]
    assert not json.loads(manifest.read_text())["complete"]

    build(out, [big["parquet"]], cache=big["cache"], shard=100_000)
    assert files_bytes(out) == files_bytes(big["straight"])


def test_changed_shard_is_rebuilt(corpus, clean, tmp_path, capsys):
    """A kept shard that no longer matches its sha256 in the manifest is rebuilt, with the ones after it."""
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(clean, out)
    with open(out / "edufineweb_train_000003.npy", "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01")
    os.remove(out / "edufineweb_train_000005.npy")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["complete"] = False
    (out / "manifest.json").write_text(json.dumps(manifest))
    build(out, [corpus["glob"]], cache=clean)
    assert "edufineweb_train_000003.npy is missing or differs" in capsys.readouterr().out
    assert files_bytes(out) == files_bytes(clean)


def test_max_tokens_stops_early_and_extends(corpus, clean, tmp_path):
    """--max_tokens stops mid-document at exactly that many tokens; rerun without it, it ends as a full build."""
    limit = 4 * SHARD + 1234
    out = tmp_path / "short"
    build(out, [corpus["glob"]], "--max_tokens", str(limit), cache=clean)
    got = np.concatenate([a for _, a in read_shards(out)])
    assert np.array_equal(got, expected_stream(corpus["texts"])[:limit])
    assert json.loads((out / "manifest.json").read_text())["complete"]
    build(out, [corpus["glob"]], cache=clean)
    assert files_bytes(out) == files_bytes(clean)


def test_complete_build_is_not_redone(corpus, clean, capsys):
    """Rerunning a complete build with the same arguments checks the shards and writes nothing."""
    before = {n: os.stat(os.path.join(clean, n)).st_mtime_ns for n in os.listdir(clean)}
    build(clean, [corpus["glob"]])
    assert "already complete" in capsys.readouterr().out
    assert before == {n: os.stat(os.path.join(clean, n)).st_mtime_ns for n in os.listdir(clean)}


@pytest.mark.parametrize("case", ["other-options", "no-files", "no-column", "shards-without-manifest"])
def test_user_errors_are_one_line(corpus, clean, tmp_path, capsys, case):
    """Changed options, a glob matching nothing, a missing column, shards without manifest: one line, exit 2."""
    if case == "other-options":
        argv = ["--local", corpus["glob"], "--out", clean, "--shard_size", "5000"]
    elif case == "no-files":
        argv = ["--local", str(tmp_path / "*.parquet"), "--out", str(tmp_path / "o")]
    elif case == "no-column":
        argv = ["--local", corpus["glob"], "--out", str(tmp_path / "o"), "--text_column", "body"]
    else:
        np.save(tmp_path / "edufineweb_val_000000.npy", np.zeros(5, np.uint16))
        argv = ["--local", corpus["glob"], "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as info:
        fineweb_edu.main(argv + ["--cache_dir", str(tmp_path / "cache")])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fineweb_edu.py: error: ") and "\n" not in err


@pytest.mark.parametrize("streaming", [True, False], ids=["streaming", "no_streaming"])
def test_hub_path_reads_a_dataset_laid_out_like_fineweb_edu(corpus, clean, tmp_path, streaming):
    """The hub path (a repo with a sample-10BT config), streaming or not, gives the same shards as --local."""
    import shutil

    repo = tmp_path / "fineweb-edu"
    (repo / "sample" / "10BT").mkdir(parents=True)
    for i, path in enumerate(sorted(glob.glob(corpus["glob"]))):
        shutil.copy(path, repo / "sample" / "10BT" / f"{i:03d}_00000.parquet")
    (repo / "README.md").write_text("---\nconfigs:\n- config_name: sample-10BT\n  data_files:\n"
                                    "  - split: train\n    path: sample/10BT/*\n---\n")
    out = tmp_path / "out"
    fineweb_edu.main(["--dataset", str(repo), "--subset", "sample-10BT", "--out", str(out),
                      "--shard_size", str(SHARD), "--cache_dir", str(tmp_path / "cache")]
                     + ([] if streaming else ["--no_streaming"]))
    assert [n for n, _ in read_shards(out)] == [n for n, _ in read_shards(clean)]
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(read_shards(out), read_shards(clean)))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == {"type": "hub", "dataset": str(repo), "subset": "sample-10BT", "split": "train"}


def test_hub_failure_is_one_line(tmp_path, capsys, monkeypatch):
    """With no network, the hub build fails with one line that says how to pass local files."""
    import datasets
    import huggingface_hub

    # Offline whatever the environment says: both libraries read it once, at import.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        fineweb_edu.main(["--cache_dir", "cache"])
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--local" in lines[0] and "HuggingFaceFW/fineweb-edu" in lines[0]
    assert os.listdir(tmp_path / "data" / "edu_fineweb10B") == [], "the default --out, and nothing in it"


def test_help_documents_every_option():
    """Every command-line option has help text."""
    parser = fineweb_edu.make_parser()
    options = [a for a in parser._actions if a.option_strings]
    assert {o for a in options for o in a.option_strings} >= {
        "--subset", "--local", "--text_column", "--out", "--shard_size", "--max_tokens", "--workers",
        "--no_streaming", "--cache_dir", "--dataset", "--truncate"}
    assert all(a.help and len(a.help) > 10 for a in options)


def test_local_corpus_builds_once(tmp_path, monkeypatch):
    """build_local_corpus makes a val and nine train shards offline (here from tests/data/corpus), which
    load; called again on the complete corpus it returns at once: it reads and tokenizes nothing."""
    out = fineweb_edu.build_local_corpus(str(tmp_path / "local"), max_tokens=1000, log=lambda s: None,
                                         sources=str(CORPUS / "*"))
    manifest = json.loads(open(os.path.join(out, "manifest.json")).read())
    assert manifest["complete"] and manifest["tokens"] == 1000 and len(manifest["shards"]) == 10
    loader = TrainLoader(out, 16, 2, 8, vocab_size=50257, log=lambda s: None)
    x, _ = loader.next_batch()
    assert x.shape == (2, 16)
    stamp = os.stat(os.path.join(out, "manifest.json")).st_mtime_ns

    def refuse(*args, **kwargs):
        raise AssertionError("a complete corpus was built again")

    monkeypatch.setattr(fineweb_edu, "build", refuse)
    monkeypatch.setattr(fineweb_edu, "get_encoding", refuse)
    assert fineweb_edu.build_local_corpus(out, max_tokens=1000, sources=str(CORPUS / "*")) == out
    assert os.stat(os.path.join(out, "manifest.json")).st_mtime_ns == stamp


def one_line_error(capsys, argv: list[str]) -> str:
    """Run main(argv), expecting the one-line error and exit status 2 of utils.cli_errors; return the line."""
    with pytest.raises(SystemExit) as info:
        fineweb_edu.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]  # after the progress bar, if it started
    assert line.startswith("fineweb_edu.py: error: ") and "Traceback" not in err
    return line


def test_smaller_max_tokens_keeps_complete_shards(corpus, clean, tmp_path, capsys):
    """A rerun with a --max_tokens below what the complete shards hold refuses in one line and deletes nothing."""
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(clean, out)
    before = files_bytes(out)
    err = one_line_error(capsys, ["--local", corpus["glob"], "--out", str(out), "--shard_size", str(SHARD),
                                  "--max_tokens", str(2 * SHARD), "--cache_dir", clean + "_cache"])
    assert f"more than --max_tokens {2 * SHARD:,}" in err and "--truncate" in err
    assert files_bytes(out) == before


def test_truncate_cuts_a_build_back_to_max_tokens(corpus, clean, tmp_path):
    """With --truncate, a smaller --max_tokens ends byte-identical to a fresh build with that limit."""
    import shutil

    limit = 2 * SHARD + 500
    shutil.copytree(clean, tmp_path / "cut")
    build(tmp_path / "cut", [corpus["glob"]], "--max_tokens", str(limit), "--truncate", cache=clean)
    build(tmp_path / "fresh", [corpus["glob"]], "--max_tokens", str(limit), cache=clean)
    assert files_bytes(tmp_path / "cut") == files_bytes(tmp_path / "fresh")


@pytest.mark.parametrize("bad", [5, ["a list"], {"a": "dict"}], ids=["number", "list", "dict"])
def test_jsonl_text_that_is_not_a_string_names_file_and_row(tmp_path, capsys, bad):
    """A jsonl row whose text is a number, a list or a dict is one line naming the file and the row."""
    for name, texts in [("a.jsonl", ["one", None, "three"]), ("b.jsonl", ["four", bad, "six"])]:
        (tmp_path / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    err = one_line_error(capsys, ["--local", str(tmp_path / "*.jsonl"), "--out", str(tmp_path / "out"),
                                  "--cache_dir", str(tmp_path / "cache")])
    assert f"line 2 of {tmp_path / 'b.jsonl'} holds {type(bad).__name__} " in err


def test_null_text_is_an_empty_document(tmp_path):
    """A jsonl row whose text is null is an empty document, so document indices stay row indices."""
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n{"text": null}\n\n{"text": "three"}\n')
    build(tmp_path / "out", [str(tmp_path / "a.jsonl")])
    got = np.concatenate([a for _, a in read_shards(tmp_path / "out")])
    assert np.array_equal(got, expected_stream(["one", "", "three"]))


def test_json_list_files_are_read_as_rows(tmp_path):
    """A .json file holding one list of rows gives one document per row, as a JSON-lines file does."""
    (tmp_path / "a.json").write_text(json.dumps([{"text": "one"}, {"text": "two"}], indent=2))
    build(tmp_path / "out", [str(tmp_path / "a.json")])
    got = np.concatenate([a for _, a in read_shards(tmp_path / "out")])
    assert np.array_equal(got, expected_stream(["one", "two"]))


@pytest.mark.parametrize("case", ["out-is-a-file", "out-under-a-file"])
def test_unusable_out_dir_fails_before_any_work(corpus, tmp_path, capsys, monkeypatch, case):
    """An --out that is a regular file, or cannot be created, is one line before the source is read."""
    (tmp_path / "file").write_text("not a directory")
    out = tmp_path / "file" if case == "out-is-a-file" else tmp_path / "file" / "out"
    monkeypatch.setattr(fineweb_edu, "resolve_local_files", lambda _: pytest.fail("read the source"))
    err = one_line_error(capsys, ["--local", corpus["glob"], "--out", str(out)])
    assert str(out) in err


def test_full_disk_is_one_line_that_keeps_the_shards(corpus, tmp_path, capsys, monkeypatch):
    """A disk that fills while a shard is written is one line saying so, the complete shards are kept."""
    import errno

    saved = []

    def save(f, tokens):
        if saved:
            raise OSError(errno.ENOSPC, "No space left on device")
        saved.append(len(tokens))
        np.lib.format.write_array(f, tokens)

    monkeypatch.setattr(fineweb_edu.np, "save", save)
    out = tmp_path / "out"
    err = one_line_error(capsys, ["--local", corpus["glob"], "--out", str(out), "--shard_size", str(SHARD),
                                  "--cache_dir", str(tmp_path / "cache")])
    assert "disk full" in err and "complete shards" in err and "rerun the same command" in err
    assert json.loads((out / "manifest.json").read_text())["shards"][0]["file"] == "edufineweb_val_000000.npy"
