"""utils.cli_errors: one line for what the user can fix, a traceback for bugs."""

import errno
import sys

import pytest

import finetune
from llama_fineweb.utils import UserError, cli_errors
from runs import ROOT, call_main


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(tmp_path, capsys):
    """UserError, a missing file and a full disk are one line with exit 2; a ValueError or an
    unexpected OSError from inside the code propagates with its traceback."""
    for error, expected in [(UserError("bad knob"), "bad knob"),
                            (FileNotFoundError(errno.ENOENT, "No such file", str(tmp_path / "x")), "No such file"),
                            (OSError(errno.ENOSPC, "No space left", str(tmp_path)), "disk full while writing")]:
        with pytest.raises(SystemExit) as exit_info, cli_errors("prog"):
            raise error
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("prog: error: ") and expected in err[0], err
    for bug in (ValueError("shape mismatch inside torch"), OSError(errno.EIO, "I/O error")):
        with pytest.raises(type(bug)), cli_errors("prog"):
            raise bug


def test_a_missing_optional_dependency_is_one_line_naming_the_package(tmp_path, monkeypatch):
    """finetune.py --data=HUB_NAME without `datasets` installed: one line saying what to install."""
    monkeypatch.setitem(sys.modules, "datasets", None)  # what `import datasets` sees when it is absent
    argv = ["--config", str(ROOT / "configs" / "sft_tiny.py"), f"--init_from={tmp_path}", "--data=nobody/instructions",
            f"--out_dir={tmp_path}", "--device=cpu"]
    proc = call_main(finetune.main, argv, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "the Python package 'datasets' is not installed" in lines[0] and "pip install" in lines[0]
