"""plan.py and planner.py: the table for every config, bad input, --micro_batch=auto, and the
projected peak memory against a measured training step."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

import plan
from llama_fineweb import planner
from llama_fineweb.train_config import ConfigError, TrainConfig, load_config
from runs import ROOT, call_main, metric_rows, run_here

CONFIGS = sorted((ROOT / "configs").glob("*.py"))


def plan_json(*argv: str) -> dict:
    return json.loads(call_main(plan.main, [*argv, "--json"]).stdout)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_plan_prints_a_table_for_every_config(config):
    """Every config gets its table, a recommended row that fits and is the fastest that does, and
    the command that runs it; no micro-batch that would not divide the batch is proposed."""
    out = call_main(plan.main, ["--config", str(config), "--gpu", "RTX A6000", "--gpus", "2"]).stdout
    assert "peak GiB" in out and "GPU-hours" in out
    report = plan_json("--config", str(config), "--gpu", "RTX A6000", "--gpus", "2")
    cfg = plan.load(*plan.parse_args(["--config", str(config)]))
    rows = report["rows"]
    assert {r["setting"]["activation_checkpointing"] for r in rows} == {"none", "selective", "full"}
    kinds = {("ddp", False)} if cfg.lora_spec() else {("ddp", False), ("fsdp", False), ("fsdp", True)}  # LoRA: DDP only
    assert {(r["setting"]["parallel"], r["setting"]["reduce_every_micro_step"]) for r in rows} == kinds
    for r in rows:
        assert cfg.total_batch_tokens % (r["setting"]["micro_batch"] * cfg.seq_len * 2) == 0
    best = rows[report["recommended"]]
    assert best["fits_eager"] and best["step_s"] == min(r["step_s"] for r in rows if r["fits_eager"])
    script = "finetune.py" if "sft" in config.stem else "train_llama.py"
    assert report["command"].startswith(f"torchrun --standalone --nproc_per_node=2 {script} --config {config}")
    assert report["command"] in out


def test_paper_setting_gives_a_time_for_20b_tokens():
    """The DMaS-LLaMa-Lite setting (1p7b on two RTX A6000s) fits and projects days, not hours,
    for the config's 20.0B tokens, at the stated MFU."""
    report = plan_json("--config", str(ROOT / "configs" / "llama_1p7b.py"), "--gpu", "RTX A6000", "--gpus", "2")
    best = report["rows"][report["recommended"]]
    assert report["tokens"] == 38_147 * 524_288 and report["mfu"] == planner.DEFAULT_MFU
    assert best["peak_gib"] + planner.CUDA_RESERVE_GIB <= 48
    # 20.0B tokens x ~10 GFLOP/token / (2 x 154.8 TFLOP/s x 40%) = ~19 days
    assert 15 * 86400 < best["total_s"] < 25 * 86400


def test_friendly_card_names_map_to_the_flops_table():
    """Users' names and torch's device names find the same entry of metrics.PEAK_BF16_TFLOPS."""
    assert planner.find_card("RTX A6000").name == "NVIDIA RTX A6000"
    assert planner.find_card("a100 80gb").name == planner.find_card("NVIDIA A100-SXM4-80GB").name
    assert planner.find_card("H100").peak_tflops == 989.5


def test_unknown_card_is_one_line_naming_the_known_ones():
    """An unknown card: exit 2 and one line listing the known cards and --gpu_mem/--peak_tflops."""
    proc = call_main(plan.main, ["--config", str(ROOT / "configs" / "tiny.py"), "--gpu", "Voodoo 5"], check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1
    assert "RTX A6000" in lines[0] and "--gpu_mem" in lines[0] and "--peak_tflops" in lines[0]


def test_nothing_fits_names_the_smallest_change():
    """1p7b on one 16 GiB card: the table says nothing fits and names more GPUs or a shorter
    sequence that would."""
    argv = ["--config", str(ROOT / "configs" / "llama_1p7b.py"), "--gpu_mem", "16", "--peak_tflops", "100"]
    out = call_main(plan.main, argv).stdout
    assert "nothing fits: " in out and "GPUs in all" in out
    assert plan_json(*argv)["recommended"] is None


def test_config_overrides_change_the_plan():
    """--key=value overrides apply as in training: a shorter sequence needs less memory."""
    base = ["--config", str(ROOT / "configs" / "llama_124m.py"), "--gpu", "A40", "--micro_batches", "16"]
    long, short = plan_json(*base), plan_json(*base, "--seq_len=512")
    assert short["rows"][0]["peak_gib"] < long["rows"][0]["peak_gib"]


# ----------------------------------------------------------------------------- --micro_batch=auto

def test_micro_batch_auto_parses_and_validates():
    """--micro_batch takes a number or auto; anything else is one ConfigError naming both."""
    assert load_config(["--micro_batch=auto"]).micro_batch == "auto"
    assert load_config(["--micro_batch=auto", "--micro_batch=8"]).micro_batch == 8
    with pytest.raises(ConfigError, match="or auto"):
        load_config(["--micro_batch=big"])


def test_auto_picks_the_largest_fitting_divisor():
    """The planner's choice is the largest micro-batch dividing the batch whose projection fits."""
    cfg = TrainConfig(model="124m", seq_len=256, total_batch_tokens=256 * 24, device="cpu", compile=False)
    device = torch.device("cpu")
    c = cfg.model_config()

    def peak(mb: int) -> float:
        return planner.peak_bytes(c, planner.setting_from_config(cfg, 1, "cpu", micro_batch=mb), cfg.seq_len)

    assert planner.auto_micro_batch(cfg, 1, device, peak(6) + 1)[0] == 6  # 24 sequences: 1, 2, 3, 4, 6, 8, 12, 24
    assert planner.auto_micro_batch(cfg, 1, device, peak(8) - 1)[0] == 6
    assert planner.auto_micro_batch(cfg, 2, device, 1e15)[0] == 12
    assert planner.auto_micro_batch(cfg, 1, device, 1)[0] == 1


def test_confirmation_halves_on_out_of_memory():
    """A micro-batch that runs out of memory in its real step is halved, staying a divisor."""
    tried = []

    def fits(mb: int) -> bool:
        tried.append(mb)
        return mb <= 3

    assert planner.confirm_micro_batch(12, [1, 2, 3, 4, 6, 12], fits) == (3, [12, 6])
    assert tried == [12, 6, 3]


def test_fits_one_step_leaves_the_model_and_optimizer_as_they_were(tiny_model):
    """The confirming step takes no optimizer step and drops the moments it made."""
    model = tiny_model(vocab_size=512)
    optimizer = torch.optim.AdamW(model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    from contextlib import nullcontext

    assert planner.fits_one_step(model, model, optimizer, 2, 16, nullcontext())
    assert not optimizer.state and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_micro_batch_auto_trains_tiny(tmp_path, data_dir):
    """--micro_batch=auto on the CPU picks the largest exact micro-batch (8 sequences a step: 8),
    logs why, and trains; a run saved at micro-batch 2 resumes with auto."""
    run_here(tmp_path / "run", data_dir, "--max_steps=2")
    out = run_here(tmp_path / "run", data_dir, "--micro_batch=auto", "--max_steps=4").stdout
    assert "micro_batch=auto: 8: the largest of [1, 2, 4, 8] projected to fit" in out
    assert "resumed from" in out and "8 micro-batch x 32 seq x 1 accumulation" in out
    assert [r["step"] for r in metric_rows(tmp_path / "run") if "loss" in r] == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- measured

def test_projected_peak_memory_is_within_15_percent_of_measured():
    """Projected vs MemTracker's peak of a real training step (2 gloo processes, two micro-steps):
    tiny under DDP and FSDP with each activation-checkpointing mode at two micro-batches (there
    the activations and the loss's buffers are half the peak), and 124m under DDP and FSDP (its
    190M parameters' static and sharded terms). benchmarks/bench_plan.py's default runs 124m at
    two micro-batches and every mode too (BENCHMARKS.md's table); here one keeps the test short."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "benchmarks" / "bench_plan.py"), "--cases", "tiny:128:4", "tiny:128:8", "124m:16:2:none"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line.split(": ", 1)[1]) for line in proc.stdout.splitlines()
            if line.startswith("plan_check_json: ")]
    assert len(rows) == 12 + 2
    worst = max(rows, key=lambda r: abs(r["error"]))
    assert abs(worst["error"]) <= 0.15, worst


def test_docs_table_is_plan_output():
    """The memory table of docs/parallelism.md is plan.py's markdown output, row for row, under the
    header lines plan.py prints above it (the card, the assumed MFU, the link between the cards)."""
    out = call_main(plan.main, ["--config", str(ROOT / "configs" / "llama_1p7b.py"), "--gpu", "RTX A6000",
                                "--gpus", "2", "--micro_batches", "4,8,16", "--markdown"]).stdout
    lines = out.replace(f"{ROOT}/", "").splitlines()  # as run from the repository root
    rows = [line for line in lines if line.startswith("|")]
    header = lines[:lines.index(rows[0])]
    page = (ROOT / "docs" / "parallelism.md").read_text()
    assert len(rows) == 2 + 27 and "\n".join(header + rows) in page


def test_gpu_check_rows_get_the_projection():
    """A measured CUDA row gets the planner's projection and its error; a CPU row (no peak) nothing."""
    from model import model_config

    found = planner.gpu_check_projection(model_config("1p7b"), 1024, 16, 4, True, {"parallel": "fsdp"}, 60.0)
    assert found["projection_error"] == pytest.approx(found["projected_gib"] / 60.0 - 1)
    assert planner.gpu_check_projection(model_config("tiny"), 32, 2, 2, False, {}, None) == {}


def test_micro_batch_auto_finetunes_tiny(tmp_path, tiny_model):
    """finetune.py takes --micro_batch=auto too: 4 examples a step on one process -> 4."""
    import finetune
    from export_hf import save_weights

    save_weights(tiny_model(max_seq_len=64), tmp_path / "base")
    argv = ["--config", str(ROOT / "configs" / "sft_tiny.py"), f"--data={ROOT / 'tests' / 'data' / 'alpaca_tiny.json'}",
            "--seq_len=64", "--total_batch_tokens=256", "--micro_batch=auto", "--max_steps=2", "--eval_interval=0",
            "--sample_interval=0", "--save_interval=0", f"--init_from={tmp_path / 'base'}",
            f"--out_dir={tmp_path / 'sft'}", "--device=cpu"]
    out = call_main(finetune.main, argv).stdout
    assert "micro_batch=auto: 4: the largest of [1, 2, 4] projected to fit" in out
    assert [r["step"] for r in metric_rows(tmp_path / "sft") if "loss" in r] == [1, 2]


def test_measured_mfu_replaces_the_assumption(tmp_path):
    """--measured takes the best MFU of a gpu_check results file's rows that ran fine, and says so;
    --help prints the usage."""
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in [
        {"row": "compiled_mb16", "config": "1p7b compiled", "mfu": 0.47, "verdict": "ok: 0 graph breaks"},
        {"row": "eager_mb16", "mfu": 0.9, "verdict": "out of memory"}, {"row": "env", "verdict": "ok"}]))
    argv = ["--config", str(ROOT / "configs" / "llama_1p7b.py"), "--measured", str(results)]
    assert plan_json(*argv)["mfu"] == 0.47
    assert "MFU 47.0% measured" in call_main(plan.main, argv).stdout
    priced = plan_json(*argv, "--price", "2")
    assert "cost at 2/GPU-hour" in call_main(plan.main, [*argv, "--price", "2"]).stdout
    assert priced["price"] == 2 and priced["rows"][0]["gpu_hours"] > 0
    assert "--gpu_mem" in call_main(plan.main, ["--help"]).stdout


def test_lora_plan_counts_the_adapters_alone(tiny_model):
    """With LoRA only the adapters train: the planner counts exactly the parameters lora.attach
    adds, and 1p7b's LoRA config fits a 24 GiB card at micro-batch 4 where full fine-tuning does not."""
    from llama_fineweb import lora

    spec = lora.LoraSpec(4, 8.0, 0.0, ("wq", "wk", "wv", "wo", "w1", "w2", "w3"))
    model = tiny_model()
    lora.attach(model, spec)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert planner.lora_parameters(model.config, spec) == trained
    argv = ["--gpu_mem", "24", "--peak_tflops", "165", "--micro_batches", "4"]
    peft_rows = plan_json("--config", str(ROOT / "configs" / "sft_1p7b_lora.py"), *argv)["rows"]
    full_rows = plan_json("--config", str(ROOT / "configs" / "sft_1p7b.py"), *argv)["rows"]
    assert peft_rows[0]["fits"] and not full_rows[0]["fits"]


def _probe_worker(rank: int, init_file: str, out_dir: str) -> None:
    """fits_one_step under DDP with a simulated out-of-memory error in the middle of the backward,
    on both ranks, then on rank 1 alone; then one real synchronised step."""
    from contextlib import nullcontext
    from datetime import timedelta
    from pathlib import Path

    from conftest import make_tiny_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        model = make_tiny_model(max_seq_len=16).train()
        train_model, failing = DDP(model), set()
        optimizer = torch.optim.AdamW(model.parameters())

        def out_of_memory(grad):
            raise torch.OutOfMemoryError("simulated")

        def fail_in_backward(module, inputs, output):
            if rank in failing:  # layer 0's output: its gradient comes after later layers' weight gradients
                output.register_hook(out_of_memory)

        model.layers[0].register_forward_hook(fail_in_backward)
        verdicts = []
        for failing in ({0, 1}, {1}, set()):
            verdicts.append(planner.fits_one_step(model, train_model, optimizer, 2, 16, nullcontext()))
        tokens = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(rank))
        train_model(tokens[:, :-1], tokens[:, 1:]).backward()
        norms = [None, None]
        dist.all_gather_object(norms, torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item())
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"verdicts": verdicts, "norms": norms}))
        # DDP's reducer goes first, while the process group outlives it: a reducer that drops the last
        # reference to the group joins gloo's thread while holding the GIL that thread may wait for.
        dist.barrier()
        del train_model
    finally:
        dist.destroy_process_group()


def test_micro_batch_probe_survives_out_of_memory_on_some_ranks(tmp_path):
    """Two gloo ranks: an out-of-memory probe on both, then on one, is 'does not fit' on both, and
    the next real DDP step still reduces its gradients (the probe leaves no reduction half done)."""
    mp.spawn(_probe_worker, args=(str(tmp_path / "pg"), str(tmp_path)), nprocs=2)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["verdicts"] for r in results] == [[False, False, True]] * 2
    assert results[0]["norms"][0] == results[0]["norms"][1] > 0


def test_plan_numbers_are_gib_marked_and_checked():
    """A card's datasheet GB is converted to GiB; a row that fits only with compile's CPU-measured
    activation saving is marked and not recommended; non-finite or non-positive numbers are one
    line; --json is JSON."""
    h100 = ["--config", str(ROOT / "configs" / "llama_1p7b.py"), "--gpu", "H100", "--gpus", "8"]
    report = plan_json(*h100)
    assert report["card"]["memory_gib"] == pytest.approx(80e9 / 2**30)
    ddp16 = next(r for r in report["rows"] if r["setting"]["parallel"] == "ddp" and r["setting"]["micro_batch"] == 16
                 and r["setting"]["activation_checkpointing"] == "none")
    assert ddp16["fits"] and not ddp16["fits_eager"]
    assert report["rows"][report["recommended"]]["fits_eager"]
    assert "if compiled (c)" in call_main(plan.main, h100).stdout
    for flag, value in [("--tokens", "-5"), ("--tokens", "nan"), ("--price", "-1"), ("--price", "inf"),
                        ("--gpu_mem", "nan"), ("--peak_tflops", "0")]:
        proc = call_main(plan.main, [*h100, flag, value, "--json"], check=False)
        line, = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and proc.stdout == "" and f"{flag} " in line and "positive finite" in line
