"""Save and load the full training state: atomic, keep-last-k, loadable on any GPU count.

Layout of a run directory:

    out_dir/
      step_0001000/      model + optimizer via torch.distributed.checkpoint (.distcp + .metadata)
        meta.json        step, tokens seen, loader position, configs, RNG states, versions
      latest             the name of the newest complete checkpoint ("step_0001000")

A checkpoint is written as `.tmp_step_XXXXXXX`, then renamed; `latest` is replaced atomically
after the rename. A crash at any instant therefore leaves `latest` naming a complete checkpoint.
torch.distributed.checkpoint stores each tensor once with its global shape, so a checkpoint
written by 8 ranks loads on 1, 2 or 4, and the same format serves FSDP if it is added later.

Loading never runs code: torch.distributed.checkpoint unpickles its `.metadata` and the
non-tensor values of a state dict with full pickle; the reader and planner below restrict the
first to the checkpoint's own metadata classes and load the second with `weights_only=True`.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from model import ModelConfig, Transformer

META = "meta.json"
LATEST = "latest"
STEP_PREFIX = "step_"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or unreadable."""


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


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def step_dir(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / f"{STEP_PREFIX}{step:07d}"


def save(out_dir: str | Path, step: int, model: Transformer, optimizer: torch.optim.Optimizer,
         meta: dict, keep_last: int = 3) -> Path:
    """Write the full training state of `step` (collective: every rank calls it)."""
    out_dir = Path(out_dir)
    final = step_dir(out_dir, step)
    tmp = out_dir / f".tmp_{final.name}"
    if _rank() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp)
    if _rank() == 0:
        meta = {**meta, "step": step, "torch_version": torch.__version__, "git_commit": git_commit()}
        _write_atomic(tmp / META, json.dumps(meta, indent=2))
        if final.exists():  # a step saved again, e.g. after resuming from an older checkpoint
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(out_dir)
        _write_atomic(out_dir / LATEST, final.name + "\n")
        _prune(out_dir, keep_last)
    _barrier()
    return final


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(out_dir: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    complete = sorted(p for p in out_dir.glob(f"{STEP_PREFIX}*") if (p / META).is_file())
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def remove_incomplete(out_dir: str | Path) -> None:
    """Delete the partial checkpoints a killed run left behind (rank 0 only)."""
    for tmp in Path(out_dir).glob(f".tmp_{STEP_PREFIX}*"):
        shutil.rmtree(tmp, ignore_errors=True)


def resolve(path: str | Path) -> Path | None:
    """A checkpoint directory from a run directory (its `latest`) or a checkpoint directory.
    None for a run directory with no complete checkpoint yet."""
    path = Path(path)
    if (path / META).is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(f"{path} does not exist: pass a run directory or a step_* directory")
    latest = path / LATEST
    if latest.is_file():
        ckpt = path / latest.read_text().strip()
        if (ckpt / META).is_file():
            return ckpt
    # No usable `latest` (a kill between the rename and its update): the newest complete one.
    complete = sorted(p for p in path.glob(f"{STEP_PREFIX}*") if (p / META).is_file())
    return complete[-1] if complete else None


def read_meta(ckpt: str | Path) -> dict:
    path = Path(ckpt) / META
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


def verify(ckpt: str | Path) -> None:
    """CheckpointError unless every data file is at least as long as its metadata says."""
    ckpt = Path(ckpt)
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


def load(ckpt: str | Path, model: Transformer, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Load model (and optimizer) state from `ckpt` in place; returns its meta.json.
    Collective when distributed: every rank calls it."""
    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
    verify(ckpt)
    try:
        if optimizer is None:
            state = {"model": get_model_state_dict(model)}
            dcp.load(state, storage_reader=SafeReader(ckpt), planner=SafeLoadPlanner())
            set_model_state_dict(model, state["model"])
        else:
            model_state, optim_state = get_state_dict(model, optimizer)
            state = {"model": model_state, "optim": optim_state}
            dcp.load(state, storage_reader=SafeReader(ckpt), planner=SafeLoadPlanner())
            set_state_dict(model, optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optim"])
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        if isinstance(e, CheckpointException) and e.failures:
            e = next(iter(e.failures.values()))  # (exception, traceback) of the first failing rank
            e = e[0] if isinstance(e, tuple) else e
        raise CheckpointError(f"checkpoint {ckpt} does not fit this model or is corrupt "
                              f"({type(e).__name__}: {str(e)[:300]}); resume from another "
                              f"step_* directory or check the model config") from None
    return meta


def load_model(path: str | Path, device: torch.device | str = "cpu") -> Transformer:
    """Our model with the weights of a checkpoint (a step directory or a run directory)."""
    ckpt = resolve(path)
    if ckpt is None:
        raise CheckpointError(f"{path} holds no checkpoint yet")
    cfg = ModelConfig(**read_meta(ckpt)["model_config"])
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    model.init_weights()  # fills the RoPE table; the weights are then overwritten
    load(ckpt, model)
    return model.eval()



def rng_state() -> dict:
    """This process's Python, NumPy, torch and CUDA RNG states, as JSON-able lists."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def gather_rng_states() -> list[dict]:
    """Every rank's rng_state(), in rank order (collective when distributed)."""
    if not dist.is_initialized():
        return [rng_state()]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, rng_state())
    return everyone


def set_rng_state(saved: dict) -> None:
    py = saved["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = saved["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(torch.tensor(saved["torch"], dtype=torch.uint8))
    if "cuda" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(saved["cuda"], dtype=torch.uint8))
