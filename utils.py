"""Small helpers that several scripts share: dtype names, atomic writes, process-group set-up, and
the one-line error convention of every command-line entry point."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sys
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
    """Turn the errors a user can act on into one line on stderr and exit status 2.

    `expected` adds the script's own error types to UserError, ValueError and OSError. Under
    torchrun only rank 0 prints (every rank exits), so the line is not buried under the other
    ranks' copies. A disk-full OSError says so and how much space is left. Anything else is a
    bug and keeps its traceback.
    """
    try:
        yield
    except (UserError, ValueError, OSError, *expected) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, OSError) and e.filename is not None:
            message = disk_full_message(e.filename, e) or message
        elif isinstance(e, OSError) and not isinstance(e, (FileNotFoundError, PermissionError)):
            message = f"{type(e).__name__}: {message}"
        if _is_main_process():
            print(f"{program}: error: {message}", file=sys.stderr, flush=True)
        teardown_distributed()
        raise SystemExit(2) from None
