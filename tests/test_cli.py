"""What a newcomer meets at the command line: Ctrl-C through a pipe, --help, the refusals of a
launch that cannot start, and a resumed run's metrics.jsonl."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import finetune
import train_llama
from llama_fineweb.train_config import ConfigError, SFTConfig, TrainConfig, choices, knob_help, load_config
from runs import BASE, EVAL, ROOT, call_main, losses, metric_rows, refusal, run_here

# `tee` in Python: copies stdin and dies at once on SIGINT, as a terminal's pipeline does
READER = ("import os, signal, sys\nsignal.signal(signal.SIGINT, lambda *_: os._exit(130))\n"
          "for line in sys.stdin: print(line, end='')")


def test_ctrl_c_through_a_dying_pipe_saves_and_exits_0(tmp_path, data_dir):
    """`train_llama.py | tee` and Ctrl-C: the reader dies with the run's process group, and the run
    still finishes its step, saves, says so in log.txt and exits 0."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    trainer = subprocess.Popen(
        [sys.executable, str(ROOT / "train_llama.py"), *BASE, f"--data_dir={data_dir}", f"--out_dir={out}",
         "--max_steps=100000", "--warmup_steps=10"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env, process_group=0)
    reader = None
    try:
        reader = subprocess.Popen([sys.executable, "-c", READER], stdin=trainer.stdout, stdout=subprocess.DEVNULL,
                                  process_group=trainer.pid)
        trainer.stdout.close()  # the reader holds the pipe's only read end, as tee would
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").is_file() or '"loss"' not in (out / "metrics.jsonl").read_text():
            assert trainer.poll() is None, trainer.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no step logged in 120 s"
            time.sleep(0.1)
        os.killpg(trainer.pid, signal.SIGINT)  # what a terminal's Ctrl-C does to the pipeline
        err = trainer.communicate(timeout=120)[1].decode()
        reader.wait(timeout=60)
    finally:
        for proc in (trainer, reader):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    assert reader.returncode == 130
    assert trainer.returncode == 0, err[-2000:]
    log = (out / "log.txt").read_text()
    assert "received SIGINT" in log and "stopped by signal after step" in log
    stopped = int(log.split("stopped by signal after step ")[1].split(";")[0])
    assert (out / f"step_{stopped:07d}" / "meta.json").is_file()
    assert max(losses(out)) == stopped


def test_resume_drops_metrics_rows_past_its_checkpoint(tmp_path, data_dir, straight):
    """A run killed after step 12 whose newest checkpoint is step 5: resumed, each step appears once
    in metrics.jsonl, with the straight run's values, and step 5's save row is kept."""
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    for name in ("step_0000010", "step_0000012", "latest"):
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    proc = run_here(out, data_dir, *EVAL, "--save_interval=5")
    assert "dropped the" in proc.stdout
    rows = metric_rows(out)
    for key in ("loss", "val_loss"):
        steps = [r["step"] for r in rows if key in r]
        assert len(steps) == len(set(steps)), (key, steps)
    assert losses(out) == losses(straight)
    # The resumed checkpoint's own save row (logged after its save) belongs to a done step: it stays.
    assert [r["step"] for r in rows if "save_s" in r].count(5) == 1


def test_every_knob_has_a_help_sentence():
    """Each field of TrainConfig and SFTConfig has its --help sentence (its trailing comment) and a group."""
    for kind in (TrainConfig, SFTConfig):
        described = knob_help(kind)
        assert set(described) == {f.name for f in dataclasses.fields(kind)}
        missing = [name for name, (group, sentence) in described.items() if not sentence or not group]
        assert not missing, f"{kind.__name__}: add a trailing comment (its --help sentence) to {missing}"


def test_help_shows_the_config_values_by_group():
    """--help with --config shows the config's values next to each sentence, under the class's groups;
    finetune.py lists its own knobs first."""
    text = call_main(train_llama.main, ["--config", str(ROOT / "configs" / "tiny.py"), "--help"]).stdout
    assert "\ndata:\n" in text and "--model=tiny " in text and "a preset of model.py" in text
    assert "--data_dir=data/tiny_stdlib " in text and "--max_steps=300 " in text
    assert "--model=1p7b" in call_main(train_llama.main, ["--help"]).stdout
    text = call_main(finetune.main, ["--config", str(ROOT / "configs" / "sft_tiny.py"), "--help"]).stdout
    assert text.index("fine-tuning data:") < text.index("\nmodel:")
    assert "--data=tests/data/alpaca_tiny.json" in text and "--init_from=out/tiny " in text


def test_every_choice_knob_is_typed_refused_in_one_line_and_listed_in_help():
    """The knobs with a fixed set of values are Literal[...] on the config; a value outside the set is
    refused by one check, in one line naming the choices, and --help lists them."""
    listed = choices(SFTConfig)
    assert {"on_spike", "lr_schedule", "decay_shape", "parallel", "compile_mode", "activation_checkpointing",
            "dtype", "sdpa_backend", "verify", "start_over", "overlong"} <= set(listed)
    text = call_main(finetune.main, ["--help"]).stdout
    for name, allowed in listed.items():
        line = next(row for row in text.splitlines() if row.lstrip().startswith(f"--{name}="))
        assert all(a in line for a in allowed if a), line
        cfg = SFTConfig(init_from="base")
        setattr(cfg, name, "no-such-value")
        with pytest.raises(ConfigError) as error:
            cfg.validate()
        message = str(error.value)
        assert "\n" not in message and f"--{name}='no-such-value'" in message
        assert all(a in message for a in allowed if a), message


def test_help_into_a_closed_pipe_is_quiet(monkeypatch, capfd):
    """`train_llama.py --help | head -1`: with the pipe's reader gone, --help returns quietly."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    with open(write_end, "w") as stream:
        monkeypatch.setattr(sys, "stdout", stream)
        assert train_llama.main(["--help"]) == {}
    assert capfd.readouterr().err == ""


def test_a_refused_launch_leaves_no_directory(tmp_path, data_dir):
    """A launch that fails its checks (no data, a missing --init_from) creates no out_dir, lock or metrics.jsonl; in an
    existing out_dir it adds nothing."""
    line = refusal(tmp_path / "out" / "run", tmp_path / "no_data")
    assert "does not exist" in line and not (tmp_path / "out").exists()
    line = refusal(tmp_path / "out" / "run", data_dir, f"--init_from={tmp_path / 'no_model'}")
    assert "no_model" in line and not (tmp_path / "out").exists()
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    refusal(tmp_path / "used", tmp_path / "no_data")
    assert [p.name for p in (tmp_path / "used").iterdir()] == ["notes.txt"]


def test_mistyped_data_dir_is_not_built(tmp_path):
    """The tiny config builds its corpus only into its own data_dir: another, empty --data_dir is one
    line, and --prepare_local_data=true is the explicit way to build there."""
    tiny = ["--config", str(ROOT / "configs" / "tiny.py")]
    with pytest.raises(ConfigError, match="builds its corpus only into data/tiny_stdlib"):
        load_config([*tiny, f"--data_dir={tmp_path / 'typo'}"])
    assert not (tmp_path / "typo").exists()
    assert load_config([*tiny, f"--data_dir={tmp_path / 'x'}", "--prepare_local_data=true"]).prepare_local_data


def test_finetune_without_its_base_model_names_the_pretraining_command(tmp_path, monkeypatch):
    """sft_tiny's out/tiny missing: one line giving the train_llama.py command that writes it."""
    monkeypatch.chdir(tmp_path)
    proc = call_main(finetune.main, ["--config", str(ROOT / "configs" / "sft_tiny.py"),
                                     f"--data={ROOT / 'tests' / 'data' / 'alpaca_tiny.json'}"], check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "python train_llama.py --config configs/tiny.py`" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_fine_tuning_logs_a_new_epoch_once():
    """Ten epochs of the 22-example set give one epoch line, not ten."""
    from finetune import SFTData, SFTLoader

    cfg = load_config(["--config", str(ROOT / "configs" / "sft_tiny.py"), "--init_from=x",
                       f"--data={ROOT / 'tests' / 'data' / 'alpaca_tiny.json'}"], kind=SFTConfig)
    data, lines = SFTData(cfg), []
    loader = SFTLoader(data.train, data.identity, 8, cfg, log=lines.append)
    for _ in range(30):
        loader.next_batch()
    epochs = [line for line in lines if "epoch" in line]
    assert len(epochs) == 1 and "epoch 1 starts" in epochs[0], lines


def test_unreachable_hub_switches_evaluation_to_the_cache(monkeypatch):
    """No connection to the hub (or HF_HUB_OFFLINE set): eval_suite.py says why and sets the offline
    switches, so lm-eval reads its cache at once instead of retrying. The discard port refuses the
    connection: the reason is that refusal, not a timeout waited out."""
    import eval_suite

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once
    assert eval_suite.hub_offline() == "127.0.0.1 unreachable (Connection refused)"
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert eval_suite.hub_offline() == "HF_HUB_OFFLINE is set"


def test_shipped_local_hellaswag_task_runs_offline(tmp_path, monkeypatch, tiny_model):
    """tasks/hellaswag_sample.yaml, from the repository root, scores a checkpoint with no network."""
    import eval_suite
    import export_hf

    export_hf.save_weights(tiny_model(), tmp_path / "weights")
    monkeypatch.chdir(ROOT)
    eval_suite.main(["--checkpoint", str(tmp_path / "weights"), "--tasks", "hellaswag_sample", "--include_path",
                   "tasks", "--limit", "8", "--device", "cpu", "--out", str(tmp_path / "result.json")])
    record = json.loads((tmp_path / "result.json").read_text())
    assert record["n_samples"]["hellaswag_sample"] == 8 and "acc" in record["scores"]["hellaswag_sample"]


def test_a_closed_stdout_is_silenced_not_raised(monkeypatch):
    """What every CLI runs in: a write into a pipe whose reader is gone is dropped, then and after."""
    from llama_fineweb.utils import closed_output_survives

    read_end, write_end = os.pipe()
    os.close(read_end)
    with open(write_end, "w") as stream:
        monkeypatch.setattr(sys, "stdout", stream)
        with closed_output_survives():
            print("step 1", flush=True)
            print("saved checkpoint", flush=True)
        print("after", flush=True)  # the descriptor now leads to /dev/null


# Runs each (script, argv) of argv[1] in one interpreter, each into a fresh pipe whose reader is
# gone, then flushes as the interpreter's exit would: a BrokenPipeError anywhere is a traceback.
INTO_CLOSED_PIPE = """
import importlib, json, os, sys
for script, argv in json.loads(sys.argv[1]):
    read_end, write_end = os.pipe()
    os.close(read_end)
    os.dup2(write_end, 1)
    os.close(write_end)
    try:
        importlib.import_module(script).main(argv)
    except SystemExit as e:
        if e.code:
            raise
    sys.stdout.flush()
"""


def test_every_cli_survives_a_closed_stdout(tmp_path):
    """plan, metrics, chat, hellaswag, export_hf and eval_suite into a pipe whose reader is gone
    (`| head -1`, `| true`): exit 0, no traceback, their work written."""
    import export_hf
    from conftest import make_tiny_model
    from llama_fineweb import checkpoint

    weights, run = tmp_path / "weights", tmp_path / "run"
    export_hf.save_weights(make_tiny_model(max_seq_len=64), weights)
    step = checkpoint.save(run, 1, {"model": checkpoint.ModelState(make_tiny_model())})
    rows = [{"step": s, "loss": 5.0 - s, "lr": 1e-4, "tokens_per_s": 1e4} for s in (1, 2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    scripts = [
        ("plan", ["--config", "configs/llama_1p7b.py", "--gpu", "H100", "--gpus", "8"]),
        ("metrics", [str(run)]),
        ("chat", ["--checkpoint", str(weights), "--prompt", "Hi", "--max_new_tokens", "3", "--temperature", "0"]),
        ("hellaswag", ["--checkpoint", str(run), "--data", "tests/data/hellaswag_sample.jsonl", "--limit", "2"]),
        ("export_hf", ["--checkpoint", str(weights), "--out", str(tmp_path / "hf")]),
        ("eval_suite", ["--checkpoint", str(weights), "--tasks", "hellaswag_sample", "--include_path", "tasks",
                        "--limit", "2", "--device", "cpu", "--out", str(tmp_path / "eval.json")]),
    ]
    proc = subprocess.run([sys.executable, "-c", INTO_CLOSED_PIPE, json.dumps(scripts)], stderr=subprocess.PIPE,
                          text=True, timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                                 "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"})
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert (run / "metrics.png").is_file() and (step / "hellaswag.json").is_file()
    assert (tmp_path / "hf" / "export_info.json").is_file() and (tmp_path / "eval.json").is_file()


def test_a_sample_past_the_context_and_a_missing_logger_are_refused_at_launch(tmp_path, data_dir, monkeypatch):
    """tiny's 32-token sample at --seq_len=32 and --tensorboard / --wandb without their package:
    one line before anything is created (not a traceback at step 0, not a lock and logs left)."""
    line = refusal(tmp_path / "sample", data_dir, "--sample_interval=6")
    assert "--sample_tokens=32 exceeds --seq_len=32: pass --sample_tokens=29" in line
    for flag in ("tensorboard", "wandb"):
        monkeypatch.setitem(sys.modules, flag, None)  # as if not installed
        assert f"--{flag}=true needs the {flag} package" in refusal(tmp_path / flag, data_dir, f"--{flag}=true")
    assert not any((tmp_path / name).exists() for name in ("sample", "tensorboard", "wandb"))
