"""Benchmark contamination audit: which evaluation examples' 13-grams occur in the training shards
(GPT-3's method; llama_fineweb/contamination.py says how).

    python contamination.py --data_dir data/edu_fineweb10B --tasks hellaswag --out contamination.json
    python contamination.py --data_mix data/edu:0.9,data/code:0.1 --tasks hellaswag --out c.json
    python contamination.py --data_dir data/tiny_stdlib --hellaswag_data tests/data/hellaswag_sample.jsonl \
        --out /tmp/c.json --tokenizer_speed            # offline, with the tokenizer's speed beside

Writes the report (JSON: per task the number and share of contaminated examples; per example its
id, how many overlaps, and where the first few occur: n-gram, shard, token offset, document) and
prints its table, the pass's speed in tokens/s and the projected time for 20B tokens. The report
feeds hellaswag.py / eval_suite.py --contamination (clean-subset scores) and fineweb_edu.py
--decontaminate.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np

from llama_fineweb import contamination
from llama_fineweb.dataloader import DataError
from llama_fineweb.mixture import parse_data_mix
from llama_fineweb.tokenizer import get_encoding
from llama_fineweb.utils import UserError, cli_errors, unwritable, write_atomic

PROJECTED_TOKENS = 20e9  # the paper's run


def tokenizer_speed(paths: list[str]) -> float:
    """tokens/s of the tokenizer encoding the same documents' text (one thread), for comparison."""
    enc = get_encoding()
    texts = [enc.decode(np.concatenate(d.tokens).tolist(), errors="replace")
             for d in contamination.documents(paths)]
    t0 = time.perf_counter()
    tokens = sum(len(enc.encode_ordinary(t)) for t in texts)
    return tokens / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="13-gram overlap of evaluation examples with training shards.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data_dir", help="a directory of token shards (its train shards are read)")
    source.add_argument("--data_mix", help="DIR:WEIGHT,... as train_llama.py takes it: every DIR's train shards")
    parser.add_argument("--tasks", default="hellaswag",
                        help="comma-separated: hellaswag (hellaswag.py's files) and lm-eval task names, e.g. "
                             "hellaswag_local or arc_easy (their data must be local: see --include_path)")
    parser.add_argument("--include_path", default=None,
                        help="a directory of lm-eval task YAMLs (e.g. tasks/, whose YAMLs read local files)")
    parser.add_argument("--hellaswag_data", help="a local HellaSwag jsonl, as hellaswag.py --data reads "
                                                 "(default: its cached validation split)")
    parser.add_argument("--out", required=True, help="the JSON report")
    parser.add_argument("--n", type=int, default=contamination.N, help="words per n-gram (default: 13)")
    parser.add_argument("--tokenizer_speed", action="store_true",
                        help="also time the tokenizer encoding the same text, for the speed comparison")
    args = parser.parse_args(argv)
    with cli_errors("contamination.py", (DataError,)):
        if args.n < 1:
            raise UserError(f"--n={args.n}: an n-gram needs at least 1 word")
        problem = unwritable(args.out)
        if problem:
            raise UserError(problem)
        dirs = [args.data_dir] if args.data_dir else [d for d, _ in parse_data_mix(args.data_mix)]
        paths = contamination.train_shards(dirs)
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        data = {"hellaswag": args.hellaswag_data, "include_path": args.include_path}
        index = contamination.build_index(tasks, data, args.n)
        report = contamination.scan(index, paths)
        report["data"] = {"dirs": dirs, "eval": {t: data.get(t) for t in tasks}, "include_path": args.include_path}
        if args.tokenizer_speed:
            report["tokenizer_tokens_per_s"] = tokenizer_speed(paths)
        write_atomic(args.out, json.dumps(report, indent=1) + "\n")
        print(contamination.table(report))
        speed = report["tokens_per_s"]
        line = f"{report['tokens']:,} tokens in {report['seconds']:.1f}s: {speed:,.0f} tokens/s"
        if "tokenizer_tokens_per_s" in report:
            line += f" (the tokenizer encodes {report['tokenizer_tokens_per_s']:,.0f} tokens/s on the same text)"
        hours = PROJECTED_TOKENS / speed / 3600 if speed else float("nan")
        print(f"{line}; projection for {PROJECTED_TOKENS / 1e9:.0f}B tokens at this speed in one process: "
              f"{hours:,.1f} h -> {Path(args.out)}")


if __name__ == "__main__":
    main()
