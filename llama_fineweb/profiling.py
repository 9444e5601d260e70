"""What a run records for a look inside it (docs/at-scale.md): a torch.profiler trace of chosen steps
(--profile=START:END, Chrome/Perfetto JSON) and, on CUDA, the caching allocator's history
(--memory_snapshot), dumped after the first step and on out-of-memory (open it at
https://pytorch.org/memory_viz)."""

from __future__ import annotations

from pathlib import Path

import torch

from .utils import Dist, UserError

PROFILE_DIR = "profile"


class StepProfiler:
    """A torch.profiler session over steps START..END (both included), each step a named range; its
    trace is written when END is done (or the run stops earlier) as one file per rank."""

    def __init__(self, steps: tuple[int, int] | None, out_dir: str | Path, d: Dist, log=print):
        self.steps, self.out_dir, self.dist, self.log = steps, Path(out_dir) / PROFILE_DIR, d, log
        self.session: torch.profiler.profile | None = None
        self.step_range = None

    def before_step(self, step: int) -> None:
        if self.steps is None:
            return
        if step == self.steps[0]:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.dist.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.session = torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True)
            self.session.__enter__()
        if self.session is not None:
            self.step_range = torch.profiler.record_function(f"step {step}")
            self.step_range.__enter__()

    def after_step(self, step: int) -> None:
        if self.step_range is not None:
            self.step_range.__exit__(None, None, None)
            self.step_range = None
        if self.session is not None and step >= self.steps[1]:
            self.close()

    def close(self) -> Path | None:
        """Stop and write the trace (if one is being recorded); its path."""
        if self.session is None:
            return None
        session, self.session = self.session, None
        session.__exit__(None, None, None)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"trace_steps_{self.steps[0]}-{self.steps[1]}_rank{self.dist.rank}.json"
        session.export_chrome_trace(str(path))
        if self.dist.is_main:
            self.log(f"profiler trace of steps {self.steps[0]}-{self.steps[1]}: {path} (open it in "
                     f"https://ui.perfetto.dev or chrome://tracing)")
        return path


def start_memory_history(enabled: bool, d: Dist) -> None:
    """--memory_snapshot: record every allocation from now on (CUDA only: refused elsewhere)."""
    if not enabled:
        return
    if d.device.type != "cuda":
        raise UserError(f"--memory_snapshot=true records the CUDA caching allocator; this run is on "
                        f"{d.device.type}: drop the flag (or run on a GPU)")
    torch.cuda.memory._record_memory_history(max_entries=200_000)


def dump_memory_snapshot(enabled: bool, out_dir: str | Path, d: Dist, name: str) -> Path | None:
    """out_dir/profile/memory_NAME_rankR.pickle: the allocator's state and recent history; its path."""
    if not enabled or d.device.type != "cuda":
        return None
    path = Path(out_dir) / PROFILE_DIR / f"memory_{name}_rank{d.rank}.pickle"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.cuda.memory._dump_snapshot(str(path))
    return path
