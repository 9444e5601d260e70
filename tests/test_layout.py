"""The repository's shape: scripts at the top, the llama_fineweb package below them, model.py at the
bottom; no name that shadows an installed package; code and checkpoints from before the package
keep working."""

import ast
import importlib.metadata
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from runs import call_main

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "llama_fineweb"
SCRIPTS = {p.stem for p in ROOT.glob("*.py")} - {"model"}
FIXTURE = ROOT / "tests" / "data" / "pre_package_run"


def imported_names(path: Path) -> set[str]:
    """The top-level names of every absolute import in a file, wherever in the file it stands."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_package_never_imports_a_script():
    """No module of llama_fineweb imports a top-level script (the arrows run one way: down)."""
    offenders = {f"{p.name} imports {name}" for p in PACKAGE.glob("*.py") for name in imported_names(p) & SCRIPTS}
    assert not offenders


def test_model_imports_nothing_of_ours():
    """model.py is the base layer: it imports neither the package nor a script."""
    assert not imported_names(ROOT / "model.py") & (SCRIPTS | {"llama_fineweb"})


def test_top_level_holds_scripts_and_folders_only():
    """Every top-level module is a script with a main() run under `if __name__ == "__main__"`, or
    model.py; library modules live in the package."""
    for path in ROOT.glob("*.py"):
        if path.stem == "model":
            continue
        source = path.read_text()
        assert "def main(" in source and 'if __name__ == "__main__":' in source, path.name


def test_no_top_level_name_shadows_an_installed_package():
    """A module or package at the repository root named like an installed distribution's import
    name would be imported instead of it by anything run from the root (evaluate.py did this to
    Hugging Face's evaluate, which lm-eval's code tasks import)."""
    installed = importlib.metadata.packages_distributions()
    ours = {p.stem for p in ROOT.glob("*.py")} | {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert not {name: installed[name] for name in ours if name in installed}


def test_huggingface_evaluate_imports_from_the_repository_root():
    """From the root, `import evaluate` is Hugging Face's package (what lm-eval's humaneval, mbpp,
    squadv2 tasks call evaluate.load on), not a file of ours."""
    proc = subprocess.run([sys.executable, "-c", "import evaluate; print(evaluate.__file__, hasattr(evaluate, 'load'))"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    path, has_load = proc.stdout.split()
    assert not Path(path).resolve().is_relative_to(ROOT) and has_load == "True", proc.stdout + proc.stderr


def test_a_config_importing_a_moved_module_gets_the_new_import(tmp_path):
    """A config file written before the package (`from train_config import TrainConfig`) is refused in
    one line that names the file and the import to write instead."""
    import train_llama

    old = tmp_path / "old_config.py"
    old.write_text("from train_config import TrainConfig\n\n\ndef config():\n    return TrainConfig()\n")
    proc = call_main(train_llama.main, ["--config", str(old)], check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert str(old) in lines[0] and "from llama_fineweb.train_config import" in lines[0]


def pre_package_data(path: Path) -> Path:
    """The shards the fixture's run trained on, rebuilt by the recipe that made them."""
    path.mkdir()
    rng = np.random.default_rng(0)
    for i, split in enumerate(["val", "train", "train"]):
        np.save(path / f"edufineweb_{split}_{i:06d}.npy", rng.integers(0, 256, size=4096, dtype=np.uint16))
    return path


def test_a_checkpoint_from_before_the_package_resumes_exactly(tmp_path):
    """tests/data/pre_package_run/step_0000002 was saved by the code before the package existed
    (commit in straight.json): resumed now to step 4, every loss and gradient norm equals the
    straight 4-step run that code made."""
    import train_llama

    reference = json.loads((FIXTURE / "straight.json").read_text())["straight_run"]
    run_dir = tmp_path / "run"
    shutil.copytree(FIXTURE / "step_0000002", run_dir / "step_0000002")
    config = tmp_path / "cfg.py"
    config.write_text(
        "from llama_fineweb.train_config import TrainConfig\n\n\ndef config():\n"
        "    return TrainConfig(model='tiny', model_overrides={'vocab_size': 256, 'n_layers': 1, 'dim': 32,\n"
        "                       'n_heads': 2, 'n_kv_heads': 1, 'ffn_dim': 64}, seq_len=16, total_batch_tokens=64,\n"
        "                       micro_batch=2, max_steps=4, warmup_steps=1, max_lr=1e-3, min_lr=1e-4,\n"
        "                       eval_interval=0, sample_interval=0, save_interval=2, keep_last=0, device='cpu')\n")
    call_main(train_llama.main, ["--config", str(config), f"--data_dir={pre_package_data(tmp_path / 'data')}",
                                 f"--out_dir={run_dir}", f"--resume={run_dir / 'step_0000002'}"])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    resumed = {r["step"]: r for r in rows if "loss" in r and "event" not in r}
    for step in (3, 4):
        for key in ("loss", "grad_norm", "lr"):
            assert resumed[step][key] == reference[str(step)][key], (step, key)


def test_every_script_imports_from_the_root():
    """Each top-level script imports in a fresh interpreter at the repository root: nothing it needs
    was left behind by the move into the package."""
    code = "; ".join(f"import {name}" for name in sorted(SCRIPTS))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
