"""The mutation drill: plant known breakages in a scratch copy of the repository, one at a time, run
the few tests meant to catch each, and print which did.

    python tests/mutation_drill.py                  # every mutation (see docs/tests.md for the time)
    python tests/mutation_drill.py --only clip zero # the mutations whose names contain a word given
    python tests/mutation_drill.py --list           # the mutations and their tests, nothing run

Each mutation replaces one exact piece of source text (it must occur exactly once, so a refactor
that moves it fails loudly here instead of planting nothing). A mutation no test catches exits 1.
pytest does not collect this file (only tests/test_*.py): the drill is run by hand, e.g. after
changing a test that guards one of these, or a tolerance.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository root
    old: str  # exact source text, found once
    new: str
    tests: tuple[str, ...]  # pytest node ids that should catch it


MUTATIONS = [
    Mutation("backward x accum_steps", "llama_fineweb/step.py",
             "(loss if scaler is None else scaler.scaled(loss)).backward()",
             "((loss if scaler is None else scaler.scaled(loss)) * s.accum_steps).backward()",
             ("tests/test_step.py::test_step_norm_is_the_full_batch_gradient_norm",
              "tests/test_stability.py::test_micro_batch_change_on_resume_equals_straight")),
    Mutation("fp16 unscale_ a no-op", "llama_fineweb/stability.py",
             "torch._foreach_mul_(grads, 1.0 / self.scale)", "torch._foreach_mul_(grads, 1.0)",
             ("tests/test_step.py::test_step_norm_is_the_full_batch_gradient_norm",
              "tests/test_stability.py::test_float16_loss_head_gradients_match_float32")),
    Mutation("fp16 scaler load_state_dict a no-op", "llama_fineweb/stability.py",
             'self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])', "del state",
             ("tests/test_stability.py::test_fp16_scale_moves_before_the_save_and_resumes_exactly",)),
    Mutation("gradient clipping removed", "llama_fineweb/parallel.py",
             "torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)", "del max_norm",
             ("tests/test_step.py::test_update_is_as_large_as_clipping_allows",)),
    Mutation("bf16 compression hook never registered", "llama_fineweb/parallel.py",
             "ddp.register_comm_hook(None, all_reduce_bf16)", "pass",
             ("tests/test_parallel.py::test_bf16_compression_hook_rounds_the_reduced_gradients",)),
    Mutation("bf16 compression hook sums", "llama_fineweb/parallel.py",
             "bucket.buffer().to(torch.bfloat16).div_(group.size())", "bucket.buffer().to(torch.bfloat16)",
             ("tests/test_parallel.py::test_bf16_compression_hook_rounds_the_reduced_gradients",
              "tests/test_parallel.py::test_other_parallel_settings_train_like_one_process[ddp_bf16_compress]")),
    Mutation("fsdp keep-gathered ignored", "llama_fineweb/parallel.py",
             "reshard_after_forward=cfg.reshard_after_forward)", "reshard_after_forward=True)",
             ("tests/test_parallel.py::test_fsdp_keep_gathered_leaves_blocks_unsharded_after_forward",)),
    Mutation("fsdp reduce-every-micro-step ignored", "train_llama.py",
             "reduce_every_micro_step=cfg.fsdp_reduce_every_micro_step,", "reduce_every_micro_step=False,",
             ("tests/test_parallel.py::test_fsdp_reduce_every_micro_step_reshards_after_each_backward",)),
    Mutation("compiled loss head in float32, eager in bfloat16", "model.py",
             "logits = (h_c @ w.t()).float()",
             "logits = (torch.autocast(h.device.type, enabled=False)(lambda: h_c.float() @ w.t().float())()"
             " if torch.compiler.is_compiling() else h_c @ w.t()).float()",
             ("tests/test_compile.py::test_compiled_loss_is_one_graph_under_bf16_autocast",)),
    Mutation("summing all-reduce of the step's loss and norm", "train_llama.py",
             "values[3:] /= run.dist.world_size", "values[3:] /= 1",
             ("tests/test_doc_mask.py::test_doc_mask_under_fsdp_on_two_processes_matches_one",)),
    Mutation("zero_grad skipped", "llama_fineweb/step.py",
             "optimizer.zero_grad(set_to_none=True)", "pass",
             ("tests/test_step.py::test_update_is_as_large_as_clipping_allows",
              "tests/test_train.py::test_resume_equals_straight_run")),
    Mutation("data position off by one on resume", "llama_fineweb/dataloader.py",
             'self.order.seek(int(state["position"]))', 'self.order.seek(int(state["position"]) + 1)',
             ("tests/test_dataloader.py::test_prefetch_yields_the_same_batches",)),
    Mutation("training windows off by one token", "llama_fineweb/dataloader.py",
             "rows = stream.read_windows([sequence * (seq_len + 1) for",
             "rows = stream.read_windows([sequence * (seq_len + 1) + 1 for",
             ("tests/test_dataloader.py::test_sequential_order_without_shuffle",)),
    Mutation("RNG state dropped from the checkpoint", "train_llama.py",
             '"rng": checkpoint.RNGState(), ', "",
             ("tests/test_checkpoint.py::test_checkpoint_restores_the_runs_random_states",)),
    Mutation("hellaswag losses filed under the wrong examples", "llama_fineweb/hellaswag.py",
             "sums[index] = sum_loss", "sums[index.flip(0)] = sum_loss",
             ("tests/test_hellaswag.py::test_per_example_losses_match_one_at_a_time_reference",)),
    Mutation("lm-eval's model built with another RMSNorm epsilon", "eval_suite.py",
             "config = LlamaConfig(**config, name_or_path=source)",
             'config = LlamaConfig(**{**config, "rms_norm_eps": 1e-4}, name_or_path=source)',
             ("tests/test_evaluate.py::test_per_example_logliks_equal_our_models",)),
    Mutation("forecast fit from the warmup's end, first fall and all", "llama_fineweb/forecast.py",
             "start = max(FIRST_FALL_WARMUPS * cfg.warmup_steps, share * seen[-1][0], 1)",
             "start = max(cfg.warmup_steps, 1)",
             ("tests/test_forecast.py::test_the_first_fall_is_left_out_of_the_fit",)),
    Mutation("forecast drops the branch it is fit with", "llama_fineweb/forecast.py",
             "parts = [(pts, t) for pts, t in parts if pts]", "parts = parts[:1]",
             ("tests/test_forecast.py::test_a_wsd_run_fit_with_its_decay_branch_gets_the_decays_gain",
              "tests/test_forecast.py::test_metrics_script_fits_a_run_with_its_branch")),
]


def copy_repository(dest: Path) -> None:
    """The files git tracks or would track (not .git, run outputs or caches) into dest."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def failed_tests(junit: Path) -> list[str]:
    """The test ids pytest's junit report marks failed or errored."""
    if not junit.exists():
        return []
    failed = []
    for case in ET.parse(junit).iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname', '').rsplit('.', 1)[-1]}.py::{case.get('name')}")
    return failed


def run_mutation(copy: Path, mutation: Mutation, timeout: int) -> tuple[list[str], float, str]:
    """Plant the mutation, run its tests, put the file back: (tests that failed, seconds, note)."""
    path = copy / mutation.path
    original = path.read_text()
    if original.count(mutation.old) != 1:
        raise SystemExit(f"{mutation.name}: {mutation.old!r} occurs {original.count(mutation.old)} times "
                         f"in {mutation.path}, not once: update the drill")
    path.write_text(original.replace(mutation.old, mutation.new))
    junit = copy / "drill-junit.xml"
    junit.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
           f"--junitxml={junit}", *mutation.tests]
    started, note = time.monotonic(), ""
    try:
        proc = subprocess.run(cmd, cwd=copy, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode not in (0, 1):  # 2+: interrupted, usage or collection error
            note = f"pytest exit {proc.returncode}: {proc.stdout.strip().splitlines()[-1:]}"
    except subprocess.TimeoutExpired:
        note = f"timed out after {timeout} s"
    finally:
        path.write_text(original)
    return failed_tests(junit), time.monotonic() - started, note


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", default=[], help="run the mutations whose names contain any of these words")
    parser.add_argument("--list", action="store_true", help="print the mutations and their tests; run nothing")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per mutation's tests")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or any(w.lower() in m.name.lower() for w in args.only)]
    if args.list:
        for m in chosen:
            print(f"{m.name} ({m.path}):\n" + "".join(f"    {t}\n" for t in m.tests))
        return
    rows, uncaught = [], []
    with tempfile.TemporaryDirectory(prefix="mutation_drill_") as scratch:
        copy = Path(scratch)
        copy_repository(copy)
        for m in chosen:
            failed, seconds, note = run_mutation(copy, m, args.timeout)
            caught = ", ".join(t.split("::", 1)[1] for t in failed) or "NOT CAUGHT"
            if note:
                caught += f" ({note})"
            if not failed:
                uncaught.append(m.name)
            tests = ", ".join(t.split("/", 1)[1] for t in m.tests)
            rows.append((m.name, f"`{m.path}`", tests, caught, f"{seconds:.0f}"))
            print(f"{m.name}: {caught} [{seconds:.0f} s]", file=sys.stderr, flush=True)
    print("| mutation | file | tests run | caught by | s |\n|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\n{len(rows) - len(uncaught)} of {len(rows)} mutations caught.")
    if uncaught:
        sys.exit(1)


if __name__ == "__main__":
    main()
