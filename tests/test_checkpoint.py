"""checkpoint.py in process: the save/load contract, pruning, `latest`, integrity checks, safety."""

from __future__ import annotations

import errno
import json
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_tiny_model
from llama_fineweb import checkpoint
from llama_fineweb.checkpoint import CheckpointError, ModelState, OptimizerState
from runs import call_main, run_here


class Counter:
    """A JSON stateful object, like the loader or the run's counters."""

    def __init__(self, value: int = 0):
        self.value = value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


def trained_state(seed: int = 0):
    """A small model with an optimizer that has taken one step (so AdamW has moments)."""
    model = make_tiny_model(seed, vocab_size=256).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = torch.randint(0, 256, (2, 16))
    model(idx, idx).backward()
    optimizer.step()
    optimizer.zero_grad()
    return model, optimizer


def state_of(model, optimizer, counter=None) -> dict:
    state = {"model": ModelState(model), "optim": OptimizerState(model, optimizer)}
    if counter is not None:
        state["counter"] = counter
    return state


def save(out_dir: Path, step: int, run_id: str = "run-a", keep_last: int = 0, seed: int = 0) -> Path:
    model, optimizer = trained_state(seed)
    return checkpoint.save(out_dir, step, state_of(model, optimizer, Counter(step)), {"run_id": run_id},
                           keep_last=keep_last)


def test_round_trip_restores_model_optimizer_and_json_states(tmp_path):
    """Model, AdamW moments and a JSON state come back exactly; meta.json records the rest."""
    model, optimizer = trained_state(0)
    path = checkpoint.save(tmp_path, 3, state_of(model, optimizer, Counter(41)), {"run_id": "r"})
    fresh, fresh_opt = trained_state(1)
    counter = Counter()
    meta = checkpoint.load(path, state_of(fresh, fresh_opt, counter))
    assert counter.value == 41 and meta["step"] == 3 and meta["run_id"] == "r"
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(optimizer.state[p]["exp_avg_sq"], fresh_opt.state[q]["exp_avg_sq"])
    assert set(meta["files"]) == {p.name for p in path.iterdir() if p.name != "meta.json"}


def test_optimizer_hyperparameters_come_from_the_running_config(tmp_path):
    """Loading AdamW's state keeps the lr and betas the optimizer was built with."""
    model, optimizer = trained_state(0)
    path = checkpoint.save(tmp_path, 1, state_of(model, optimizer))
    fresh = make_tiny_model(1, vocab_size=256)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=5e-5, betas=(0.8, 0.9))
    checkpoint.load(path, state_of(fresh, fresh_opt))
    assert fresh_opt.param_groups[0]["lr"] == 5e-5 and fresh_opt.param_groups[0]["betas"] == (0.8, 0.9)


def test_keep_last_prunes_the_oldest_checkpoints_of_the_run(tmp_path):
    """keep_last=2 over five saves leaves the two newest."""
    for step in range(1, 6):
        save(tmp_path, step, keep_last=2)
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step_0000004", "step_0000005"]


def test_pruning_never_removes_the_new_checkpoint_or_what_is_not_this_runs(tmp_path):
    """A save after resuming from an older step, another run's checkpoint and a user's copy survive."""
    save(tmp_path, 8, run_id="old-run")
    save(tmp_path, 2, run_id="this-run")
    user_copy = tmp_path / "step_0000002.good"
    user_copy.mkdir()
    (user_copy / "meta.json").write_text("{}")
    save(tmp_path, 3, run_id="this-run", keep_last=1)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"step_0000003", "step_0000008", "step_0000002.good"} <= names and "step_0000002" not in names
    assert checkpoint.resolve(tmp_path).name == "step_0000003"
    # resumed from step 3 of old-run's successor: saving an older step than the newest keeps it
    save(tmp_path, 1, run_id="this-run", keep_last=1)
    assert checkpoint.resolve(tmp_path).name == "step_0000001"


@pytest.mark.parametrize("latest", [b"step_0000009\n", b"\x93\xff garbage \x00", b""])
def test_a_stale_or_garbled_latest_falls_back_to_the_newest_complete(tmp_path, latest):
    """`latest` naming a missing step, random bytes or nothing: the newest complete checkpoint."""
    save(tmp_path, 1)
    save(tmp_path, 2)
    (tmp_path / "latest").write_bytes(latest)
    assert checkpoint.resolve(tmp_path).name == "step_0000002"


def test_a_truncated_file_is_refused_naming_it(tmp_path):
    """A .distcp cut short: CheckpointError naming the file and its sizes, even without checksums."""
    path = save(tmp_path, 1)
    data = next(path.glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:1000])
    for mode in ("full", "size"):
        with pytest.raises(CheckpointError, match=rf"{data.name} is 1,000 bytes"):
            checkpoint.load(path, state_of(*trained_state()), verify_files=mode)


def test_overwritten_bytes_are_refused_by_the_checksum(tmp_path):
    """Same size, other bytes: the recorded checksum catches it."""
    path = save(tmp_path, 1)
    data = next(path.glob("*.distcp"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 4096] = b"\xff" * 4096
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="does not match its recorded checksum"):
        checkpoint.load(path, state_of(*trained_state()))


def test_nan_in_a_loaded_tensor_is_refused_naming_it(tmp_path):
    """With sizes-only verification, NaN bytes in the data are still refused, by tensor name."""
    path = save(tmp_path, 1)
    data = next(path.glob("*.distcp"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 4096] = b"\xff" * 4096  # 0xffffffff is a float32 NaN
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"holds NaN or inf in (model|optim)\.\S+"):
        checkpoint.load(path, state_of(*trained_state()), verify_files="size")


def test_non_finite_weights_are_never_saved(tmp_path):
    """A NaN weight: CheckpointError naming it; no directory written, the previous one is latest."""
    save(tmp_path, 1)
    model, optimizer = trained_state()
    with torch.no_grad():
        model.layers[1].attention.wq.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.attention\.wq\.weight holds NaN"):
        checkpoint.save(tmp_path, 2, state_of(model, optimizer))
    assert not (tmp_path / "step_0000002").exists() and not list(tmp_path.glob(".tmp_*"))
    assert checkpoint.resolve(tmp_path).name == "step_0000001"


def test_disk_full_removes_the_partial_checkpoint(tmp_path, monkeypatch):
    """ENOSPC in the middle of writing: one-line error saying so; the previous checkpoint stays."""
    save(tmp_path, 1)

    def full_disk(state, checkpoint_id):
        (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.dcp, "save", full_disk)
    with pytest.raises(CheckpointError, match="disk full in .* GiB free") as e:
        save(tmp_path, 2)
    assert "\n" not in str(e.value)
    assert not list(tmp_path.glob(".tmp_*")) and checkpoint.resolve(tmp_path).name == "step_0000001"


class _CreatesAFile:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_malicious_metadata_pickle_is_refused(tmp_path):
    """A .metadata whose unpickling would create a file: refused, the file never appears."""
    path = save(tmp_path, 1)
    marker = tmp_path / "pwned"
    evil = pickle.dumps(_CreatesAFile(str(marker)))
    (path / ".metadata").write_bytes(evil)
    # The attacker rewrites meta.json's checksums too: the safe unpickler must still refuse.
    meta = json.loads((path / "meta.json").read_text())
    meta["files"][".metadata"] = {"bytes": len(evil), "sha256": checkpoint.file_checksum(path / ".metadata")}
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="refusing to load"):
        checkpoint.load(path, state_of(*trained_state()))
    assert not marker.exists()


def test_a_meta_without_a_needed_state_is_one_line(tmp_path):
    """meta.json lacking a JSON state the caller asks for: CheckpointError naming it, no KeyError."""
    path = save(tmp_path, 1)
    meta = json.loads((path / "meta.json").read_text())
    del meta["counter"]
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="has no counter"):
        checkpoint.load(path, {**state_of(*trained_state()), "counter": Counter()})


def test_load_model_builds_the_saved_model(tmp_path):
    """load_model(run dir) returns the model of `latest`, in eval mode, with its weights."""
    model, optimizer = trained_state(3)
    checkpoint.save(tmp_path, 5, state_of(model, optimizer))
    loaded = checkpoint.load_model(tmp_path)
    assert not loaded.training and loaded.config == model.config
    idx = torch.randint(0, 256, (1, 8))
    assert torch.equal(loaded(idx), model.eval()(idx))


def test_run_lock_refuses_a_second_holder_until_released(tmp_path):
    """The second lock names the holder's host and pid; after release the next one gets it."""
    first = checkpoint.RunLock(tmp_path)
    with pytest.raises(CheckpointError, match=r"in use by host \S+ pid \d+"):
        checkpoint.RunLock(tmp_path)
    first.close()
    checkpoint.RunLock(tmp_path).close()


@pytest.mark.parametrize("entry", ["export_hf", "chat", "hellaswag", "eval_suite", "init_from"])
def test_overwritten_bytes_are_refused_outside_training(tmp_path, data_dir, entry):
    """Finite garbage (zeros) over part of a checkpoint: every script that reads checkpoints refuses it
    by its checksum in one line, and --verify=size is the escape (it loads)."""
    import chat
    import eval_suite
    import export_hf
    import hellaswag
    from runs import refusal

    ckpt = checkpoint.save(tmp_path / "run", 3, {"model": ModelState(make_tiny_model())})
    storage = checkpoint.SafeReader(ckpt).read_metadata().storage_data
    where = next(info for index, info in storage.items() if index.fqn.endswith("tok_embeddings.weight"))
    with open(ckpt / where.relative_path, "r+b") as f:  # the middle of the embedding's raw bytes
        f.seek(where.offset + where.length // 2)
        f.write(b"\x00" * 4096)
    if entry == "eval_suite":
        with pytest.raises(CheckpointError, match="does not match its recorded checksum"):
            eval_suite.load_checkpoint(ckpt, torch.device("cpu"))
        eval_suite.load_checkpoint(ckpt, torch.device("cpu"), verify="size")
        return
    if entry == "init_from":
        assert "does not match its recorded checksum" in refusal(tmp_path / "new", data_dir, f"--init_from={ckpt}")
        return
    main, argv = {
        "export_hf": (export_hf.main, ["--checkpoint", str(ckpt), "--out", str(tmp_path / "hf")]),
        "chat": (chat.main, ["--checkpoint", str(ckpt), "--prompt", "Hi", "--max_new_tokens", "1", "--device", "cpu"]),
        "hellaswag": (hellaswag.main, ["--checkpoint", str(ckpt), "--data", str(Path(__file__).parent / "data" /
                                       "hellaswag_sample.jsonl"), "--limit", "1", "--device", "cpu"]),
    }[entry]
    proc = call_main(main, argv, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "does not match its recorded checksum" in lines[0], proc.stderr
    call_main(main, [*argv, "--verify", "size"])


def test_checkpoint_restores_the_runs_random_states(tmp_path, data_dir):
    """A training checkpoint holds the Python, NumPy and torch RNG states of the step it saved:
    loading its "rng" puts back what the run (here, in this process) had when it saved."""
    run_here(tmp_path, data_dir, "--max_steps=2", "--save_interval=2")
    saved = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    torch.manual_seed(12345), np.random.seed(12345), random.seed(12345)
    checkpoint.load(checkpoint.resolve(tmp_path), {"rng": checkpoint.RNGState()}, verify_files="none")
    assert torch.equal(torch.get_rng_state(), saved[0])
    assert np.array_equal(np.random.get_state()[1], saved[1]) and random.getstate() == saved[2]
