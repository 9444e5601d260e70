"""Data pipeline speed and memory, side by side with the tokenizer's ceiling and build-nanogpt.

Tokenizing (one parquet in FineWeb-Edu's schema, >= 3M tokens, all methods on the same texts):
  (a) the ceiling: tiktoken's encode_ordinary_batch with one thread per core, texts already in memory
  (b) the reference, build-nanogpt's fineweb.py: a multiprocessing pool of max(1, cores // 4)
      processes mapping its tokenize() over the loaded dataset's rows with chunksize 16 into a
      100M-token buffer, then np.save
  fineweb_edu.py end to end on the parquet (read through datasets, tokenize, write, hash, manifest),
  in-process after a warm-up so imports are not counted, and as a fresh subprocess that counts them.
Loading (one 100M-token shard, B=32 x T=1024): peak resident memory above the process's baseline
and microseconds per batch for our memory-mapped TrainLoader, and for the reference's
DataLoaderLite, which loads a whole shard into an int64 tensor. The shards have no manifest.json,
like build-nanogpt's, so our setup includes fingerprinting them and every batch's token ids are
checked (one max per batch). Each loader runs in a fresh subprocess so its peak is its own. Methods take turns, --repeats times; tokenizing reports the best and the median run, loading the best.

    python benchmarks/bench_data.py
    python benchmarks/bench_data.py --parquet fineweb-edu-part.parquet   # real FineWeb-Edu text
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llama_fineweb.dataloader import shard_name  # noqa: E402
from llama_fineweb.tokenizer import EOT, get_encoding  # noqa: E402


def stdlib_documents(tokens: int, chars: int = 4500) -> list[str]:
    """The standard library's source cut into FineWeb-Edu-sized documents (~4.5k characters)."""
    enc, texts, total = get_encoding(), [], 0
    root = os.path.dirname(os.__file__)
    paths = sorted(glob.glob(os.path.join(root, "*.py"))) + sorted(glob.glob(os.path.join(root, "*", "*.py")))
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            source = f.read()
        for i in range(0, len(source), chars):
            texts.append(source[i:i + chars])
            total += len(enc.encode_ordinary(texts[-1])) + 1
            if total >= tokens:
                return texts
    return texts


def write_parquet(texts: list[str], path: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(texts)
    pq.write_table(pa.table({
        "text": texts, "id": [f"<urn:uuid:{i}>" for i in range(n)], "dump": ["CC-MAIN-2024-10"] * n,
        "url": [f"https://example.org/{i}" for i in range(n)], "file_path": ["s3://x.warc.gz"] * n,
        "language": ["en"] * n, "language_score": [0.9] * n, "token_count": [0] * n,
        "score": [3.0] * n, "int_score": [3] * n,
    }), path)


# build-nanogpt's fineweb.py tokenize(), as it is there
_enc = None


def reference_tokenize(doc: dict) -> np.ndarray:
    global _enc
    _enc = _enc or get_encoding()
    tokens = [EOT]
    tokens.extend(_enc.encode_ordinary(doc["text"]))
    tokens_np = np.array(tokens)
    assert (0 <= tokens_np).all() and (tokens_np < 2**16).all(), "token dictionary too large for uint16"
    return tokens_np.astype(np.uint16)


def reference_build(fw, out_dir: str, processes: int, shard_size: int = 100_000_000) -> int:
    """build-nanogpt's main loop (progress bar left out), over an already-loaded dataset."""
    with mp.Pool(processes) as pool:
        shard_index, token_count = 0, 0
        all_tokens_np = np.empty((shard_size,), dtype=np.uint16)
        for tokens in pool.imap(reference_tokenize, fw, chunksize=16):
            if token_count + len(tokens) < shard_size:
                all_tokens_np[token_count:token_count + len(tokens)] = tokens
                token_count += len(tokens)
            else:
                split = "val" if shard_index == 0 else "train"
                remainder = shard_size - token_count
                all_tokens_np[token_count:token_count + remainder] = tokens[:remainder]
                np.save(os.path.join(out_dir, f"edufineweb_{split}_{shard_index:06d}"), all_tokens_np)
                shard_index += 1
                all_tokens_np[0:len(tokens) - remainder] = tokens[remainder:]
                token_count = len(tokens) - remainder
        if token_count != 0:
            split = "val" if shard_index == 0 else "train"
            np.save(os.path.join(out_dir, f"edufineweb_{split}_{shard_index:06d}"), all_tokens_np[:token_count])
    return shard_index * shard_size + token_count


def timed(run) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def bench_tokenize(args: argparse.Namespace, work: str) -> list[str]:
    import datasets

    import fineweb_edu

    cores = fineweb_edu._cpu_count()
    parquet = args.parquet
    if parquet is None:
        parquet = os.path.join(work, "corpus.parquet")
        write_parquet(stdlib_documents(args.tokens), parquet)
    # the reference loads the whole split before tokenizing; that load is not timed
    fw = datasets.load_dataset("parquet", data_files=[parquet], split="train", cache_dir=os.path.join(work, "cache"))
    texts = fw["text"]
    enc = get_encoding()
    tokens = sum(len(t) + 1 for t in enc.encode_ordinary_batch(texts, num_threads=cores))
    chars = sum(map(len, texts))

    def ours(out: str) -> None:
        fineweb_edu.main(["--local", parquet, "--out", out, "--workers", str(cores),
                          "--cache_dir", os.path.join(work, "cache")])

    load_before = f"{os.getloadavg()[0]:.1f}"
    times: dict[str, list[float]] = {"ceiling": [], "reference": [], "ours": [], "cold": []}
    processes = max(1, cores // 4)
    ref_out = os.path.join(work, "reference")
    os.makedirs(ref_out, exist_ok=True)
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        ours(os.path.join(work, "warm-up"))  # imports, datasets' builder modules, page cache
        for i in range(args.repeats):  # interleaved, so drift in machine load hits every method alike
            times["ceiling"].append(timed(lambda: enc.encode_ordinary_batch(texts, num_threads=cores)))
            times["reference"].append(timed(lambda: reference_build(fw, ref_out, processes)))
            times["ours"].append(timed(lambda: ours(os.path.join(work, f"ours{i}"))))
            if i < 2:  # slow, and there for its startup cost only
                times["cold"].append(timed(lambda: subprocess.run(
                    [sys.executable, os.path.join(REPO, "fineweb_edu.py"), "--local", parquet, "--out",
                     os.path.join(work, f"cold{i}"), "--workers", str(cores), "--cache_dir",
                     os.path.join(work, "cache")], check=True, capture_output=True)))
    assert np.array_equal(np.load(os.path.join(ref_out, shard_name(0))),
                          np.load(os.path.join(work, "ours0", shard_name(0)))), "outputs differ"
    best = {k: min(v) for k, v in times.items()}
    median = {k: statistics.median(v) for k, v in times.items()}

    source = args.parquet or "the standard library's source cut into 4,500-character documents"
    lines = [f"load average before: {load_before}, after: {os.getloadavg()[0]:.1f} (other processes share "
             f"these cores)",
             f"tokenizing: {len(texts):,} documents, {chars:,} characters, {tokens:,} tokens from {source}; "
             f"{cores} cores",
             f"{'':<62} {'--- best of ' + str(args.repeats) + ' ---':^29} {'--- median ---':^19}",
             f"{'method':<62} {'s':>6} {'tokens/s':>11} {'/(a)':>5} {'/(b)':>5} {'s':>6} {'/(a)':>5} {'/(b)':>5}"]
    for key, name in [
        ("ceiling", f"(a) tiktoken encode_ordinary_batch, {cores} threads, in memory"),
        ("reference", f"(b) reference: mp.Pool({processes}) imap chunksize 16 -> 100M buffer"),
        ("ours", f"fineweb_edu.py --workers {cores}, end to end, in process"),
        ("cold", f"fineweb_edu.py --workers {cores}, fresh subprocess incl. imports"),
    ]:
        lines.append(f"{name:<62} {best[key]:6.2f} {tokens / best[key]:11,.0f} "
                     f"{best['ceiling'] / best[key]:5.0%} {best['reference'] / best[key]:4.2f}x "
                     f"{median[key]:6.2f} {median['ceiling'] / median[key]:5.0%} "
                     f"{median['reference'] / median[key]:4.2f}x")
    return lines


def measure_loader(kind: str, data_dir: str, batches: int, batch: int, seq_len: int) -> dict:
    """Run in a fresh subprocess: set up, take `batches` batches, report times and peak RSS."""
    import torch

    def rss_kib(field: str) -> int:
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith(field)).split()[1])

    baseline = rss_kib("VmRSS:")
    started = time.perf_counter()
    if kind == "reference":
        shard = sorted(s for s in os.listdir(data_dir) if "train" in s)[0]
        npt = np.load(os.path.join(data_dir, shard)).astype(np.int32)  # build-nanogpt's load_tokens
        tokens = torch.tensor(npt, dtype=torch.long)
        del npt
        position = 0

        def next_batch():
            nonlocal position
            buf = tokens[position:position + batch * seq_len + 1]
            position += batch * seq_len
            return buf[:-1].view(batch, seq_len), buf[1:].view(batch, seq_len)
    else:
        from llama_fineweb.dataloader import TrainLoader

        loader = TrainLoader(data_dir, seq_len, batch, batch, shuffle=kind != "ours-sequential",
                             vocab_size=50257, prefetch=kind == "ours-prefetch", log=lambda s: None)
        next_batch = loader.next_batch
    setup = time.perf_counter() - started
    waiting = 0.0
    for _ in range(batches):
        started = time.perf_counter()
        x, y = next_batch()
        waiting += time.perf_counter() - started
        if kind == "ours-prefetch":
            time.sleep(0.001)  # stands for the GPU step the prefetch thread overlaps with
    return {"setup_s": setup, "us_per_batch": waiting / batches * 1e6, "peak_mib": rss_kib("VmHWM:") / 1024,
            "above_baseline_mib": (rss_kib("VmHWM:") - baseline) / 1024}


def bench_loader(args: argparse.Namespace, work: str) -> list[str]:
    data_dir = os.path.join(work, "shards")
    os.makedirs(data_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    np.save(os.path.join(data_dir, shard_name(0)), rng.integers(0, 50257, 1_000_000, dtype=np.uint16))
    np.save(os.path.join(data_dir, shard_name(1)), rng.integers(0, 50257, args.loader_tokens, dtype=np.uint16))
    batch, seq_len = 32, 1024
    batches = args.loader_tokens // (batch * (seq_len + 1))
    lines = [f"loading: one {args.loader_tokens:,}-token shard ({args.loader_tokens * 2 / 1e6:,.0f} MB), "
             f"{batches:,} batches of {batch} x {seq_len} (all of it); peak RSS, and above the baseline "
             f"after imports",
             f"{'loader':<66} {'setup s':>8} {'us/batch':>9} {'peak MiB':>9} {'above':>7}"]
    names = {"ours-shuffled": "TrainLoader, memory-mapped, shuffled",
             "ours-sequential": "TrainLoader, memory-mapped, sequential",
             "ours-prefetch": "TrainLoader, shuffled, prefetch (wait/batch beside a 1 ms step)",
             "reference": "reference DataLoaderLite: whole shard loaded as int64"}
    results: dict[str, list[dict]] = {kind: [] for kind in names}
    for _ in range(args.repeats):
        for kind in names:  # interleaved, so drift in machine load hits every loader alike
            run = subprocess.run([sys.executable, __file__, "--measure", kind, data_dir, str(batches)],
                                 check=True, capture_output=True, text=True)
            results[kind].append(json.loads(run.stdout.strip().splitlines()[-1]))
    for kind, name in names.items():
        best = min(results[kind], key=lambda r: r["us_per_batch"])
        peak = max(results[kind], key=lambda r: r["above_baseline_mib"])
        lines.append(f"{name:<66} {min(r['setup_s'] for r in results[kind]):8.2f} "
                     f"{best['us_per_batch']:9.0f} {peak['peak_mib']:9,.0f} {peak['above_baseline_mib']:7,.0f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parquet", default=None, help="a FineWeb-Edu parquet to tokenize (default: stdlib text)")
    parser.add_argument("--tokens", type=int, default=6_000_000, help="corpus size when built from stdlib text")
    parser.add_argument("--loader_tokens", type=int, default=100_000_000, help="tokens the loaders iterate")
    parser.add_argument("--repeats", type=int, default=5, help="runs per measurement (tokenizing: best and median)")
    parser.add_argument("--measure", nargs=3, metavar=("KIND", "DIR", "BATCHES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        kind, data_dir, batches = args.measure
        print(json.dumps(measure_loader(kind, data_dir, int(batches), 32, 1024)))
        return
    with tempfile.TemporaryDirectory() as work:
        lines = bench_tokenize(args, work) + [""] + bench_loader(args, work)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
