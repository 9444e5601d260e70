"""HellaSwag (validation split): data, rendering and batched scoring.

Completion-style scoring, as in build-nanogpt and the HellaSwag paper: each of the 4 endings is
appended to the context (with GPT-2's leading space), the model's loss is taken over the ending
tokens only, and the prediction is the ending with the lowest summed loss (`acc`) or the lowest
mean loss per ending token (`acc_norm`). `evaluate` is the one scoring function: hellaswag.py and
the training loop both call it.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import sys
import urllib.request
from pathlib import Path

import tiktoken
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from . import hf_io
from .tokenizer import EOT, get_encoding
from .utils import UserError

VAL_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
# The tests' 32 hand-made rows in HellaSwag's format: a score on them says nothing about a model.
FORMAT_SAMPLE = Path(__file__).resolve().parent.parent / "tests" / "data" / "hellaswag_sample.jsonl"
DATA_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hellaswag"
N_VAL = 10042  # examples in the validation split
N_ENDINGS = 4
# Padded lengths are rounded up to a multiple of this, so a compiled model compiles a handful of
# shapes (one per multiple up to the longest row) instead of one per batch; 64 rather than 32
# keeps them (with training's own graphs) well under dynamo's limit of 8 per function.
LENGTH_MULTIPLE = 64


class HellaSwagError(UserError, ValueError):
    """Unusable HellaSwag data or settings: one line naming the file, example or value (a
    ValueError too, as it was before user errors had a type of their own)."""


# -----------------------------------------------------------------------------
# data


def default_data_path() -> Path:
    return DATA_DIR / "hellaswag_val.jsonl"


def fetch_advice(path: str | Path) -> str:
    """How to get the validation split to `path` (docs/evaluation.md, HellaSwag: Data)."""
    return (f"it is rowanz/hellaswag's validation split: fetch it with `curl -L -o {path} {VAL_URL}` on a "
            f"machine with network, or leave the path out to download it to {default_data_path()}")


def _download(url: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written under a per-process name and renamed when complete: ranks that download at the
    # same time, or a download killed halfway, never leave a truncated file at `path`.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    print(f"downloading HellaSwag validation data from {url} to {path}", file=sys.stderr)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
            shutil.copyfileobj(response, f)
        with open(tmp, encoding="utf-8") as f:
            n_lines = sum(1 for line in f if line.strip())
        if n_lines != N_VAL:
            raise OSError(f"got {n_lines} examples, expected {N_VAL}")
        os.replace(tmp, path)
    except (OSError, http.client.HTTPException) as e:
        tmp.unlink(missing_ok=True)
        reason = getattr(e, "reason", None) or e
        raise FileNotFoundError(
            f"HellaSwag data is not at {path} and downloading {url} failed ({reason}); "
            f"download hellaswag_val.jsonl elsewhere and pass --data PATH.jsonl "
            f"(or copy it to {path})"
        ) from None


def _check_example(example: object, where: str) -> dict:
    """The example with its label as an int; ValueError naming `where` if it is malformed."""
    if not isinstance(example, dict):
        raise HellaSwagError(f"{where}: expected a JSON object, got {type(example).__name__}")
    ctx = example.get("ctx")
    if not isinstance(ctx, str) or not ctx:
        raise HellaSwagError(f"{where}: 'ctx' must be a non-empty string, got {ctx!r}")
    endings = example.get("endings")
    if not isinstance(endings, list) or not all(isinstance(e, str) for e in endings):
        raise HellaSwagError(f"{where}: 'endings' must be a list of {N_ENDINGS} strings")
    if len(endings) != N_ENDINGS:
        raise HellaSwagError(f"{where}: expected {N_ENDINGS} endings, got {len(endings)}")
    label = example.get("label")
    # The jsonl release stores ints; copies exported from the `datasets` version store strings.
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < N_ENDINGS:
        raise HellaSwagError(f"{where}: label must be an integer in 0-{N_ENDINGS - 1}, got {label!r}")
    return {**example, "label": label}


def load_examples(path: str | None = None, limit: int | None = None) -> list[dict]:
    """The validated examples of a HellaSwag jsonl file (default: the validation split, downloaded
    once to DATA_DIR), the first `limit` of them if given.

    ValueError naming the line for a malformed line, a label outside 0-3, or not 4 endings."""
    if path is None:
        file = default_data_path()
        if not file.is_file():
            _download(VAL_URL, file)
    else:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"HellaSwag data file {file} does not exist: {fetch_advice(file)}")
    if limit is not None and limit < 1:
        raise HellaSwagError(f"limit must be a positive number of examples, got {limit}")
    examples = []
    with open(file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if limit is not None and len(examples) >= limit:
                break
            if not line.strip():
                continue
            where = f"{file} line {lineno}"
            try:
                example = json.loads(line)
            except json.JSONDecodeError as e:
                raise HellaSwagError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
            examples.append(_check_example(example, where))
    if not examples:
        raise HellaSwagError(f"{file} holds no HellaSwag examples")
    return examples


# -----------------------------------------------------------------------------
# rendering


Rendered = tuple[list[int], list[list[int]]]  # (context tokens, the 4 endings' tokens)


def render_example(
    example: dict, enc: tiktoken.Encoding | None = None, max_seq_len: int | None = None
) -> Rendered:
    """(context tokens, the 4 endings' tokens): row i of the example is context + endings[i].

    Each ending is encoded with a leading space, as GPT-2 saw words mid-sentence. When a row would
    exceed max_seq_len the context is cut from the left, by the same amount for all 4 rows so the
    endings are still compared after the same context; the endings are never cut."""
    enc = enc or get_encoding()
    ctx = enc.encode_ordinary(example["ctx"])
    endings = [enc.encode_ordinary(" " + ending) for ending in example["endings"]]
    if not ctx:
        raise HellaSwagError(f"HellaSwag example {example.get('ind', '?')}: the context encodes to no tokens")
    if max_seq_len is not None:
        room = max_seq_len - max(len(e) for e in endings)
        if room < 1:
            raise HellaSwagError(
                f"HellaSwag example {example.get('ind', '?')}: an ending of "
                f"{max(len(e) for e in endings)} tokens leaves no room for context within "
                f"max_seq_len={max_seq_len}; evaluate with a longer max_seq_len"
            )
        ctx = ctx[-room:]
    return ctx, endings


def bucketed_length(n: int, max_seq_len: int | None = None, multiple: int = LENGTH_MULTIPLE) -> int:
    """n rounded up to a multiple of `multiple`, capped at max_seq_len."""
    length = -(-n // multiple) * multiple
    return min(length, max_seq_len) if max_seq_len is not None else length


def make_batch(rendered: list[Rendered], length: int, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens, mask: (n_rows, length). Rows 4i..4i+3 are example i; the mask is True exactly on
    its ending tokens. Padding (to `length`, and whole rows up to n_rows) is EOT, a valid id, and
    masked out; being to the right of every real token, it cannot change their causal logits."""
    tokens = torch.full((n_rows, length), EOT, dtype=torch.long)
    mask = torch.zeros((n_rows, length), dtype=torch.bool)
    for i, (ctx, endings) in enumerate(rendered):
        for j, ending in enumerate(endings):
            row = N_ENDINGS * i + j
            n_ctx, n_row = len(ctx), len(ctx) + len(ending)
            tokens[row, :n_ctx] = torch.tensor(ctx)
            tokens[row, n_ctx:n_row] = torch.tensor(ending)
            mask[row, n_ctx:n_row] = True
    return tokens, mask


# -----------------------------------------------------------------------------
# scoring


def _ending_losses(
    model, tokens: torch.Tensor, mask: torch.Tensor, autocast_dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed loss over its masked tokens (float32) and how many there are."""
    with torch.autocast(tokens.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits = model(tokens)  # (R, T, vocab)
    targets = tokens[:, 1:]  # the logits at position t predict the token at t + 1
    scored = mask[:, 1:]  # (R, T - 1)
    # Only the ending positions go through the float32 cross-entropy: a float32 copy of all the
    # logits (64 rows x 128 x 50304) would be 1.6 GB for nothing.
    losses = F.cross_entropy(logits[:, :-1][scored].float(), targets[scored], reduction="none")
    rows = torch.arange(tokens.size(0), device=tokens.device).unsqueeze(1).expand_as(scored)[scored]
    sum_loss = torch.zeros(tokens.size(0), dtype=torch.float32, device=tokens.device)
    sum_loss.index_add_(0, rows, losses)
    return sum_loss, scored.sum(dim=1)


# The scoring options of evaluate(), passed through one level: a dataclass would only rename them.
@torch.no_grad()
def ending_losses(
    model,
    examples: list[dict],
    device: torch.device | str,
    batch_size: int = 16,
    autocast_dtype: torch.dtype | None = None,
    max_seq_len: int | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example, in the order given, per ending: the summed loss over the ending's tokens
    (float32, the negated log-likelihood lm-eval reports) and how many tokens it has; two
    (len(examples), 4) tensors on the CPU."""
    if batch_size < 1:
        raise HellaSwagError(f"batch_size must be a positive number of examples, got {batch_size}")
    device = torch.device(device)
    enc = get_encoding()
    rendered = [render_example(ex, enc, max_seq_len) for ex in examples]
    lengths = [len(ctx) + max(len(e) for e in endings) for ctx, endings in rendered]
    # Longest first: examples of similar length share a batch (little padding), and a batch too
    # big for memory fails at once rather than at the end.
    order = sorted(range(len(examples)), key=lambda i: -lengths[i])
    sums = torch.zeros(len(examples), N_ENDINGS, dtype=torch.float32)
    counts = torch.zeros(len(examples), N_ENDINGS, dtype=torch.int64)
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=len(examples), desc="hellaswag", unit="ex", disable=not progress, leave=False) as bar:
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                length = bucketed_length(lengths[batch[0]], max_seq_len)
                # The last batch is padded with empty rows to the full size: one shape fewer to
                # compile, for the cost of one partly wasted forward.
                tokens, mask = make_batch([rendered[i] for i in batch], length, N_ENDINGS * batch_size)
                if device.type == "cuda":
                    tokens, mask = tokens.pin_memory(), mask.pin_memory()
                tokens = tokens.to(device, non_blocking=True)
                mask = mask.to(device, non_blocking=True)
                # Static: a compiled model gets one graph per padded length (a handful, fixed by
                # the bucketing), each specialized to its sizes as training's own graph is. Without
                # it, the first length that differs from what the model has seen makes dynamo
                # compile one dynamic-shape graph instead (it traces: the causal mask depends on
                # start_pos only), with kernels generic in the batch and sequence sizes.
                torch._dynamo.mark_static(tokens)
                sum_loss, n_tokens = _ending_losses(model, tokens, mask, autocast_dtype)
                n_real = N_ENDINGS * len(batch)
                index = torch.tensor(batch)
                sums[index] = sum_loss[:n_real].view(len(batch), N_ENDINGS).cpu()
                counts[index] = n_tokens[:n_real].view(len(batch), N_ENDINGS).cpu()
                bar.update(len(batch))
    finally:
        model.train(was_training)
    return sums, counts


def predict(
    model,
    examples: list[dict],
    device: torch.device | str,
    batch_size: int = 16,
    autocast_dtype: torch.dtype | None = None,
    max_seq_len: int | None = None,
    progress: bool = False,
) -> tuple[list[int], list[int]]:
    """Predicted ending per example, in the order given: (by summed loss, by mean loss)."""
    sums, counts = ending_losses(model, examples, device, batch_size, autocast_dtype, max_seq_len, progress)
    return sums.argmin(dim=1).tolist(), (sums / counts).argmin(dim=1).tolist()


def model_max_seq_len(model) -> int | None:
    """max_seq_len of our Transformer (or of the HF adapter) under DDP / torch.compile wrappers."""
    while model is not None:
        config = getattr(model, "config", None)
        for value in (getattr(model, "max_seq_len", None), getattr(config, "max_seq_len", None)):
            if isinstance(value, int):
                return value
        model = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
    return None


# One public entry point for the CLI and for training, hence its keyword options (batch size,
# autocast, rank/world size, length limit, progress bar) rather than an options object.
def rank_share(examples: list[dict], rank: int, world_size: int) -> list[dict]:
    """The examples rank `rank` of `world_size` scores in evaluate (empty when rank >= len)."""
    return examples[rank::world_size]


def evaluate(
    model,
    examples: list[dict],
    device: torch.device | str,
    batch_size: int = 16,
    autocast_dtype: torch.dtype | None = None,
    rank: int = 0,
    world_size: int = 1,
    max_seq_len: int | None = None,
    progress: bool = True,
) -> dict:
    """{"acc", "acc_norm", "n"} of `model` on `examples`; `model(idx)` returns the logits.

    Each rank scores its rank_share of the examples (batch_size examples = 4 * batch_size rows per
    forward) and the counts are summed over ranks with torch.distributed, so with world_size > 1
    every rank must call this. max_seq_len defaults to the model's config.max_seq_len."""
    if not examples:
        raise HellaSwagError("no HellaSwag examples to evaluate")
    if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"evaluate with world_size={world_size} needs torch.distributed initialized first")
    if max_seq_len is None:
        max_seq_len = model_max_seq_len(model)
    local = rank_share(examples, rank, world_size)
    pred, pred_norm = predict(
        model, local, device, batch_size, autocast_dtype, max_seq_len, progress=progress and rank == 0
    )
    labels = [int(ex["label"]) for ex in local]
    correct = sum(p == y for p, y in zip(pred, labels))
    correct_norm = sum(p == y for p, y in zip(pred_norm, labels))
    counts = torch.tensor([correct, correct_norm, len(local)], dtype=torch.int64, device=device)
    if world_size > 1:
        dist.all_reduce(counts)
    correct, correct_norm, n = counts.tolist()
    return {"acc": correct / n, "acc_norm": correct_norm / n, "n": n}


# -----------------------------------------------------------------------------
# a transformers model scored like ours


class HFCausalLM(nn.Module):
    """A transformers causal LM called like our Transformer: model(idx) -> logits.

    No attention mask is needed: padding only ever follows the real tokens."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf_model = hf_model
        self.max_seq_len = getattr(hf_model.config, "max_position_embeddings", None)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.hf_model(input_ids=idx, use_cache=False).logits


def load_hf_model(hf_dir: str, device: torch.device) -> HFCausalLM:
    """A transformers causal LM from a local directory (no hub access), wrapped as HFCausalLM."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    if not Path(hf_dir, "config.json").is_file():
        raise FileNotFoundError(f"{hf_dir} is not a Hugging Face model directory (no config.json)")
    hf_io.check_vocabulary(hf_dir)
    try:
        # float32 weights with autocast, like our checkpoints, so --dtype means the same for both.
        hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True, dtype=torch.float32)
    except SafetensorError as e:  # transformers passes it on without the file's name
        raise HellaSwagError(f"a weights file in {hf_dir} is not readable safetensors ({e}): truncated "
                         f"or corrupt; copy or export the model again") from None
    if hf_model.config.vocab_size <= EOT:
        raise HellaSwagError(
            f"{hf_dir} has vocab_size={hf_model.config.vocab_size}; HellaSwag is rendered with "
            f"GPT-2's tokenizer, so the model must use GPT-2 token ids"
        )
    return HFCausalLM(hf_model.to(device)).eval()
