"""Is a run on the paper's track? DMaS-LLaMa-Lite's released checkpoints as the reference curve,
our run's checkpoints at the same token counts beside it, each difference with a paired bootstrap
95% interval and a verdict.

    python reproduce.py --run out/llama_1p7b                           # against the paper's ten
    python reproduce.py                                                # the reference series alone
    python reproduce.py --run out/tiny --reference=ref/a@2700,ref/b@3300 --reference_tokens_per_step=256
    torchrun --standalone --nproc_per_node=8 reproduce.py --run_dir out/llama_1p7b  # not --run: torchrun's

Both models do the same work: validation loss on the run's own validation shard (the same
sequences), HellaSwag completion-style (build-nanogpt's score, the paper's in-loop number:
acc_norm by mean loss per ending token) and lm-eval's tasks (default `hellaswag`, reported as its
`acc_norm`: loglikelihood divided by the ending's length in characters, computed by lm-eval itself
from its per-sample log). The reference directories are imported with hf_io.load_hf (the vocabulary
check, no padding of the vocabulary), so they are scored through the same code as our checkpoints;
GPT-2's <|endoftext|> is the end of text whatever their generation_config.json says.

Results are kept per checkpoint in OUT/cache/, keyed by everything that decides a score (the
checkpoint's files, the validation shards and window length, the HellaSwag file, the lm-eval tasks
and version, --limit, the dtype) and reused. The report is OUT/REPRODUCTION.md, reproduction.json
and reproduction.png. Under torchrun the checkpoints are shared out across the processes (one
whole checkpoint per GPU at a time), and rank 0 writes the report.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

import eval_suite
from llama_fineweb import checkpoint, dataloader, hellaswag, hf_io
from llama_fineweb import reproduction as rp
from llama_fineweb.utils import (
    DTYPES,
    UserError,
    cli_errors,
    closed_output_survives,
    unwritable,
    write_atomic,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="compare a run with the paper's released checkpoints")
    # --run_dir as well: torchrun reads a bare --run as an abbreviation of its own --run_path.
    parser.add_argument("--run", "--run_dir", dest="run", default=None,
                        help="our run directory (its step_* checkpoints); without it, the reference series alone")
    parser.add_argument("--reference", default=None,
                        help="ID_OR_DIR@STEP,... (hub ids or local Hugging Face directories); default: the "
                             "paper's ten released checkpoints from the hub")
    parser.add_argument("--reference_tokens_per_step", type=int, default=rp.PAPER_TOKENS_PER_STEP,
                        help="tokens per step of the reference run (default: the paper's 524,288)")
    parser.add_argument("--out", default=None, help="the report's directory (default: RUN/reproduction, "
                                                    "else ./reproduction)")
    parser.add_argument("--val_data", default=None, help="the directory of the validation shards (default: "
                                                         "the run's data_dir)")
    parser.add_argument("--val_sequences", type=int, default=None,
                        help="validation sequences (default: the run's val_sequences, else 640)")
    parser.add_argument("--seq_len", type=int, default=None,
                        help="validation window (default: the run's seq_len, else 1024; capped at every model's)")
    parser.add_argument("--hellaswag_data", default=None, help="hellaswag_val.jsonl (default: download once)")
    parser.add_argument("--tasks", default="hellaswag", help="lm-eval tasks, comma-separated (their acc_norm, "
                                                             "else acc); empty for none")
    parser.add_argument("--include_path", default=None, help="a directory of extra lm-eval task YAMLs")
    parser.add_argument("--limit", type=int, default=None,
                        help="at most N validation sequences and N examples per task: a quick look")
    parser.add_argument("--max_token_gap", type=float, default=0.1,
                        help="compare with our nearest checkpoint only within this fraction of the tokens")
    parser.add_argument("--n_resamples", type=int, default=10_000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="the bootstrap's seed")
    parser.add_argument("--batch_size", type=int, default=16, help="sequences or examples per forward")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="autocast dtype (default: bfloat16 on cuda, float32 on cpu)")
    args = parser.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for name in ("limit", "val_sequences", "seq_len", "n_resamples", "batch_size", "reference_tokens_per_step"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be positive, got {value}")
    if args.max_token_gap < 0:
        parser.error(f"--max_token_gap must be 0 or more, got {args.max_token_gap}")
    args.command = shlex.join(["python", "reproduce.py", *(sys.argv[1:] if argv is None else argv)])
    return args


# ----------------------------------------------------------------------------- the checkpoints


def resolve_references(references: list[rp.Reference]) -> list[tuple[rp.Reference, Path]]:
    """Each reference's local directory: as given, or downloaded from the hub (only here, and only
    when the hub can be reached; otherwise one line saying how to pass local directories)."""
    resolved = []
    for ref in references:
        path = Path(ref.source)
        if path.is_dir():
            resolved.append((ref, path))
            continue
        if path.is_absolute() or ref.source.startswith(".") or ref.source.count("/") != 1:
            raise UserError(f"--reference {ref.source}@{ref.step}: no such directory (and not a hub id "
                            f"OWNER/NAME)")
        offline = eval_suite.hub_offline()
        if offline:
            raise UserError(f"reference {ref.source} is no local directory, so it is read from the Hugging Face "
                            f"hub, which is out of reach ({offline}): download the checkpoints where there is "
                            f"a connection and pass "
                            f"local directories with --reference=DIR@STEP,... (e.g. --reference=step-2.7k@2700)")
        from huggingface_hub import snapshot_download  # noqa: PLC0415 - the real command only

        print(f"reproduce: fetching {ref.source} from the hub", file=sys.stderr, flush=True)
        resolved.append((ref, Path(snapshot_download(ref.source, allow_patterns=["*.json", "*.safetensors"]))))
    return resolved


def run_settings(run_dir: Path | None) -> dict:
    """The train_config of the run's newest checkpoint (its data, window and validation size)."""
    if run_dir is None:
        return {}
    ckpt = checkpoint.resolve(run_dir)
    if ckpt is None:
        raise UserError(f"--run {run_dir} holds no complete checkpoint")
    return checkpoint.read_meta(ckpt).get("train_config", {})


def build_settings(args: argparse.Namespace, train_config: dict, max_lengths: list[int]) -> dict:
    """Everything that decides a score, the same for every checkpoint (part of each cache key)."""
    settings: dict = {"dtype": args.dtype, "limit": args.limit}
    val_data = args.val_data or train_config.get("data_dir")
    if val_data:
        seq_len = min([args.seq_len or train_config.get("seq_len") or 1024, *max_lengths])
        sequences = args.val_sequences or train_config.get("val_sequences") or 640
        if args.limit:
            sequences = min(sequences, args.limit)
        shards = dataloader.shard_paths(val_data, "val")
        settings["val"] = {"data_dir": str(Path(val_data).resolve()), "seq_len": seq_len, "sequences": sequences,
                           "shards": {Path(p).name: dataloader.fingerprint(p) for p in shards}}
    hellaswag_file = Path(args.hellaswag_data) if args.hellaswag_data else hellaswag.default_data_path()
    hellaswag.load_examples(args.hellaswag_data, limit=1)  # downloads it once, or fails now with the fix
    # Contexts cut to the shortest model's window, so both sides of a comparison see the same text.
    settings["hellaswag"] = {"data": checkpoint.file_checksum(hellaswag_file), "max_seq_len": min(max_lengths)}
    if args.tasks:
        import lm_eval  # noqa: PLC0415 - an optional dependency, imported where it is needed

        settings["lm_eval"] = {"tasks": sorted(args.tasks), "version": lm_eval.__version__,
                               "task_files": eval_suite.task_files_digest(args.include_path)}
    return settings


def our_identity(ckpt: Path) -> str:
    meta = checkpoint.read_meta(ckpt)
    files = json.dumps(meta.get("files"), sort_keys=True)
    return f"{meta.get('run_id')}:{meta.get('step')}:{hashlib.sha256(files.encode()).hexdigest()[:16]}"


# ----------------------------------------------------------------------------- one checkpoint


def lm_eval_results(model, manager, args: argparse.Namespace) -> dict[str, list[float]]:
    """Per-example lm-eval scores, "lm_eval/TASK/acc_norm" (or acc), in document order."""
    from lm_eval import simple_evaluate  # noqa: PLC0415
    from lm_eval.models.huggingface import HFLM  # noqa: PLC0415

    hf_model = eval_suite.to_llama(model)
    max_length = hf_model.config.max_position_embeddings
    autocast = None if args.dtype == "float32" else DTYPES[args.dtype]
    lm = HFLM(pretrained=hf_model, tokenizer=eval_suite.gpt2_tokenizer(max_length), batch_size=args.batch_size,
              max_length=max_length, mixed_precision_dtype=autocast, softmax_dtype=torch.float32)
    out = simple_evaluate(model=lm, tasks=args.tasks, limit=args.limit, task_manager=manager, log_samples=True)
    results = {}
    for task, samples in out["samples"].items():
        samples = sorted(samples, key=lambda s: s["doc_id"])
        metric = "acc_norm" if "acc_norm" in samples[0] else "acc"
        results[f"lm_eval/{task}/{metric}"] = [float(s[metric]) for s in samples]
    return results


def evaluate_model(model, settings: dict, examples: list[dict], manager, args: argparse.Namespace) -> dict:
    """{metric: per-example values} for one model, every metric of the settings."""
    autocast = None if args.dtype == "float32" else DTYPES[args.dtype]
    results: dict[str, list[float]] = {}
    if "val" in settings:
        val = settings["val"]
        results["val_loss"] = rp.sequence_losses(model, val["data_dir"], val["seq_len"], val["sequences"],
                                                 args.batch_size, args.device, autocast)
    _, pred_norm = hellaswag.predict(model, examples, args.device, args.batch_size, autocast,
                                     settings["hellaswag"]["max_seq_len"], progress=True)
    results["hellaswag_completion"] = [float(p == ex["label"]) for p, ex in zip(pred_norm, examples)]
    if manager is not None:
        results.update(lm_eval_results(model, manager, args))
    return results


def load_reference(path: Path, device: torch.device):
    hf_io.check_vocabulary(path)
    # Its own vocabulary, unpadded: zero rows would add to the softmax what transformers' forward has not.
    return hf_io.load_hf(path, device, pad_vocab_to=None)


def cache_path(out_dir: Path, label: str, key: str) -> Path:
    return out_dir / "cache" / f"{label.replace('/', '_')}_{key}.json"


# ----------------------------------------------------------------------------- the command


def _main(args: argparse.Namespace) -> None:
    rank, world_size, device = eval_suite._setup_processes(args.device)
    args.device = device
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    run_dir = Path(args.run) if args.run else None
    out_dir = Path(args.out) if args.out else (run_dir / "reproduction" if run_dir else Path("reproduction"))
    if rank == 0:
        problem = unwritable(out_dir / "reproduction.json")
        if problem:
            raise UserError(problem)
    references = rp.parse_references(args.reference) if args.reference else rp.paper_references()
    label = args.reference or "the paper's released checkpoints (McGill-DMaS/DMaS-LLaMa-Lite-step-*)"
    train_config = run_settings(run_dir)
    ours = rp.run_checkpoints(run_dir) if run_dir else []
    if run_dir and not ours:
        raise UserError(f"--run {run_dir}: no checkpoint records the tokens it has seen")
    resolved = resolve_references(references)
    declared = {ref: rp.declared_config(path) for ref, path in resolved}
    max_lengths = [d["max_position_embeddings"] for d in declared.values() if d.get("max_position_embeddings")]
    max_lengths += [checkpoint.read_meta(c)["model_config"]["max_seq_len"] for _, _, c in ours]
    settings = build_settings(args, train_config, max_lengths)

    # The work: every reference, and our checkpoint nearest each (once, within the gap).
    jobs = []  # (label, identity, source, step, tokens, loader)
    matches: dict[int, tuple[int, int, Path] | None] = {}
    for ref, path in resolved:
        tokens = ref.step * args.reference_tokens_per_step
        jobs.append((f"reference_{ref.step}", rp.directory_identity(path), ref.source, ref.step, tokens,
                     lambda p=path: load_reference(p, device)))
        match = None
        if ours:
            candidate, gap = rp.nearest(tokens, ours)
            match = candidate if abs(gap) <= args.max_token_gap else None
        matches[ref.step] = match
    for step, tokens, ckpt in sorted({m for m in matches.values() if m is not None}):
        jobs.append((f"ours_{step}", our_identity(ckpt), str(ckpt), step, tokens,
                     lambda c=ckpt: checkpoint.load_model(c, device, verify_files="size")))

    keys = {job[0]: rp.cache_key(settings, job[1]) for job in jobs}
    cached = {j[0] for j in jobs if cache_path(out_dir, j[0], keys[j[0]]).is_file()}
    pending = [j for j in jobs[rank::world_size] if j[0] not in cached]
    if rank == 0:
        print(f"reproduce: {len(jobs)} checkpoints, {len(cached)} cached, evaluating the rest on {world_size} "
              f"process(es)", flush=True)
    if pending:
        examples = hellaswag.load_examples(args.hellaswag_data, limit=args.limit)
        manager = eval_suite.task_manager(args.tasks, args.include_path) if args.tasks else None
        eval_suite._quiet_lm_eval()
    for name, identity, source, step, tokens, load in pending:
        t0 = time.time()
        model = load().eval()
        results = evaluate_model(model, settings, examples, manager, args)
        del model
        entry = {"label": name, "source": source, "step": step, "tokens": tokens, "identity": identity,
                 "settings": settings, "results": results, "seconds": round(time.time() - t0, 2)}
        path = cache_path(out_dir, name, keys[name])
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(entry) + "\n")
        means = ", ".join(f"{k} {sum(v) / len(v):.4f}" for k, v in results.items())
        print(f"reproduce: [rank {rank}] {name}: {means} ({entry['seconds']:.0f} s)", flush=True)
    if world_size > 1:
        dist.init_process_group("gloo", timeout=timedelta(days=7))
        dist.barrier()
    if rank != 0:
        return

    def point(name: str) -> dict:
        return json.loads(cache_path(out_dir, name, keys[name]).read_text())

    reference_points = [point(f"reference_{ref.step}") for ref, _ in resolved]
    ours_points = [point(f"ours_{matches[ref.step][0]}") if matches[ref.step] else None for ref, _ in resolved]
    report = {"run": str(run_dir) if run_dir else None, "reference_label": label,
              "reference_tokens_per_step": args.reference_tokens_per_step, "max_token_gap": args.max_token_gap,
              "n_resamples": args.n_resamples, "seed": args.seed, "settings": settings, "command": args.command,
              "references": [{"step": ref.step, "source": ref.source, "declared": declared[ref]}
                             for ref, _ in resolved],
              "metrics": {}}
    for metric, note in metrics_of(reference_points[0]["results"]):
        report["metrics"][metric.name] = {
            "title": metric.title, "note": note, "tolerance": metric.tolerance,
            "higher_is_better": metric.higher_is_better,
            "rows": rp.compare(metric, reference_points, ours_points, args.n_resamples, args.seed,
                               unmatched="no match" if run_dir else "-"),
            "reference_steps": rp.reference_steps(metric, reference_points, args.n_resamples, args.seed)}
    paths = rp.write_report(out_dir, report)
    print((out_dir / "REPRODUCTION.md").read_text(), end="")
    print(f"reproduce: wrote {', '.join(str(p) for p in paths)}")


def metrics_of(results: dict) -> list[tuple[rp.Metric, str]]:
    """The metrics present in a checkpoint's results, with how each is scored."""
    found = []
    if "val_loss" in results:
        found.append((rp.Metric("val_loss", "Validation loss", False, rp.TOLERANCES["loss"]),
                      "mean next-token loss per validation sequence, lower is better"))
    found.append((rp.Metric("hellaswag_completion", "HellaSwag, completion-style acc_norm", True,
                            rp.TOLERANCES["accuracy"]),
                  "build-nanogpt's score as the paper logged it: the ending with the lowest mean loss per token"))
    for name in sorted(k for k in results if k.startswith("lm_eval/")):
        _, task, metric = name.split("/")
        found.append((rp.Metric(name, f"lm-eval {task} {metric}", True, rp.TOLERANCES["accuracy"]),
                      f"lm-eval's {metric}" + (": log-likelihood divided by the ending's length in characters"
                                               if metric == "acc_norm" else "")))
    return found


def main(argv: list[str] | None = None) -> None:
    with closed_output_survives():
        args = parse_args(argv)
        with cli_errors("reproduce.py"):
            try:
                _main(args)
            finally:
                if dist.is_initialized():
                    dist.destroy_process_group()


if __name__ == "__main__":
    main()
