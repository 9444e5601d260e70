"""EleutherAI's lm-evaluation-harness on our checkpoints: one step, every step of a run, or a
Hugging Face Llama directory.

    python eval_suite.py --checkpoint out/llama_1p7b                     # its latest step
    python eval_suite.py --checkpoint out/llama_1p7b/step_0010000 --tasks hellaswag,arc_easy
    python eval_suite.py --checkpoint out/llama_1p7b --all_steps         # every step, then a plot
    torchrun --standalone --nproc_per_node=8 eval_suite.py --checkpoint out/llama_1p7b --all_steps
    python eval_suite.py --hf path/to/DMaS-LLaMa-Lite-step-43500         # a released checkpoint
    python eval_suite.py --checkpoint out/tiny --tasks my_task --include_path my_tasks/ --device cpu

The default suite is zero-shot HellaSwag, ARC-Easy, ARC-Challenge, PIQA, WinoGrande, BoolQ,
OpenBookQA and LAMBADA (OpenAI): the commonsense suite TinyLlama reports for its 1.1B model, plus
LAMBADA as GPT-2 and Pythia report it, so our numbers sit next to theirs; TinyLlama also plots
those seven along its pretraining run, which is what --all_steps draws. All eight are scored by
log-likelihood (no generation, so no decoding settings) and zero-shot (no few-shot sampling). For
the smallest models ARC-Challenge stays near chance and BoolQ near its majority class (0.62).

How the model reaches lm-eval: in memory. Our weights become a `LlamaForCausalLM` that shares
their tensors (no export directory, no second copy) and lm-eval's `HFLM` gets that object together
with GPT-2's tokenizer built from the local vocabulary files. `--hf` loads a directory with
transformers; either way the tokenizer is GPT-2's and the model's bos/eos/pad are forced to
<|endoftext|> (50256): the released DMaS-LLaMa-Lite directories name eos 2 / bos 1 in
generation_config.json, and token 2 is "#", at which generation would otherwise stop. Scores never
read the model's ids: the tokenizer decides what lm-eval prepends (nothing, as GPT-2 adds no BOS;
50256 before an empty context) and the end-of-text stop string of generation tasks.

Scoring matches hellaswag.py: the loss summed over the choice's tokens, the choice with a leading
space, logits over the model's whole vocabulary. `acc` therefore agrees with hellaswag.py on the same
examples; lm-eval's `acc_norm` divides by the choice's length in characters, hellaswag.py's by its
length in tokens, so those differ by design (and lm-eval's own `hellaswag` task also cleans the text
and prefixes the activity label, so its numbers are not hellaswag.py's either).

Outputs, for the settings hashed into KEY: `lm_eval_KEY.json` and `lm_eval_KEY.md` in the step
directory (or the --hf / weights directory), the table on stdout. KEY covers everything that decides
a score: the tasks, few-shot, limit and dtype, the lm-eval version (its task definitions) and the
contents of every file under --include_path (local task YAMLs and their data), so changed task data
is evaluated afresh rather than read from the cache. --out is checked for writability before any
evaluation. With --all_steps, every step_* of the run not yet evaluated with KEY is evaluated, each
result also kept in `lm_eval_KEY_run_RUNID/` of the run directory, where neither keep_last's pruning
nor --start_over reaches it; then the run directory gets `lm_eval_KEY.json` (all steps of the run
whose id the newest checkpoint carries: a run started over in the same directory does not inherit the
old one's points), `.md` and `.png`: each task's accuracy and the validation loss from metrics.jsonl
against tokens seen.

Several GPUs: under torchrun, --all_steps gives each process its share of the checkpoints (one
whole checkpoint per GPU at a time). lm-eval's own data-parallel route (`accelerate launch`) needs
it to load the model from a path itself, which our in-memory hand-over rules out; splitting
checkpoints needs no communication and scales with their number, which is what a run's curve
needs. A single checkpoint runs on one GPU.

Offline: lm-eval's tasks download their datasets from the Hugging Face hub on first use and read
the cache afterwards. When the hub cannot be reached (checked once, in 3 seconds) or HF_HUB_OFFLINE
is set, only the cache is read, so a task that is not there fails at once instead of after half a
minute of retries. tasks/ holds local task YAMLs for --include_path: hellaswag_local (the real
validation file in data/hellaswag_val.jsonl) and hellaswag_sample (the tests' 32-row format sample,
whose score means nothing).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.distributed as dist

from llama_fineweb import checkpoint, contamination, hellaswag, hf_io, metrics
from llama_fineweb.tokenizer import EOT, N_VOCAB, require_gpt2_vocabulary, vocab_file
from llama_fineweb.utils import DTYPES, UserError, cli_errors, closed_output_survives, unwritable, write_atomic
from model import Transformer

DEFAULT_TASKS = ("hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "boolq",
                 "openbookqa", "lambada_openai")
RESULT_PREFIX = "lm_eval_"
# lm-eval warns about these whenever it is handed a model object, which is what we intend.
_EXPECTED_LM_EVAL_WARNINGS = ("`pretrained` model kwarg is not of type `str`",
                              "Passed an already-initialized model through `pretrained`")


# ----------------------------------------------------------------------------- model and tokenizer

@functools.lru_cache(maxsize=4)
def gpt2_tokenizer(model_max_length: int = 1024):
    """GPT-2's tokenizer (bos = eos = unk = <|endoftext|>, no BOS added) from the local,
    sha256-checked vocabulary files: nothing is downloaded."""
    from transformers import GPT2TokenizerFast

    # Positional on purpose: transformers 4.x names them vocab_file/merges_file, 5.x vocab/merges.
    return GPT2TokenizerFast(str(vocab_file("encoder.json")), str(vocab_file("vocab.bpe")),
                             model_max_length=model_max_length)


def _use_gpt2_special_tokens(hf_model) -> list[str]:
    """Point the model's bos/eos/pad ids at <|endoftext|>; the fields that named something else."""
    changed = []
    for holder, name in ((hf_model.config, "config.json"), (hf_model.generation_config, "generation_config.json")):
        for field in ("bos_token_id", "eos_token_id", "pad_token_id"):
            old = getattr(holder, field, None)
            if old is not None and old != EOT:
                changed.append(f"{name} {field}={old}")
            setattr(holder, field, EOT)
    return changed


def to_llama(model: Transformer, source: str = ""):
    """A transformers `LlamaForCausalLM` holding `model`'s own tensors (no copy, all its
    vocabulary rows), on their device, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    device = model.output.weight.device
    config = {k: v for k, v in hf_io.hf_config(model.config).items() if k != "torch_dtype"}
    config = LlamaConfig(**config, name_or_path=source)
    with torch.device("meta"):
        hf_model = LlamaForCausalLM(config)
    hf_model.load_state_dict(hf_io.to_hf_state_dict(model), assign=True)
    # The rotary inverse frequencies are non-persistent buffers, still on meta: rebuild them.
    with torch.device(device):
        hf_model.model.rotary_emb = type(hf_model.model.rotary_emb)(config=config)
    _use_gpt2_special_tokens(hf_model)
    return hf_model.eval()


def load_checkpoint(path: str | Path, device: torch.device, verify: str = "full",
                    lora_base: str | None = None) -> tuple[object, Path, dict]:
    """(LlamaForCausalLM, directory for the results, meta) for a run dir, a step dir, or a
    weights dir written by `export_hf.py --from_hf`; a checkpoint's files are checked against
    their recorded checksums (verify="full") or sizes ("size")."""
    path = Path(path)
    if (path / "model_config.json").is_file():
        model = hf_io.load_weights(str(path), device)
        require_gpt2_vocabulary(model.config.vocab_size, str(path), "eval_suite.py")
        return to_llama(model, str(path)), path, {}
    ckpt = checkpoint.resolve(path)
    if ckpt is None:
        raise UserError(f"{path} holds no complete checkpoint yet")
    model = checkpoint.load_model(ckpt, device, verify_files=verify, lora_base=lora_base)
    require_gpt2_vocabulary(model.config.vocab_size, str(ckpt), "eval_suite.py")
    meta = checkpoint.read_meta(ckpt)
    return to_llama(model, str(ckpt)), ckpt, meta


def load_hf_dir(hf_dir: str | Path, device: torch.device):
    """A local transformers causal LM with GPT-2's token ids, its special ids set to GPT-2's."""
    from transformers import AutoModelForCausalLM

    if not Path(hf_dir, "config.json").is_file():
        raise UserError(f"{hf_dir} is not a Hugging Face model directory (no config.json); "
                        f"pass --checkpoint for our checkpoints")
    hf_io.check_vocabulary(hf_dir)
    hf_model = AutoModelForCausalLM.from_pretrained(str(hf_dir), local_files_only=True, dtype=torch.float32)
    changed = _use_gpt2_special_tokens(hf_model)
    if changed:
        print(f"eval_suite: {hf_dir}: using GPT-2's <|endoftext|> ({EOT}) for bos/eos/pad instead of "
              f"{', '.join(changed)}", file=sys.stderr)
    return hf_model.to(device).eval()


# ----------------------------------------------------------------------------- tasks

class _DropExpected(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_EXPECTED_LM_EVAL_WARNINGS)


def _quiet_lm_eval() -> None:
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    for name in ("lm_eval.models.huggingface", "lm_eval.evaluator"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropExpected) for f in logger.filters):  # once, if main runs again
            logger.addFilter(_DropExpected())


_TRUE = ("1", "true", "yes", "on")


def hub_offline(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub is out of reach (HF_HUB_OFFLINE set, or no connection within
    `timeout` seconds), else None. When out of reach, the offline switches are set for this process,
    so that `datasets` reads its cache at once (a task downloaded before still works) instead of
    retrying the hub for half a minute before it fails."""
    if any(os.environ.get(name, "").lower() in _TRUE for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        reason = "HF_HUB_OFFLINE is set"
    else:
        proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
        url = urlparse(proxy or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
        try:
            socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
            return None
        except OSError as e:
            reason = f"{url.hostname} unreachable ({e.strerror or type(e).__name__})"
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    for module, name in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE")):
        if module in sys.modules:  # imported already (by a caller in this process): it read the switch then
            setattr(sys.modules[module], name, True)
    return reason


def task_manager(tasks: list[str], include_path: str | None):
    """lm-eval's TaskManager, after checking that every task exists and its data loads (so a
    missing dataset fails before any model is loaded)."""
    offline_reason = hub_offline()  # before lm-eval imports `datasets`, which reads the switches once
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise UserError(f"--include_path {include_path} is not a directory")
    manager = None
    if include_path is not None:
        # Indexing lm-eval's own ~14,000 task YAMLs takes seconds: skip it when all tasks are local.
        manager = TaskManager(include_path=include_path, include_defaults=False)
        if not all(t in manager.all_tasks for t in tasks):
            manager = None
    manager = manager or TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks and not Path(t).is_file()]
    if unknown:
        where = f"lm-eval's tasks or {include_path}" if include_path else "lm-eval's tasks"
        raise UserError(f"unknown task {unknown[0]!r} (not in {where}): list them with `lm-eval ls tasks`, "
                        f"or pass --include_path DIR holding its YAML")
    missing = missing_local_data(manager, tasks)
    if missing:
        raise UserError(missing)
    try:
        if hasattr(manager, "load"):
            manager.load(tasks)
        else:  # lm-eval < 0.4.12
            from lm_eval.tasks import get_task_dict

            get_task_dict(tasks, manager)
    except Exception as e:  # noqa: BLE001 - whatever the dataset loader raises offline, the fix is the same
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        offline = f"offline: {offline_reason}; " if offline_reason else ""
        raise UserError(
            f"could not load task(s) {','.join(tasks)} ({offline}{type(e).__name__}: {reason[:200]}): lm-eval's "
            f"tasks read their datasets from the Hugging Face hub, or its cache once downloaded; offline, "
            f"pass --include_path DIR with a task YAML whose data files are local, e.g. --tasks "
            f"hellaswag_local --include_path tasks (docs/evaluation.md: Offline evaluation)"
        ) from None
    return manager


def missing_local_data(manager, tasks: list[str]) -> str | None:
    """The one-line refusal for a local task (dataset_path: json) whose data file is absent, with
    where the file comes from; None when every local file is there."""
    for task in tasks:
        cfg = getattr(manager.task_index.get(task), "cfg", None) or {}
        files = (cfg.get("dataset_kwargs") or {}).get("data_files") if cfg.get("dataset_path") == "json" else None
        names = files.values() if isinstance(files, dict) else [files] if isinstance(files, str) else files or []
        for name in names:
            if isinstance(name, str) and not Path(name).is_file():
                source = (hellaswag.fetch_advice(name) if Path(name).name == "hellaswag_val.jsonl"
                          else "put the file there or edit the task's data_files")
                return (f"task {task} reads {name}, which does not exist (relative to {Path.cwd()}): {source} "
                        f"(docs/evaluation.md: Offline evaluation)")
    return None


def task_files_digest(include_path: str | None) -> str | None:
    """sha256 over the names and contents of every file under include_path (the local task YAMLs and
    their data): part of the settings, so changed task data never reuses old scores."""
    if include_path is None:
        return None
    sha = hashlib.sha256()
    root = Path(include_path)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        sha.update(f"{path.relative_to(root)}\0{checkpoint.file_checksum(path)}\0".encode())
    return sha.hexdigest()


def settings_key(settings: dict) -> str:
    """Eight hex digits naming the settings that change scores (not batch size or device)."""
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


def result_path(directory: Path, key: str) -> Path:
    return directory / f"{RESULT_PREFIX}{key}.json"


def scores_of(results: dict) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lm-eval's results ("acc,none" -> "acc"; groups included)."""
    scores = {}
    for section in ("results", "groups"):
        for task, values in results.get(section, {}).items():
            scores[task] = {k.removesuffix(",none"): v for k, v in values.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return scores


def clean_scores(results: dict, report: dict) -> dict[str, dict]:
    """Per task a contamination report covers (an lm-eval task named after a report's task, e.g.
    hellaswag_local for hellaswag): acc and acc_norm over the examples it does not flag, matched by
    the document's own id (HellaSwag's `ind`), from lm-eval's per-sample scores."""
    scores = {}
    for task, samples in results.get("samples", {}).items():
        covered = [name for name in report["tasks"] if task.startswith(name)]
        if not covered or not samples:
            continue
        flagged = contamination.contaminated_ids(report, covered[0])
        kept = [s for s in samples if str(s["doc"].get("ind", s["doc_id"])) not in flagged]
        metrics = [m for m in ("acc", "acc_norm") if all(m in s for s in samples)]
        scores[task] = {"n": len(kept), "contaminated": len(samples) - len(kept),
                        **{m: (sum(s[m] for s in kept) / len(kept) if kept else None) for m in metrics}}
    return scores


def run_tasks(hf_model, manager, args: argparse.Namespace) -> dict:
    """lm-eval's results dict for one model."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    autocast = None if args.dtype == "float32" else DTYPES[args.dtype]
    max_length = hf_model.config.max_position_embeddings
    lm = HFLM(pretrained=hf_model, tokenizer=gpt2_tokenizer(max_length), batch_size=args.batch_size,
              max_length=max_length, mixed_precision_dtype=autocast,
              # log-probabilities in float32 even when the logits come out of bf16 autocast
              softmax_dtype=torch.float32)
    return simple_evaluate(model=lm, tasks=args.tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                           task_manager=manager, log_samples=bool(args.contamination or args.log_samples))


def sample_rows(results: dict) -> list[dict]:
    """One row per task and example from lm-eval's logged samples: the document's own id (HellaSwag's
    `ind`, else lm-eval's doc_id), the target, each choice's log-likelihood (lm-eval's filtered
    responses: a multiple-choice task's per-choice sums) and the per-example metrics."""
    rows = []
    for task, samples in results.get("samples", {}).items():
        for s in samples:
            responses = s.get("filtered_resps", s.get("resps", []))
            loglik = [r[0] if isinstance(r, (list, tuple)) else r for r in responses]
            rows.append({"task": task, "doc_id": s["doc_id"], "id": s["doc"].get("ind", s["doc_id"]),
                         "target": s.get("target"),
                         "loglikelihoods": [float(x) if isinstance(x, (int, float)) else x for x in loglik],
                         **{m: s[m] for m in ("acc", "acc_norm") if m in s}})
    return rows


# ----------------------------------------------------------------------------- one checkpoint

# One checkpoint's evaluation needs its model, where it came from and where its results go, plus the
# run-wide lm-eval task manager, CLI options and settings key: all distinct, none optional.
def evaluate_model(hf_model, source: Path, meta: dict, out: Path, manager, args: argparse.Namespace,
                   settings: dict) -> dict:
    """Run the tasks on `hf_model`, write out (JSON) and its .md table; the record written."""
    import lm_eval
    from lm_eval.utils import handle_non_serializable, make_table

    t0 = time.time()
    results = run_tasks(hf_model, manager, args)
    seconds = time.time() - t0
    record = {
        "source": str(source), "step": meta.get("step"), "run_id": meta.get("run_id"),
        # older checkpoints keep tokens_seen at the top of meta.json, newer ones under "progress"
        "tokens_seen": meta.get("progress", {}).get("tokens_seen", meta.get("tokens_seen")),
        "settings": settings, "scores": scores_of(results),
        **({"clean_scores": clean_scores(results, args.contamination), "contamination": args.contamination_path}
           if args.contamination else {}),
        "n_samples": {t: n.get("effective") for t, n in results.get("n-samples", {}).items()},
        "lm_eval_version": lm_eval.__version__, "device": str(args.device),
        "batch_size": args.batch_size, "seconds": round(seconds, 2),
        "lm_eval": {k: results[k] for k in ("results", "groups", "versions", "n-shot", "higher_is_better",
                                             "n-samples", "configs") if k in results},
    }
    table = make_table(results) + (make_table(results, "groups") if results.get("groups") else "")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, json.dumps(record, indent=2, default=handle_non_serializable) + "\n")
    write_atomic(out.with_suffix(".md"), f"# lm-eval: {source}\n\n{table}")
    if args.log_samples:
        write_atomic(out.with_suffix(".samples.jsonl"),
                     "".join(json.dumps(r, default=handle_non_serializable) + "\n" for r in sample_rows(results)))
    record["table"] = table
    return record


# ----------------------------------------------------------------------------- every step of a run

def curve_metrics(values: dict[str, float]) -> list[str]:
    """The metrics of a task worth a curve: acc and acc_norm, else its first metric."""
    chosen = [m for m in ("acc", "acc_norm") if m in values]
    return chosen or [m for m in values if not m.split(",")[0].endswith("_stderr")][:1]


def curves(records: list[dict]) -> list[dict]:
    """The records' step, tokens seen and curve metrics only (what the run table and plot show)."""
    return [{"step": r["step"], "tokens_seen": r["tokens_seen"],
             "scores": {t: {m: v[m] for m in curve_metrics(v)} for t, v in r["scores"].items()}}
            for r in records]


def run_table(records: list[dict]) -> str:
    """Markdown: one row per step, a column per task and curve metric."""
    columns = []
    for record in records:
        for task, values in record["scores"].items():
            for metric in values:
                if (task, metric) not in columns:
                    columns.append((task, metric))
    lines = ["| step | tokens seen | " + " | ".join(f"{t} {m}" for t, m in columns) + " |",
             "|---:|---:|" + "---:|" * len(columns)]
    for r in records:
        cells = [f"{r['scores'].get(t, {}).get(m, float('nan')):.4f}" for t, m in columns]
        lines.append(f"| {r['step']} | {r['tokens_seen'] or 0:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@dataclass
class Evaluation:
    """What every checkpoint of one eval_suite.py command shares: its options, the settings that
    decide scores and their key, and this process's place among the ranks that share the work."""

    args: argparse.Namespace
    settings: dict
    key: str
    rank: int
    world_size: int
    device: torch.device

    def task_manager(self):
        """lm-eval's task manager for the tasks asked for, built only where there is work to do."""
        return task_manager(self.args.tasks, self.args.include_path)


def evaluate_run(run_dir: Path, evaluation: Evaluation) -> Path | None:
    """Evaluate every step_* of run_dir not yet evaluated with these settings (this process's share
    of them under torchrun); rank 0 then writes the run's summary, table and plot."""
    args, settings, key = evaluation.args, evaluation.settings, evaluation.key
    rank, world_size = evaluation.rank, evaluation.world_size
    if (run_dir / checkpoint.META).is_file() or not run_dir.is_dir():
        raise UserError(f"--all_steps needs a run directory (holding step_* checkpoints), got {run_dir}")
    steps = checkpoint.complete_checkpoints(run_dir)
    if not steps:
        raise UserError(f"{run_dir} holds no complete step_* checkpoint")
    run_ids = {s: checkpoint.read_meta(s).get("run_id") for s in steps}
    pending = [s for s in steps if not result_path(s, key).is_file()
               and not kept_result(run_dir, key, run_ids[s], s).is_file()]
    # Shared out by position among all steps, not among the pending ones: every rank gets the same
    # split whatever another rank has written meanwhile, with no communication.
    mine = [s for s in steps[rank::world_size] if s in pending]
    if rank == 0:
        print(f"eval_suite: {len(steps)} checkpoints in {run_dir}, {len(steps) - len(pending)} already "
              f"evaluated with these settings, {len(pending)} to evaluate on {world_size} process(es)")
    failed, t_start = 0, time.time()
    manager = evaluation.task_manager() if mine else None
    for i, ckpt in enumerate(mine, 1):
        try:
            hf_model, _, meta = load_checkpoint(ckpt, evaluation.device, args.verify, args.lora_base)
        except UserError as e:  # one bad checkpoint should not cost the others' results
            print(f"eval_suite: skipping {ckpt.name}: {e}", file=sys.stderr, flush=True)
            failed += 1
            continue
        record = evaluate_model(hf_model, ckpt, meta, result_path(ckpt, key), manager, args, settings)
        del hf_model
        # A second copy out of keep_last's reach: the step directory may be pruned before the summary.
        kept = kept_result(run_dir, key, run_ids[ckpt], ckpt)
        kept.parent.mkdir(exist_ok=True)
        write_atomic(kept, json.dumps({k: record[k] for k in ("step", "tokens_seen", "scores", "source", "run_id")}))
        elapsed = time.time() - t_start
        eta = elapsed / i * (len(mine) - i)
        line = ", ".join(f"{t} {m} {v[m]:.4f}" for t, v in record["scores"].items() for m in curve_metrics(v))
        print(f"eval_suite: [rank {rank}] {i}/{len(mine)} {ckpt.name}: {line} "
              f"({record['seconds']:.0f} s, ETA {metrics.format_duration(eta)})", flush=True)
    if world_size > 1:
        # The one collective, made only now: checkpoint loading is collective whenever a process
        # group exists, and here each process loads different checkpoints. Joining the group is
        # where the ranks wait for the slowest one, hence the long timeout.
        dist.init_process_group("gloo", timeout=timedelta(days=7))
        counts = torch.tensor([failed])
        dist.all_reduce(counts)
        failed = int(counts.item())
    if rank != 0:
        return None
    out = Path(args.out) if args.out else run_dir / f"{RESULT_PREFIX}{key}.json"
    n_steps = write_run_summary(run_dir, steps, key, settings, out, run_ids[steps[-1]])
    if failed:
        raise UserError(f"{failed} checkpoint(s) could not be evaluated (reasons above); "
                        f"the {n_steps} others are in {out}")
    return out


def kept_result(run_dir: Path, key: str, run_id: str | None, step: Path) -> Path:
    """Where --all_steps keeps a step's result beside the run's checkpoints, out of pruning's reach."""
    return run_dir / f"{RESULT_PREFIX}{key}_run_{run_id}" / f"{step.name}.json"


# The run, which of its steps to gather and the settings they were scored with, where the summary
# goes, and the run id that decides which results belong to it.
def write_run_summary(run_dir: Path, steps: list[Path], key: str, settings: dict, out: Path,
                      run_id: str | None = None) -> int:
    """The results of run `run_id` for these settings (JSON), its table (.md, also printed) and the
    training-dynamics plot (.png) at `out`; returns how many steps they hold. Steps whose
    checkpoints keep_last has pruned stay (from the previous summary and the kept results); steps of
    another run id (a run started over in the same directory) do not."""
    evaluated: dict[int, dict] = {}
    if out.is_file():
        previous = json.loads(out.read_text())
        if previous.get("settings") == settings and previous.get("run_id") == run_id:
            evaluated = {r["step"]: r for r in previous.get("steps", [])}
    kept = kept_result(run_dir, key, run_id, run_dir).parent
    found = [*sorted(kept.glob("step_*.json")), *(result_path(s, key) for s in steps)]
    for path in found:
        if path.is_file():
            r = json.loads(path.read_text())
            if r.get("run_id", run_id) == run_id:
                evaluated[r["step"]] = {k: r.get(k) for k in ("step", "tokens_seen", "scores", "source")}
    records = [evaluated[s] for s in sorted(evaluated)]
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, json.dumps({"run": str(run_dir), "run_id": run_id, "settings": settings, "steps": records},
                                 indent=2) + "\n")
    table = run_table(curves(records))
    write_atomic(out.with_suffix(".md"), f"# lm-eval along {run_dir}\n\n{table}")
    rows = metrics.read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
    metrics.plot_dynamics(curves(records), rows, out.with_suffix(".png"))
    print(table, end="")
    print(f"eval_suite: wrote {out}, {out.with_suffix('.md').name} and {out.with_suffix('.png').name}")
    return len(records)


# ----------------------------------------------------------------------------- CLI

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="lm-evaluation-harness on a checkpoint, a run, or a HF directory")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a run directory (its latest step), a step_* directory, "
                                             "or a weights directory from export_hf.py --from_hf")
    source.add_argument("--hf", help="a local Hugging Face causal LM directory with GPT-2's vocabulary")
    parser.add_argument("--lora_base", help="a LoRA run whose base model moved: its new path (checked against the sha256 the run recorded)")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated lm-eval task names")
    parser.add_argument("--num_fewshot", type=int, default=None, help="few-shot examples (default: the task's, 0 here)")
    parser.add_argument("--limit", type=float, default=None,
                        help="only the first N examples of each task (a fraction if < 1): a quick estimate")
    parser.add_argument("--batch_size", default="32", help="requests per forward, or 'auto'")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="autocast dtype (default: bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--include_path", default=None, help="a directory of extra task YAMLs (offline tasks)")
    parser.add_argument("--out", default=None, help="the JSON result (default: lm_eval_KEY.json beside the "
                                                   "checkpoint; with --all_steps, in the run directory)")
    parser.add_argument("--verify", choices=("full", "size"), default="full",
                        help="check each checkpoint's files against their recorded sha256 (full) or sizes only")
    parser.add_argument("--contamination", metavar="REPORT", default=None,
                        help="a contamination.py report: also score each task it covers on the examples it "
                             "does not flag (clean_scores in the result)")
    parser.add_argument("--log_samples", action="store_true",
                        help="also write each example's per-choice log-likelihoods and metrics to "
                             "OUT.samples.jsonl (one JSON line per task and example)")
    parser.add_argument("--all_steps", action="store_true",
                        help="evaluate every step_* of a run directory not evaluated yet, then plot")
    args = parser.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not args.tasks:
        parser.error("--tasks is empty")
    if args.limit is not None:
        if args.limit <= 0:
            parser.error(f"--limit must be positive, got {args.limit:g}")
        args.limit = int(args.limit) if args.limit >= 1 else args.limit
    if args.batch_size != "auto" and not (args.batch_size.isdigit() and int(args.batch_size) > 0):
        parser.error(f"--batch_size must be a positive integer or 'auto', got {args.batch_size!r}")
    args.contamination_path = args.contamination
    if args.contamination:
        try:
            args.contamination = contamination.read_report(args.contamination)
        except UserError as e:
            parser.error(str(e))
    if args.all_steps and args.hf:
        parser.error("--all_steps needs --checkpoint RUN_DIR")
    return args


def _setup_processes(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device): under torchrun, one process per GPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(device_name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device_name} but no CUDA device is visible; use --device cpu")
    if world_size == 1:
        return 0, 1, device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    # lm-eval returns results only where LOCAL_RANK is 0 (it takes the others for tensor-parallel
    # copies of one model); here every process is a whole evaluation of its own checkpoints.
    os.environ.pop("LOCAL_RANK")
    return rank, world_size, device


def main(argv: list[str] | None = None) -> None:
    with closed_output_survives():
        args = parse_args(argv)
        try:
            _main(args)
        except KeyboardInterrupt:
            print("eval_suite: interrupted; every checkpoint evaluated so far kept its lm_eval_KEY.json: rerun the "
                  "same command to continue", file=sys.stderr, flush=True)
            raise SystemExit(130) from None


def _main(args: argparse.Namespace) -> None:
    with cli_errors("eval_suite.py"):
        rank, world_size, device = _setup_processes(args.device)
        try:
            args.device = device
            args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
            import lm_eval  # noqa: PLC0415 - an optional dependency, imported where it is needed

            settings = {"tasks": sorted(args.tasks), "num_fewshot": args.num_fewshot, "limit": args.limit,
                        "dtype": args.dtype, "lm_eval": lm_eval.__version__,
                        "task_files": task_files_digest(args.include_path)}
            if args.contamination:  # a cached result without the clean scores must not stand in
                settings["contamination"] = hashlib.sha256(json.dumps(args.contamination, sort_keys=True)
                                                           .encode()).hexdigest()[:16]
            key = settings_key(settings)
            if args.out and rank == 0:  # before hours of evaluation, not after
                problem = unwritable(Path(args.out))
                if problem:
                    raise UserError(problem)
            _quiet_lm_eval()
            if "hellaswag_sample" in args.tasks:
                print("eval_suite: note: hellaswag_sample is the tests' 32-row format sample, not HellaSwag: its "
                      "score means nothing (use hellaswag_local for the real validation split)", file=sys.stderr)

            evaluation = Evaluation(args, settings, key, rank, world_size, device)
            if args.all_steps:
                evaluate_run(Path(args.checkpoint), evaluation)
                return
            if world_size > 1:
                raise UserError("under torchrun only --all_steps is split across processes (a checkpoint "
                                "per GPU); evaluate one checkpoint with plain `python eval_suite.py`")
            # before the model: a missing dataset fails in seconds
            manager = evaluation.task_manager()
            if args.hf:
                hf_model, result_dir, meta = load_hf_dir(args.hf, device), Path(args.hf), {}
            else:
                hf_model, result_dir, meta = load_checkpoint(args.checkpoint, device, args.verify, args.lora_base)
            out = Path(args.out) if args.out else result_path(result_dir, key)
            record = evaluate_model(hf_model, result_dir, meta, out, manager, args, settings)
            print(record["table"], end="")
            print(f"eval_suite: wrote {out} and {out.with_suffix('.md').name} ({record['seconds']:.1f} s)")
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


if __name__ == "__main__":
    main()
