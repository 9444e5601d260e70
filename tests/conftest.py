"""Shared test set-up: the repo root on sys.path, no network for anything the tests start, and the
fixtures several test files use."""

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Nothing in the tests may reach a hub; subprocesses inherit these.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from model import Transformer, build_model, model_config  # noqa: E402


def make_tiny_model(seed: int = 0, **overrides) -> Transformer:
    """A seeded random `tiny` model (GPT-2's padded vocabulary unless overridden), in eval mode."""
    torch.manual_seed(seed)
    return build_model(model_config("tiny", **overrides)).eval()


def make_hf_llama(cfg, seed: int = 0, **config_overrides):
    """A random transformers LlamaForCausalLM with the shapes of our ModelConfig `cfg`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from export_hf import hf_config

    torch.manual_seed(seed)
    config = {k: v for k, v in hf_config(cfg).items() if k not in ("architectures", "torch_dtype")}
    return LlamaForCausalLM(LlamaConfig(**{**config, **config_overrides})).eval()


@pytest.fixture
def tiny_model():
    """make_tiny_model as a fixture: tiny_model(seed=0, **ModelConfig overrides)."""
    return make_tiny_model


@pytest.fixture
def hf_llama():
    """make_hf_llama as a fixture: hf_llama(our ModelConfig, seed=0, **LlamaConfig overrides)."""
    return make_hf_llama


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """Random-token shards under the reference names: a val shard and two train shards."""
    import numpy as np

    path = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    for i, split in enumerate(["val", "train", "train"]):
        np.save(path / f"edufineweb_{split}_{i:06d}.npy", rng.integers(0, 50257, size=20_000, dtype=np.uint16))
    return path


@pytest.fixture(scope="session")
def straight(tmp_path_factory, data_dir) -> Path:
    """The reference run (tests/runs.py): one process, 12 steps, validation at 0, 4, 8, 12,
    samples at 0, 6, 12, checkpoints at 5, 10 and 12; its stdout in stdout.txt."""
    from runs import EVAL, run

    out = tmp_path_factory.mktemp("straight")
    (out / "stdout.txt").write_text(run(out, data_dir, *EVAL, "--save_interval=5").stdout)
    return out
