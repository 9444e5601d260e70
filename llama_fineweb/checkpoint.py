"""Save and load the full training state: atomic, verified, keep-last-k, loadable on any GPU count.

Layout of a run directory:

    out_dir/
      step_0001000/      model + optimizer via torch.distributed.checkpoint (.distcp + .metadata)
        meta.json        step, run id, configs, the JSON states (loader, RNG, progress), and the
                         size and checksum of every file beside it
      latest             the name of the newest complete checkpoint ("step_0001000")
      .lock              held (flock) by the job running in out_dir

The contract: `save(out_dir, step, state)` takes a mapping of named stateful objects, each with
`state_dict()` / `load_state_dict()`. The model and optimizer, wrapped as `ModelState` and
`OptimizerState`, go to torch.distributed.checkpoint, which stores each tensor once with its
global shape, so a checkpoint written by 8 ranks loads on 1, 2 or 4, DDP or FSDP. Every other
object's state_dict() is JSON and goes into meta.json under its name. `load(ckpt, state)` is
the same mapping in reverse.

Crash safety: a checkpoint is written as `.tmp_step_XXXXXXX`, its files checksummed, meta.json
written last, then the directory is renamed; `latest` is replaced atomically after the rename.
A crash at any instant leaves `latest` naming a complete checkpoint. A full disk removes the
partial directory and says so in one line. Pruning removes only complete checkpoints of the same
run older than the one just saved. Loading checks every file's size and (with verify="full")
its checksum, and refuses non-finite tensors by name, so a corrupt checkpoint never spreads.

Loading never runs code: torch.distributed.checkpoint unpickles its `.metadata` and the
non-tensor values of a state dict with full pickle; the reader and planner below restrict the
first to the checkpoint's own metadata classes and load the second with `weights_only=True`.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import random
import re
import shutil
import socket
import subprocess
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import AsyncStager, DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from model import ModelConfig, Transformer, build_model

from . import hf_io, lora
from .metrics import LOG_FILE
from .utils import UserError, fsync_dir, write_atomic

META = "meta.json"
LATEST = "latest"
LOCK = ".lock"
STEP_RE = re.compile(r"step_(\d{7})")  # exactly what step_dir() writes; nothing else is ours
BLOCK = 64 << 20  # bytes per checksum block: blocks hash in parallel threads


class CheckpointError(UserError):
    """A checkpoint that is missing, incomplete, corrupt or unusable; one line naming the file."""


# ----------------------------------------------------------------------------- safe loading

_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        dtype = getattr(torch, name, None) if module == "torch" else None
        if (module, name) in _METADATA_GLOBALS or isinstance(dtype, (torch.dtype, torch.memory_format)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from checkpoint metadata")


class SafeReader(FileSystemReader):
    """A FileSystemReader whose metadata can only rebuild checkpoint-metadata objects."""

    def read_metadata(self, *args, **kwargs):
        rank = kwargs.get("rank")
        path = self._get_metadata_path(rank)
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is not None:
            metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """Loads the non-tensor values (optimizer hyperparameters, ...) with weights_only=True."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


# Saving or loading without a process group is how one-process runs work; no need to warn.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


# ----------------------------------------------------------------------------- stateful objects

class ModelState:
    """The model's weights for torch.distributed.checkpoint (unwrapped module: no DDP/compile prefixes).
    With trainable_only, only the parameters that train (a LoRA run's adapters): the frozen base
    comes from the base model the checkpoint refers to, not from the checkpoint."""

    def __init__(self, model: Transformer, trainable_only: bool = False):
        self.model = model
        self.options = StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)

    def state_dict(self) -> dict:
        return get_model_state_dict(self.model, options=self.options)

    def load_state_dict(self, state: dict) -> None:
        set_model_state_dict(self.model, state, options=self.options)


class OptimizerState:
    """AdamW's moments and step counts (with --optimizer=muon, Muon's momentum buffers beside them:
    one state dict keyed by parameter name, so an AdamW run's checkpoint is as before). The
    hyperparameters (lr, betas, weight decay) stay those of the optimizer as built from this run's
    config, so a deliberate change on resume holds."""

    def __init__(self, model: Transformer, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer
        self.parts = getattr(optimizer, "optimizers", optimizer)  # step.MuonAdamW: (Muon, AdamW)

    def state_dict(self) -> dict:
        return get_optimizer_state_dict(self.model, self.parts)

    def load_state_dict(self, state: dict) -> None:
        configured = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        set_optimizer_state_dict(self.model, self.parts, state)
        for group, fresh in zip(self.optimizer.param_groups, configured):
            group.update(fresh)


class RNGState:
    """Every rank's Python, NumPy, torch and CUDA RNG states (collective: all ranks call both)."""

    def state_dict(self) -> list[dict]:
        if not dist.is_initialized():
            return [_rng_state()]
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, _rng_state())
        return everyone

    def load_state_dict(self, states: list[dict]) -> None:
        rank = dist.get_rank() if dist.is_initialized() else 0
        _set_rng_state(states[rank] if rank < len(states) else states[0])


def _rng_state() -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def _set_rng_state(saved: dict) -> None:
    py = saved["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = saved["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(torch.tensor(saved["torch"], dtype=torch.uint8))
    if "cuda" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(saved["cuda"], dtype=torch.uint8))


def _tensor_states(state: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if isinstance(v, (ModelState, OptimizerState))}


# ----------------------------------------------------------------------------- helpers

def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier(group=None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


def _everyone(obj, group=None):
    """`obj` from every rank, in rank order (a list of one without a process group). `group`: the
    process group of an asynchronous save's thread, apart from the training loop's collectives."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=group)
    return out


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def step_dir(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / f"step_{step:07d}"


def file_checksum(path: str | Path, threads: int = 8) -> str:
    """sha256 over the sha256 of each 64 MiB block: blocks hash in parallel (hashlib releases the
    GIL), so one large file verifies at several times a single thread's speed."""
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        def block(offset: int) -> bytes:
            return hashlib.sha256(os.pread(fd, BLOCK, offset)).digest()

        with ThreadPoolExecutor(max(1, threads)) as pool:
            digests = list(pool.map(block, range(0, max(size, 1), BLOCK)))
    finally:
        os.close(fd)
    return hashlib.sha256(b"".join(digests)).hexdigest()


def _data_files(ckpt: Path) -> list[str]:
    return sorted(p.name for p in ckpt.iterdir() if p.is_file() and p.name != META)


def _checksums(ckpt: Path, group=None) -> dict[str, dict]:
    """{file: {bytes, sha256}} of the checkpoint's files, the work split across ranks."""
    names = _data_files(ckpt)
    mine = {n: {"bytes": (ckpt / n).stat().st_size, "sha256": file_checksum(ckpt / n)}
            for n in names[_rank()::_world()]}
    merged: dict[str, dict] = {}
    for part in _everyone(mine, group):
        merged.update(part)
    return merged


def _floating_tensors(tree: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """(dotted name, tensor) for every floating-point tensor in nested dicts and lists."""
    if isinstance(tree, Mapping):
        return [item for k, v in tree.items() for item in _floating_tensors(v, f"{prefix}{k}.")]
    if isinstance(tree, (list, tuple)):
        return [item for i, v in enumerate(tree) for item in _floating_tensors(v, f"{prefix}{i}.")]
    if isinstance(tree, torch.Tensor) and tree.is_floating_point():
        return [(prefix.rstrip("."), tree.to_local() if hasattr(tree, "to_local") else tree)]
    return []


def _first_nonfinite(tree: Mapping[str, Any]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or inf (one device sync in all)."""
    named = _floating_tensors(tree)
    if not named:
        return None
    device = named[0][1].device
    finite = torch.stack([torch.isfinite(t).all().to(device) for _, t in named]).tolist()
    return next((name for (name, _), ok in zip(named, finite) if not ok), None)


def _one_bad_name(name: str | None, group=None) -> str | None:
    """The first rank's non-None name, the same on every rank."""
    return next((n for n in _everyone(name, group) if n), None)


# ----------------------------------------------------------------------------- save

def save(out_dir: str | Path, step: int, state: Mapping[str, Any], meta: dict | None = None,
         keep_last: int = 3, keep: Path | None = None) -> Path:
    """Write `state` as checkpoint `step` (collective: every rank calls it); returns its path.
    Pruning never removes `keep` (the run's last good checkpoint).

    CheckpointError, with the partial directory removed and the previous checkpoints intact, if a
    tensor is not finite or the disk fills up."""
    pending = _prepare(Path(out_dir), step, state, meta, keep_last, keep)
    try:
        dcp.save(pending.tensors, checkpoint_id=pending.tmp)
    except (OSError, RuntimeError, CheckpointException) as e:
        pending.fail(e)
    return pending.finish()


class _PendingSave:
    """One save between its staging and its completion: the temporary directory, the JSON states
    and meta.json's entries as they were at the step, and the finishing steps (checksums, meta.json
    last, rename, latest, prune) that may run only once every tensor file is written."""

    def __init__(self, out_dir: Path, step: int, tensors: dict, meta: dict, keep_last: int,
                 keep: Path | None, group=None):
        self.out_dir, self.step, self.tensors, self.meta = out_dir, step, tensors, meta
        self.keep_last, self.keep, self.group = keep_last, keep, group
        self.final, self.tmp = step_dir(out_dir, step), out_dir / f".tmp_step_{step:07d}"

    def fail(self, e: BaseException):
        # torch's writers report a full disk as a RuntimeError ("unexpected pos") as often as
        # ENOSPC: the free space left at the failure tells them apart.
        nearly_full = _free_bytes(self.out_dir) < 64 << 20
        if _rank() == 0:
            shutil.rmtree(self.tmp, ignore_errors=True)
        raise CheckpointError(_save_failure(self.out_dir, self.step, e, nearly_full)) from None

    def finish(self) -> Path:
        out_dir, final, tmp = self.out_dir, self.final, self.tmp
        try:
            files = _checksums(tmp, self.group)
            if _rank() == 0:
                meta = {**self.meta, "files": files, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
                write_atomic(tmp / META, json.dumps(meta, indent=1))
                # A step saved again (after a rollback, or a resume from an older checkpoint): the old
                # copy steps aside until the new one is in place, so a crash leaves one of them whole.
                replaced = out_dir / f".replaced_{final.name}"
                if final.exists():
                    shutil.rmtree(replaced, ignore_errors=True)
                    os.replace(final, replaced)
                os.replace(tmp, final)
                fsync_dir(out_dir)
                shutil.rmtree(replaced, ignore_errors=True)
                write_atomic(out_dir / LATEST, final.name + "\n")
                prune(out_dir, self.keep_last, newest=final, keep=self.keep)
        except (OSError, RuntimeError, CheckpointException) as e:
            self.fail(e)
        _barrier(self.group)
        return final


def _nonfinite_error(out_dir: Path, step: int, bad: str) -> CheckpointError:
    return CheckpointError(f"not saving step {step}: {bad} holds NaN or inf; the last good "
                           f"checkpoint in {out_dir} is kept")


def _prepare(out_dir: Path, step: int, state: Mapping[str, Any], meta: dict | None, keep_last: int,
             keep: Path | None, group=None) -> _PendingSave:
    """The part of a save that reads the live state: the tensors' state dicts (checked finite here
    unless an asynchronous save checks its staged copy in its thread) and the JSON states of this
    step, and an empty temporary directory."""
    tensors = {name: obj.state_dict() for name, obj in _tensor_states(state).items()}
    bad = None if group is not None else _one_bad_name(_first_nonfinite(tensors))
    if bad:
        raise _nonfinite_error(out_dir, step, bad)
    # JSON states are collected on every rank (the RNG state is a collective); rank 0 writes them.
    json_states = {name: obj.state_dict() for name, obj in state.items() if name not in tensors}
    meta = {**(meta or {}), **json_states, "step": step, "torch_version": torch.__version__,
            "git_commit": git_commit() if _rank() == 0 else None, "world_size": _world()}
    model = state.get("model")
    if isinstance(getattr(getattr(model, "model", None), "config", None), ModelConfig):
        meta.setdefault("model_config", model.model.config.to_dict())
    pending = _PendingSave(out_dir, step, tensors, meta, keep_last, keep, group or None)
    try:
        if _rank() == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(pending.tmp, ignore_errors=True)
            pending.tmp.mkdir()
    except OSError as e:
        pending.fail(e)
    _barrier()
    return pending


class AsyncSaver:
    """Checkpoints written while training goes on (--async_save): save() stages the state in CPU
    memory (pinned on CUDA) and returns; torch.distributed.checkpoint.async_save writes the files
    in a thread, and the same thread then finishes the checkpoint exactly as save() does. At most
    one save is in flight: the next one waits for it. The thread's collectives run on a process
    group of their own (gloo), so they never interleave with the loop's."""

    SLOW_ENV = "LLAMA_FINEWEB_SLOW_SAVE"  # tests: "STEP:SECONDS", that step's save finishes that much later

    def __init__(self, device: torch.device):
        # The thread's collectives need a group of their own (gloo: async_save needs a CPU backend);
        # False where there is no process group, which also tells _prepare to leave the check here.
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else False
        self.stager = DefaultStager(StagingOptions(use_pinned_memory=device.type == "cuda", use_shared_memory=False,
                                                   use_async_staging=False, use_non_blocking_copy=False))
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
        self.future = None

    def save(self, out_dir: str | Path, step: int, state: Mapping[str, Any], meta: dict | None = None,
             keep_last: int = 3, keep: Path | None = None) -> Path:
        """Start writing checkpoint `step` (collective); returns the path it will have."""
        self.wait()
        pending = _prepare(Path(out_dir), step, state, meta, keep_last, keep, self.group)
        slow_step, _, seconds = os.environ.get(self.SLOW_ENV, "").partition(":")
        delay = float(seconds or 600) if slow_step == str(step) else 0.0
        group = self.group or None
        staged = self.stager.stage(pending.tensors)  # the copy that is written; the live tensors train on
        pending.tensors = None
        try:
            writing = dcp.async_save(staged, checkpoint_id=pending.tmp, process_group=group,
                                     async_stager=_AlreadyStaged())
        except (OSError, RuntimeError, CheckpointException) as e:
            pending.fail(e)

        def complete() -> Path:
            time.sleep(delay)
            try:
                writing.result()
            except (OSError, RuntimeError, CheckpointException) as e:
                pending.fail(e)
            # Checked here, on the staged copy, as save() checks before writing: a checkpoint with
            # NaN or inf is never completed (its temporary directory goes).
            bad = _one_bad_name(_first_nonfinite(staged), group)
            if bad:
                if _rank() == 0:
                    shutil.rmtree(pending.tmp, ignore_errors=True)
                raise _nonfinite_error(pending.out_dir, pending.step, bad)
            return pending.finish()

        self.future = self.pool.submit(complete)
        return pending.final

    def in_flight(self) -> bool:
        """A save started and not yet complete (this rank's view: no collective)."""
        return self.future is not None and not self.future.done()

    def wait(self) -> Path | None:
        """Block until the save in flight (if any) is complete; its path. CheckpointError if it failed."""
        future, self.future = self.future, None
        return None if future is None else future.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.pool.shutdown()
            self.stager.close()


def _free_bytes(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 1 << 62


def _save_failure(out_dir: Path, step: int, e: BaseException, nearly_full: bool) -> str:
    if isinstance(e, CheckpointException) and e.failures:
        first = next(iter(e.failures.values()))
        e = first[0] if isinstance(first, tuple) else first
    if nearly_full or (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)):
        return (f"saving step {step} failed: disk full in {out_dir} ({_free_bytes(out_dir) / 2**30:.2f} "
                f"GiB free once the partial checkpoint was removed): free space, lower --keep_last or "
                f"move --out_dir; the previous checkpoints are intact")
    reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return (f"saving step {step} to {out_dir} failed ({type(e).__name__}: {reason[:200]}); the partial "
            f"checkpoint was removed and the previous ones are intact")


def complete_checkpoints(out_dir: str | Path) -> list[Path]:
    """The complete checkpoints in out_dir (named exactly step_NNNNNNN, with meta.json), oldest first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [p for p in out_dir.iterdir() if STEP_RE.fullmatch(p.name) and (p / META).is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def prune(out_dir: Path, keep_last: int, newest: Path, keep: Path | None = None) -> None:
    """Delete complete checkpoints of `newest`'s run that are older than it, beyond the newest
    `keep_last`. Checkpoints of other runs, later steps, `keep` (the last one known to be good:
    a checkpoint written after a spike must not push it out), the base of a LoRA run (is_pinned)
    and names that are not exactly ours (`step_0000004.good`) are never touched."""
    if keep_last <= 0:
        return
    run_id = read_meta(newest).get("run_id")
    newest_step = int(newest.name[5:])
    ours = [p for p in complete_checkpoints(out_dir)
            if int(p.name[5:]) <= newest_step and _run_id(p) == run_id]
    for old in ours[:-keep_last]:
        if old != newest and (keep is None or old.resolve() != Path(keep).resolve()) and not is_pinned(old):
            shutil.rmtree(old, ignore_errors=True)


def _run_id(ckpt: Path) -> str | None:
    try:
        return read_meta(ckpt).get("run_id")
    except CheckpointError:
        return None


class _AlreadyStaged(AsyncStager):
    """AsyncSaver stages (and keeps) the copy itself, to check it in the thread: nothing more to do."""

    _synchronize_after_execute = False

    def stage(self, state_dict):
        return state_dict

    def close(self) -> None:
        pass


def remove_incomplete(out_dir: str | Path) -> None:
    """Delete the partial checkpoints a killed run left behind (rank 0 only); a checkpoint that a
    kill caught while it was being replaced by a new save of its step comes back."""
    for tmp in Path(out_dir).glob(".tmp_step_*"):
        shutil.rmtree(tmp, ignore_errors=True)
    for old in Path(out_dir).glob(".replaced_step_*"):
        final = old.parent / old.name[len(".replaced_"):]
        if (final / META).is_file():
            shutil.rmtree(old, ignore_errors=True)
        else:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(old, final)


REJECTED = "rejected"  # where a rollback moves the checkpoints written after its target


def set_aside(out_dir: str | Path, after_step: int) -> list[Path]:
    """Move the complete checkpoints of out_dir past `after_step` into out_dir/rejected/ (a rollback
    found their weights bad: kept for a look, never resumed or pruned); their new paths."""
    out_dir = Path(out_dir)
    later = [p for p in complete_checkpoints(out_dir) if int(p.name[5:]) > after_step] if out_dir.is_dir() else []
    moved = []
    for ckpt in later:
        (out_dir / REJECTED).mkdir(exist_ok=True)
        target = out_dir / REJECTED / ckpt.name
        n = 1
        while target.exists():
            n += 1
            target = out_dir / REJECTED / f"{ckpt.name}_{n}"
        os.replace(ckpt, target)
        moved.append(target)
    if moved:
        fsync_dir(out_dir)
    return moved


# What a run writes beside its checkpoints: a start-over moves or deletes these with them.
RUN_RECORDS = (LATEST, "metrics.jsonl", LOG_FILE, "spikes")  # spikes/: stability.spike_forensics


def start_over(out_dir: str | Path, how: str) -> str:
    """Move ("archive") or delete ("delete") a run directory's checkpoints and records (latest,
    metrics, log, spike forensics), so a new run can start in it; returns what was done, for the
    log. A Logger holding the old files open must reopen them (Logger.reopen)."""
    out_dir = Path(out_dir)
    old = [*complete_checkpoints(out_dir), *(out_dir / n for n in RUN_RECORDS)]
    old = [p for p in old if p.exists()]
    if how == "delete":
        for p in old:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        return f"deleted {len(old)} old entries of {out_dir}"
    archive = out_dir / time.strftime("archive_%Y%m%d_%H%M%S")
    archive.mkdir()
    for p in old:
        os.replace(p, archive / p.name)
    return f"moved the old checkpoints of {out_dir} to {archive}"


# ----------------------------------------------------------------------------- find and read

def resolve(path: str | Path) -> Path | None:
    """A checkpoint directory from a run directory (its `latest`) or a checkpoint directory.
    None for a run directory with no complete checkpoint yet. A `latest` that is missing,
    unreadable or names an incomplete checkpoint falls back to the newest complete one."""
    path = Path(path)
    if (path / META).is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(f"{path} does not exist: pass a run directory or a step_* directory")
    try:
        name = (path / LATEST).read_bytes().decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        name = ""
    if STEP_RE.fullmatch(name) and (path / name / META).is_file():
        return path / name
    complete = complete_checkpoints(path)
    return complete[-1] if complete else None


def read_meta(ckpt: str | Path) -> dict:
    path = Path(ckpt) / META
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path} ({type(e).__name__}): it is corrupt; "
                              f"resume from another step_* directory") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise CheckpointError(f"{path} is not a checkpoint's meta.json (no step); resume from another "
                              f"step_* directory")
    return meta


RESUME_ADVICE = "resume from an older step_* directory (--resume=PATH)"


def verify(ckpt: str | Path, full: bool = True, advice: str = RESUME_ADVICE) -> None:
    """CheckpointError unless every file has the size (and, with full, the checksum) recorded at
    save; `advice` ends the message. Collective when distributed: the files are shared out among
    the ranks."""
    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
    recorded = meta.get("files")
    if recorded is None:  # written before checksums were recorded: check sizes against DCP's metadata
        _verify_sizes_from_metadata(ckpt)
        return
    names = sorted(recorded)
    problem = None
    for name in names[_rank()::_world()]:
        path, want = ckpt / name, recorded[name]
        have = path.stat().st_size if path.is_file() else None
        if have != want["bytes"]:
            state = "missing" if have is None else f"{have:,} bytes, not the {want['bytes']:,} recorded"
            problem = f"checkpoint file {path} is {state}"
        elif full and file_checksum(path) != want["sha256"]:
            problem = f"checkpoint file {path} does not match its recorded checksum (corrupt)"
        if problem:
            break
    problem = _one_bad_name(problem)
    if problem:
        raise CheckpointError(f"{problem}; {advice}")


def _verify_sizes_from_metadata(ckpt: Path) -> None:
    try:
        metadata = SafeReader(ckpt).read_metadata()
    except Exception as e:
        raise CheckpointError(f"checkpoint {ckpt} has unreadable metadata ({type(e).__name__}: {e}); "
                              f"resume from an older step_* directory instead") from None
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in needed.items():
        path = ckpt / name
        have = path.stat().st_size if path.is_file() else None
        if have is None or have < size:
            state = "missing" if have is None else f"truncated ({have:,} of {size:,} bytes)"
            raise CheckpointError(f"checkpoint file {path} is {state}; "
                                  f"resume from an older step_* directory instead")


# ----------------------------------------------------------------------------- load

def load(ckpt: str | Path, state: Mapping[str, Any], verify_files: str = "full",
         advice: str = RESUME_ADVICE) -> dict:
    """Load `state` (the mapping save took, or part of it) from `ckpt` in place; returns its
    meta.json. verify_files: "full" (sizes and checksums), "size" or "none"; `advice` ends the
    message of a corrupt checkpoint. Collective when distributed: every rank calls it."""
    ckpt = Path(ckpt)
    meta = _upgrade(read_meta(ckpt))
    if verify_files != "none":
        verify(ckpt, full=verify_files == "full", advice=advice)
    missing = [name for name in state if name not in _tensor_states(state) and name not in meta]
    if missing:
        raise CheckpointError(f"{ckpt / META} has no {', '.join(missing)}: it was not written by a "
                              f"training run; use --init_from={ckpt} to start from its weights")
    tensors = {name: obj.state_dict() for name, obj in _tensor_states(state).items()}
    try:
        dcp.load(tensors, storage_reader=SafeReader(ckpt), planner=SafeLoadPlanner())
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        if isinstance(e, CheckpointException) and e.failures:
            e = next(iter(e.failures.values()))  # (exception, traceback) of the first failing rank
            e = e[0] if isinstance(e, tuple) else e
        raise CheckpointError(f"checkpoint {ckpt} does not fit this model or is corrupt "
                              f"({type(e).__name__}: {str(e)[:300]}); resume from another "
                              f"step_* directory or check the model config") from None
    bad = _one_bad_name(_first_nonfinite(tensors))
    if bad:
        raise CheckpointError(f"checkpoint {ckpt} holds NaN or inf in {bad}; {advice}")
    for name, obj in state.items():
        obj.load_state_dict(tensors[name] if name in tensors else meta[name])
    return meta


def _upgrade(meta: dict) -> dict:
    """Checkpoints written before the run's counters had their own entry kept them at the top."""
    if "progress" not in meta and "tokens_seen" in meta:
        meta = {**meta, "progress": {"step": meta["step"], "tokens_seen": meta["tokens_seen"]}}
    return meta


def load_model(path: str | Path, device: torch.device | str = "cpu", verify_files: str = "size",
               merge: bool = True, lora_base: str | Path | None = None) -> Transformer:
    """Our model with the weights of a checkpoint (a step directory or a run directory), in eval
    mode. Sizes are checked by default; pass verify_files="full" for the checksums too. A LoRA
    run's checkpoint is its base model (checked against the reference it recorded; read from
    `lora_base` when given, for a base moved since) with the adapters attached, merged into the
    weights unless merge=False."""
    ckpt = resolve(path)
    if ckpt is None:
        raise CheckpointError(f"{path} holds no checkpoint yet")
    meta = read_meta(ckpt)
    if "model_config" not in meta:
        raise CheckpointError(f"{ckpt / META} has no model_config: not one of our checkpoints")
    try:
        config = ModelConfig(**meta["model_config"])
    except (TypeError, ValueError) as e:  # an edited or damaged meta.json
        raise CheckpointError(f"{ckpt / META} has an unusable model_config ({e}): resume from another step_* "
                              f"directory") from None
    model = build_model(config, device)  # weights overwritten below
    adapter = meta.get("lora")
    if lora_base and not adapter:
        raise CheckpointError(f"--lora_base={lora_base} but {ckpt} holds a whole model, not LoRA adapters: "
                              f"drop --lora_base")
    if adapter:
        base = check_base(adapter["base"], ckpt, now=lora_base)
        load_weights_into(base["path"], model, verify_files)
        lora.attach(model, lora.LoraSpec.from_dict(adapter["spec"]))
    load(ckpt, {"model": ModelState(model, trainable_only=bool(adapter))}, verify_files)
    if adapter and merge:
        lora.merge(model)
    return model.eval()


def load_weights_into(path: str | Path, model: Transformer, verify_files: str = "full") -> None:
    """Weights only into `model`, from our checkpoint, an imported weights directory
    (export_hf.py --from_hf) or a Hugging Face Llama directory; CheckpointError if they do not fit."""
    path = Path(path)
    if (path / "config.json").is_file():
        hf_io.check_vocabulary(path)
    if (path / "config.json").is_file() or (path / "model_config.json").is_file():
        # Read on the CPU: a second full copy on the GPU would double its memory for a moment.
        source = (hf_io.load_hf(path, device="cpu", pad_vocab_to=model.config.vocab_size)
                  if (path / "config.json").is_file() else hf_io.load_weights(path))
        config, state = source.config, source.state_dict()
    else:
        ckpt = resolve(path)
        if ckpt is None:
            raise CheckpointError(f"--init_from={path}: no checkpoint there")
        meta = read_meta(ckpt)
        if meta.get("lora"):
            raise CheckpointError(f"{ckpt} holds LoRA adapters, not a whole model: export_hf.py --checkpoint "
                                  f"{ckpt} --out DIR writes the merged model, which can be a base")
        config, state = meta.get("model_config", {}), None
    diffs = model.config.differences(config, weights_only=True)
    if diffs:
        raise CheckpointError(f"--init_from={path} does not match the model config: " + "; ".join(diffs))
    if state is None:
        load(ckpt, {"model": ModelState(model)}, verify_files=verify_files)
    else:
        model.load_state_dict(state)


# ----------------------------------------------------------------------------- a LoRA run's base

def base_reference(path: str | Path) -> dict:
    """What a LoRA run records of its base model: the absolute path (a run directory resolved to
    its step directory) and a sha256 over the base's files. For our checkpoints that is the hash
    of the checksums its meta.json records (loading verifies the files against them); for weights
    and Hugging Face directories, the hash of every weight and config file."""
    path = Path(path)
    if (path / "config.json").is_file() or (path / "model_config.json").is_file():
        names = sorted(p.name for p in path.iterdir() if p.is_file() and
                       (p.suffix == ".safetensors" or p.name in ("config.json", "model_config.json", hf_io.INDEX_FILE)))
        files = {name: file_checksum(path / name) for name in names}
    else:
        ckpt = resolve(path)
        if ckpt is None:
            raise CheckpointError(f"--init_from={path}: no checkpoint there")
        path, files = ckpt, read_meta(ckpt).get("files")
        if files is None:
            raise CheckpointError(f"{ckpt} records no file checksums (written by an older version): export it "
                                  f"(export_hf.py) and pass the export as --init_from")
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return {"path": str(path.resolve()), "sha256": digest}


def check_base(reference: dict, ckpt: Path, now: str | Path | None = None) -> dict:
    """The reference of the base at `now` (default: the recorded path), which must have the
    recorded sha256: an adapter only means something on the weights it was trained on. A base
    moved with its bytes unchanged is found at its new path (`now`); CheckpointError otherwise."""
    now = now or reference["path"]
    try:
        current = base_reference(now)
    except (CheckpointError, OSError):
        current = None
    if current is None or current["sha256"] != reference["sha256"]:
        state = "is gone" if current is None else "changed since"
        raise CheckpointError(f"the base model of the LoRA adapters in {ckpt} {state} ({now}; recorded "
                              f"{reference['path']} with sha256 {reference['sha256'][:12]}...): the adapters only "
                              f"fit the weights they were trained on; restore that base, or name its new place "
                              f"with --lora_base=PATH (finetune.py: --init_from=PATH), or fine-tune anew")
    return current


BASE_OF = "lora_runs"  # in a checkpoint that LoRA runs use as their base: one file per such run


def pin_base(reference: dict, lora_out_dir: str | Path) -> str | None:
    """Mark the base checkpoint of a LoRA run in `lora_out_dir` so that its own run's pruning keeps
    it (prune); None when done or nothing to do (a weights or Hugging Face directory is never
    pruned), else why not, for a warning."""
    base = Path(reference["path"])
    if not (base / META).is_file():
        return None
    out_dir = str(Path(lora_out_dir).resolve())
    try:
        (base / BASE_OF).mkdir(exist_ok=True)
        name = hashlib.sha256(out_dir.encode()).hexdigest()[:16] + ".json"
        write_atomic(base / BASE_OF / name, json.dumps({"out_dir": out_dir}) + "\n")
    except OSError as e:
        return (f"could not mark {base} as the base of {out_dir} ({e.strerror}): pruning in its run may "
                f"remove it (keep_last); keep a copy, or export it (export_hf.py) and fine-tune from that")
    return None


def is_pinned(ckpt: Path) -> bool:
    """Whether a LoRA run whose directory still exists uses `ckpt` as its base (pin_base)."""
    for pin in (ckpt / BASE_OF).glob("*.json") if (ckpt / BASE_OF).is_dir() else ():
        try:
            if Path(json.loads(pin.read_text())["out_dir"]).is_dir():
                return True
        except (OSError, ValueError, KeyError, TypeError):
            return True  # unreadable: keep the checkpoint rather than guess
    return False


# ----------------------------------------------------------------------------- the run's lock

class RunLock:
    """An advisory lock on out_dir for the life of a job (rank 0 holds it). The OS releases it
    when the process dies, so a killed job never blocks the next one."""

    def __init__(self, out_dir: str | Path):
        import fcntl  # noqa: PLC0415 - POSIX only, like the rest of the launcher story

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / LOCK
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise CheckpointError(f"{out_dir} is in use by {holder}: wait for that job to end, or "
                                  f"choose another --out_dir") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"host {socket.gethostname()} pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self.file.flush()

    def close(self) -> None:
        if not self.file.closed:
            self.file.close()
