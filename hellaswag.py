"""HellaSwag validation accuracy of a checkpoint or a Hugging Face model (the scoring itself is
llama_fineweb/hellaswag.py, which training calls too).

    python hellaswag.py --checkpoint out/llama_1p7b           # its latest checkpoint
    python hellaswag.py --hf out/llama_1p7b_hf --limit 500    # a transformers model, quick estimate
    torchrun --standalone --nproc_per_node=8 hellaswag.py --checkpoint out/llama_1p7b

With --contamination REPORT (contamination.py's JSON) the examples it flags are left out of a
second score, "clean", printed and written beside the full one. The CLI prints acc and acc_norm
and writes them as JSON (atomically) to `--out`, by default
`hellaswag.json` in the checkpoint's step directory or the `--hf` directory. Where the result
cannot be written (`--out` is a directory, or its place is not writable) it says so before the
evaluation, not after it. Errors a user can fix (missing or malformed data, a checkpoint or model
that does not load, a bad --out) are one line on stderr, exit status 2; under torchrun only rank 0
prints it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from llama_fineweb import checkpoint, contamination
from llama_fineweb.hellaswag import (FORMAT_SAMPLE, default_data_path, evaluate, load_examples, load_hf_model,
                                     model_max_seq_len)
from llama_fineweb.tokenizer import require_gpt2_vocabulary
from llama_fineweb.utils import (DTYPES, Dist, UserError, cli_errors, closed_output_survives, setup_distributed,
                                 teardown_distributed, unwritable, write_atomic)


def _load_model(args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, Path]:
    """The model to evaluate and the directory its result is written to."""
    if args.hf:
        return load_hf_model(args.hf, device), Path(args.hf)
    # resolve() names the step directory that load_model loads (a run directory's `latest`).
    model = checkpoint.load_model(args.checkpoint, device, verify_files=args.verify, lora_base=args.lora_base)
    require_gpt2_vocabulary(model.config.vocab_size, args.checkpoint, "hellaswag.py")
    return model, checkpoint.resolve(args.checkpoint)


def _check_output(path: Path, d: Dist) -> None:
    """UserError on every rank when rank 0 (the one that writes) cannot write `path`: raised now,
    not after the evaluation. Every rank gets rank 0's verdict, so none is left waiting in evaluate."""
    problem = [unwritable(path) if d.is_main else None]
    if d.world_size > 1:
        dist.broadcast_object_list(problem, src=0)
    if problem[0]:
        raise UserError(problem[0])


def clean_examples(examples: list[dict], report_path: str) -> list[dict]:
    """The examples a contamination.py report does not flag (matched by HellaSwag's own `ind`)."""
    flagged = contamination.contaminated_ids(contamination.read_report(report_path), "hellaswag")
    return [ex for i, ex in enumerate(examples) if str(ex.get("ind", i)) not in flagged]


def run(args: argparse.Namespace) -> None:
    d = setup_distributed(args.device)
    try:
        dtype_name = args.dtype or ("bfloat16" if d.device.type == "cuda" else "float32")
        autocast_dtype = None if dtype_name == "float32" else DTYPES[dtype_name]  # float32: no autocast
        if args.out:
            _check_output(Path(args.out), d)
        examples = load_examples(args.data, args.limit)
        clean = clean_examples(examples, args.contamination) if args.contamination else None  # read first: fail fast
        model, result_dir = _load_model(args, d.device)
        path = Path(args.out) if args.out else result_dir / "hellaswag.json"
        if not args.out:
            _check_output(path, d)
        max_seq_len = model_max_seq_len(model)
        if args.compile:
            model = torch.compile(model)
        t0 = time.time()
        result = evaluate(
            model, examples, d.device, batch_size=args.batch_size, autocast_dtype=autocast_dtype,
            rank=d.rank, world_size=d.world_size, max_seq_len=max_seq_len,
        )
        if clean is not None:  # the same scoring on the examples the audit found clean
            result["clean"] = evaluate(
                model, clean, d.device, batch_size=args.batch_size, autocast_dtype=autocast_dtype,
                rank=d.rank, world_size=d.world_size, max_seq_len=max_seq_len,
            ) if clean else {"acc": None, "acc_norm": None, "n": 0}
            result["clean"]["report"] = args.contamination
        seconds = time.time() - t0
        if d.is_main:
            result.update(
                source=str(args.hf or args.checkpoint), data=str(args.data or default_data_path()),
                limit=args.limit, dtype=dtype_name, world_size=d.world_size, seconds=round(seconds, 2),
            )
            write_atomic(path, json.dumps(result, indent=2) + "\n")
            print(
                f"hellaswag: acc {result['acc']:.4f} acc_norm {result['acc_norm']:.4f} on "
                f"{result['n']} examples ({seconds:.1f} s, {result['n'] / seconds:.1f} ex/s) -> {path}"
            )
            if "clean" in result:
                c = result["clean"]
                shown = (f"acc {c['acc']:.4f} acc_norm {c['acc_norm']:.4f}" if c["n"] else "no example is clean")
                print(f"hellaswag: clean subset ({c['n']} of {result['n']} examples, {result['n'] - c['n']} "
                      f"contaminated per {args.contamination}): {shown}")
            if args.data and Path(args.data).resolve() == FORMAT_SAMPLE:
                print(f"hellaswag: note: {args.data} is the tests' 32-example format sample, not HellaSwag: "
                      f"its score means nothing (docs/evaluation.md, HellaSwag: Data)")
    finally:
        teardown_distributed()


def main(argv: list[str] | None = None) -> None:
    with closed_output_survives():  # `| head` or `| true` gone: quiet, and the work is kept
        _main(argv)


def _main(argv: list[str] | None) -> None:
    parser = argparse.ArgumentParser(description="HellaSwag validation accuracy (acc, acc_norm) of a model")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a run directory (its latest checkpoint) or one step directory")
    source.add_argument("--hf", help="a local directory holding a transformers causal LM (GPT-2 vocabulary)")
    parser.add_argument("--lora_base", help="a LoRA run whose base model moved: its new path (checked against the sha256 the run recorded)")
    parser.add_argument("--data", help=f"a local hellaswag_val.jsonl (default: cached at {default_data_path()})")
    parser.add_argument("--limit", type=int, help="only the first N examples, for a quick estimate")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cuda or cpu")
    parser.add_argument("--batch_size", type=int, default=16, help="examples per forward pass (4 rows each)")
    parser.add_argument("--dtype", choices=sorted(DTYPES),
                        help="autocast dtype; float32 = no autocast (default: bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model first")
    parser.add_argument("--out", help="the JSON result (default: hellaswag.json in the step or --hf directory)")
    parser.add_argument("--contamination", metavar="REPORT",
                        help="a contamination.py report: also score the clean subset, the examples it does not flag")
    parser.add_argument("--verify", choices=("full", "size"), default="full",
                        help="check the checkpoint's files against their recorded sha256 (full) or sizes only")
    args = parser.parse_args(argv)
    with cli_errors("hellaswag.py"):
        run(args)


if __name__ == "__main__":
    main()
