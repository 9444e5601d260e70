"""Supervised fine-tuning (SFT): train_llama.py's loop on instruction data, the loss on the answers.

    python train_llama.py --config configs/tiny.py        # a tiny base model in out/tiny (CPU, minutes)
    python finetune.py --config configs/sft_tiny.py       # fine-tune it on 24 examples (CPU, offline)
    torchrun --standalone --nproc_per_node=8 finetune.py --config configs/sft_1p7b.py

Launch, checkpoints, exact resume, DDP, compile, the log line and metrics.jsonl are training's:
this file supplies the data (train_llama.train(cfg, make_data=...)) and SFTConfig's knobs.

LoRA (--lora_rank=R, with --lora_alpha, --lora_dropout, --lora_targets; lora.py through PEFT):
rank-R adapters on the chosen projections train, the base stays frozen (bf16 on CUDA). Its
checkpoints hold the adapters and their AdamW state, and the base by path and sha256: a base that
changed since is refused. DDP as for full tuning; FSDP is refused (train_config says why).

    python finetune.py --config configs/sft_tiny.py --lora_rank=8 --max_lr=1e-2 --out_dir=out/sft_tiny_lora
    python finetune.py --config configs/sft_1p7b_lora.py                 # one 24 GB GPU

Data (--data): a local file, either a JSON list or JSON lines (what `datasets`' to_json writes),
each row in alpaca form {"instruction", "input" (may be empty or absent), "output"} or chat form
{"messages": [{"role": "system" (optional, first) | "user" | "assistant", "content"}, ...]}
alternating user/assistant and ending with an assistant message; or a Hugging Face hub dataset
name (e.g. yahma/alpaca-cleaned), read with `datasets`. Alpaca's prompt is the instruction, then a
blank line and the input when there is one. Contents are stripped of surrounding whitespace; rows
with an empty prompt or answer are skipped and counted.

Template (--template): "vicuna" (default; the released DMaS-LLaMa-Lite instruct model's, FastChat's
vicuna_v1.1 with <|endoftext|> as the end of a turn), "alpaca", or a .json file with the fields of
`Template`. Multi-turn Vicuna:

    {system} USER: {prompt} ASSISTANT: {answer}<|endoftext|>USER: {prompt 2} ASSISTANT: {answer 2}<|endoftext|>

Loss: only the answers' tokens and the <|endoftext|> after each are targets; the rest gets
target -1 (ignored). A step's loss is the mean over all of its answer tokens, on every rank and
micro-step: train_llama weights each micro-batch's mean by its share of the step's answer tokens
(SFTLoader.targets_in_step), so micro_batch and the GPU count change nothing, as one big batch.

Batches: examples are padded on the right (input <|endoftext|>, target -1) to the longest in the
micro-batch rounded up to a multiple of pad_multiple (64), so a compiled model sees at most
seq_len / 64 lengths. Padding rather than packing: with causal attention, right padding never
changes what the real tokens see, so no mask is needed; packing would need a block-diagonal
mask (or varlen attention) to keep examples apart. Examples longer than seq_len + 1 tokens are
dropped (or, with --overlong=truncate, cut) and counted in the log.

Order: a step holds G = total_batch_tokens / seq_len examples (one "sequence" = one example):
global batch k is examples [k*G, (k+1)*G) of a seeded permutation per epoch (the next epoch gets
the next seed), and rank r takes its slice, as in dataloader.TrainLoader, so a run resumed on
another GPU count sees the same batches. The validation split (val_fraction of the rows, chosen
with a fixed seed, so it does not move with --seed) is left out of training. Throughput and
tokens_seen count a step as G x seq_len tokens: its capacity, not the padded or real tokens.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from llama_fineweb import checkpoint

# The templates are chat_template.py's; their names stay importable from here for config files.
from llama_fineweb.chat_template import EOT_TEXT, TEMPLATES, Template, checkpoint_template, encode, load_template  # noqa: F401
from llama_fineweb.dataloader import DataError, FollowsOrder, GlobalOrder
from llama_fineweb.tokenizer import EOT
from llama_fineweb.train_config import ConfigError, SFTConfig, TrainConfig, load_config_file, training_cli
from train_llama import train

SPLIT_SEED = 0  # the validation split's permutation: fixed, so every run holds out the same rows


# ----------------------------------------------------------------------------- data

def read_rows(source: str) -> tuple[list[tuple[str, object]], str]:
    """(where, row) for every row of a local file or hub dataset, and where it came from."""
    path = Path(source)
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        if not text.strip():
            raise DataError(f"{path} is empty: it needs alpaca rows (instruction, input, output) or chat "
                            f"rows (messages)")
        if text.lstrip().startswith("["):  # a JSON list; otherwise JSON lines (datasets' to_json)
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {e.lineno}: not valid JSON ({e.msg})") from None
            return [(f"{path} row {i}", row) for i, row in enumerate(rows)], str(path)
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    out.append((f"{path} line {n}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path} line {n}: not valid JSON ({e.msg})") from None
        return out, str(path)
    if path.suffix in (".json", ".jsonl") or path.exists():
        raise DataError(f"--data={source}: no such file" + (" (a directory)" if path.is_dir() else ""))
    return [(f"{source} row {i}", row) for i, row in enumerate(hub_rows(source))], source


def hub_rows(name: str) -> list[dict]:
    # Outside the try: a missing `datasets` is its own one-line error (what to install), not a hub failure.
    import datasets  # noqa: PLC0415 - heavy, and only the hub route needs it

    try:
        return datasets.load_dataset(name, split="train").to_list()
    except Exception as e:  # offline, unknown name, no access: all say the same thing to the user
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise DataError(
            f"--data={name}: cannot load it from the Hugging Face hub ({reason}); without network, pass a "
            f"local copy: --data=FILE.jsonl, made where there is network with python -c \"import datasets; "
            f"datasets.load_dataset('{name}', split='train').to_json('FILE.jsonl')\"") from None


def _text(row: dict, key: str, where: str, required: bool = True) -> str:
    if key not in row:
        if not required:
            return ""
        raise DataError(f"{where}: no {key!r} (alpaca rows have instruction, input (may be empty) and output)")
    if not isinstance(row[key], str):
        raise DataError(f"{where}: {key!r} is a {type(row[key]).__name__}, not a string")
    return row[key].strip()


def to_messages(row: object, where: str) -> list[dict]:
    """A row in alpaca or chat form as chat messages (contents stripped); DataError naming the row."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row is a JSON object, not a {type(row).__name__}")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: message {i} is not an object with string 'role' and 'content'")
            out.append({"role": m["role"], "content": m["content"].strip()})
        roles = [m["role"] for m in out[1:]] if out[0]["role"] == "system" else [m["role"] for m in out]
        expected = ["user", "assistant"] * (len(roles) // 2)
        if roles != expected or not roles:
            raise DataError(f"{where}: roles {roles} must alternate user, assistant (after an optional first "
                            f"system message) and end with an assistant message")
        return out
    if "instruction" in row or "output" in row:
        instruction, extra = _text(row, "instruction", where), _text(row, "input", where, required=False)
        output = _text(row, "output", where)
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    raise DataError(f"{where}: neither 'messages' (chat form) nor 'instruction'/'output' (alpaca form); "
                    f"its keys are {sorted(row)[:8]}")


@dataclass
class Example:
    ids: np.ndarray  # (n,) int64 token ids
    trained: np.ndarray  # (n,) bool: an answer token (a target)


class SFTData:
    """The instruction data of a run, read, split, rendered and tokenized once per process."""

    def __init__(self, cfg: SFTConfig):
        self.template = load_template(cfg.template)
        rows, self.source = read_rows(cfg.data)
        conversations, empty = [], 0
        for where, row in rows:
            messages = to_messages(row, where)
            if any(not m["content"] for m in messages if m["role"] != "system"):
                empty += 1
                continue
            conversations.append(messages)
        if not conversations:
            raise DataError(f"{self.source}: no usable examples ({len(rows)} rows, {empty} with an empty "
                            f"prompt or answer)")
        digest = hashlib.sha256(json.dumps(conversations, ensure_ascii=False).encode()).hexdigest()
        # What the batches depend on besides (seed, seq_len, batch): a resume checks it.
        self.identity = {"sha256": digest, "examples": len(conversations), "val_fraction": cfg.val_fraction,
                         "overlong": cfg.overlong, "template": dataclasses.asdict(self.template)}
        n_val = max(1, round(cfg.val_fraction * len(conversations))) if cfg.val_fraction else 0
        if n_val >= len(conversations):
            raise DataError(f"{self.source}: --val_fraction={cfg.val_fraction} of {len(conversations)} examples "
                            f"leaves none to train on")
        held_out = set(np.random.default_rng(SPLIT_SEED).permutation(len(conversations))[:n_val].tolist())
        limit = cfg.seq_len + 1  # an example of n tokens gives n - 1 inputs
        self.train, train_long, train_lost = self._examples(
            [c for i, c in enumerate(conversations) if i not in held_out], limit, cfg.overlong)
        self.val, val_long, val_lost = self._examples(
            [c for i, c in enumerate(conversations) if i in held_out], limit, cfg.overlong)
        self.val.sort(key=lambda e: len(e.ids))  # less padding; the mean is over tokens, order-free
        if cfg.eval_interval and not self.val:
            raise DataError(f"{self.source}: {_all_too_long('validation', val_long, limit, cfg.overlong)}: raise "
                            f"--seq_len or --val_fraction" + _or_truncate(cfg.overlong))
        if not self.train:
            raise DataError(f"{self.source}: {_all_too_long('training', train_long, limit, cfg.overlong)}: raise "
                            f"--seq_len" + _or_truncate(cfg.overlong))
        answer_tokens = sum(int(e.trained.sum()) for e in self.train)
        all_tokens = sum(len(e.ids) for e in self.train)
        self.notes = [
            (f"sft data: {self.source}: {len(rows):,} rows -> {len(self.train):,} train / {len(self.val):,} val "
             f"examples (val_fraction {cfg.val_fraction}), template {self.template.name}"),
            (f"sft data: train {all_tokens:,} tokens, {answer_tokens:,} of them answer tokens (the targets), "
             f"mean {all_tokens / len(self.train):.0f} and longest {max(len(e.ids) for e in self.train):,} "
             f"tokens per example"),
        ]
        if empty:
            self.notes.append(f"sft data: {empty:,} rows with an empty prompt or answer skipped")
        if train_long or val_long:
            done = "dropped" if cfg.overlong == "drop" else f"truncated to {limit} tokens"
            lost = (f"; {train_lost + val_lost:,} of them dropped all the same: their prompt fills the {limit} "
                    f"tokens" if train_lost + val_lost else "")
            self.notes.append(f"sft data: {train_long + val_long:,} examples longer than seq_len + 1 = {limit} "
                              f"tokens {done} ({train_long:,} train, {val_long:,} val){lost}")

    def _examples(self, conversations: list[list[dict]], limit: int,
                  overlong: str) -> tuple[list[Example], int, int]:
        """Tokenized examples that fit `limit` tokens (others dropped or cut), how many did not fit,
        and how many of those were cut to nothing to predict."""
        out, too_long, lost = [], 0, 0
        for messages in conversations:
            ids, trained = encode(self.template.segments(messages))
            if len(ids) > limit:
                too_long += 1
                if overlong == "drop":
                    continue
                ids, trained = ids[:limit], trained[:limit]
            if any(trained[1:]):  # something left to predict (position 0 is never a target)
                out.append(Example(np.array(ids, dtype=np.int64), np.array(trained, dtype=bool)))
            else:
                lost += 1
        return out, too_long, lost

    def steps_per_epoch(self, global_batch: int) -> float:
        return len(self.train) / global_batch

    def loaders(self, cfg: SFTConfig, d, log) -> tuple[SFTLoader, SFTValData | None]:
        """train_llama's make_data(cfg, dist, log): this rank's loader and validation batches."""
        for note in self.notes:
            log.print(note)
        global_batch = cfg.total_batch_tokens // cfg.seq_len
        log.print(f"sft batches: {global_batch} examples per step (total_batch_tokens {cfg.total_batch_tokens:,} "
                  f"/ seq_len {cfg.seq_len}), {self.steps_per_epoch(global_batch):.1f} steps per epoch, "
                  f"{cfg.max_steps * global_batch / len(self.train):.2f} epochs in {cfg.max_steps} steps; "
                  f"padded on the right to multiples of {cfg.pad_multiple} tokens")
        loader = SFTLoader(self.train, self.identity, global_batch, cfg, d.rank, d.world_size, log.print)
        val = (SFTValData(self.val, cfg.micro_batch, cfg.seq_len, cfg.pad_multiple, d.rank, d.world_size)
               if cfg.eval_interval else None)
        return loader, val


def _all_too_long(split: str, count: int, limit: int, overlong: str) -> str:
    if overlong == "truncate":  # cut to the limit, and still nothing to train: the prompt fills it
        return f"all {count} {split} examples have prompts that fill seq_len + 1 = {limit} tokens (no answer token is left)"
    return f"all {count} {split} examples are longer than seq_len + 1 = {limit} tokens"


def _or_truncate(overlong: str) -> str:
    return ", or pass --overlong=truncate" if overlong == "drop" else ""


def collate(examples: list[Example], seq_len: int, pad_multiple: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y: (B, L) with L the longest input rounded up to pad_multiple (at most seq_len); y is
    the next token where that token is an answer token, else -1 (prompt and padding)."""
    longest = max(len(e.ids) for e in examples) - 1
    width = min(seq_len, -(-longest // pad_multiple) * pad_multiple)
    x = torch.full((len(examples), width), EOT, dtype=torch.long)
    y = torch.full((len(examples), width), -1, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.ids) - 1
        x[row, :n] = torch.from_numpy(e.ids[:-1])
        y[row, :n] = torch.from_numpy(np.where(e.trained[1:], e.ids[1:], -1))
    return x, y


class SFTLoader(FollowsOrder):
    """This rank's training micro-batches: train_llama's loader protocol, over examples."""

    # The data, the batch geometry and this rank's place; rank, world size and log default for tests.
    def __init__(self, examples: list[Example], identity: dict, global_batch: int, cfg: SFTConfig,
                 rank: int = 0, world_size: int = 1, log: Callable[[str], None] = print):
        if global_batch % (cfg.micro_batch * world_size):
            raise ConfigError(f"{global_batch} examples per step (total_batch_tokens / seq_len) is not a multiple "
                              f"of micro_batch {cfg.micro_batch} x world_size {world_size}")
        self.examples, self.identity = examples, identity
        self.seq_len, self.pad_multiple, self.seed, self.shuffle = cfg.seq_len, cfg.pad_multiple, cfg.seed, cfg.shuffle
        self.log = log
        # the pretraining loader's order: world-size independent, one number of position
        self.order = GlobalOrder(len(examples), global_batch, cfg.micro_batch, rank, world_size, cfg.seed,
                                 cfg.shuffle, log=lambda line: log(f"sft data: {line}"), unit="examples",
                                 every_epoch=False)
        self.targets = [int(e.trained[1:].sum()) for e in examples]  # what collate marks as targets

    def targets_in_step(self) -> int:
        """Answer tokens in the coming optimizer step, over all ranks: train_llama weights each
        micro-batch's mean loss by its share, so that the step's loss is the mean over every
        answer token whatever micro_batch and the GPU count are (as one big batch would give)."""
        return sum(self.targets[i] for i in self.order.step_ids(self.order.step))

    def example_ids(self, step: int) -> list[int]:
        """The examples of this rank's micro-step `step` (dataloader.GlobalOrder's arithmetic)."""
        return self.order.ids(step)

    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
        """Micro-step `step`'s x, y again and the index of each example (spike forensics)."""
        ids = self.order.ids(step)
        return (*collate([self.examples[i] for i in ids], self.seq_len, self.pad_multiple),
                [{"example": i} for i in ids])

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = collate([self.examples[i] for i in self.order.ids(self.order.step)], self.seq_len,
                        self.pad_multiple)
        self.order.step = self.order.following(self.order.step)
        return batch

    def state_dict(self) -> dict:
        return {**self.order_state(), "seed": self.seed, "seq_len": self.seq_len,
                "shuffle": self.shuffle, "data": self.identity}

    def load_state_dict(self, state: dict, accept_new_data: bool = False) -> None:
        for key in ("seed", "seq_len", "shuffle"):
            if state.get(key) != getattr(self, key):
                raise DataError(f"the saved loader state has {key}={state.get(key)!r} but this run "
                                 f"{key}={getattr(self, key)!r}: use the saved value to resume")
        saved = state.get("data") or {}
        differences = [f"{k}: checkpoint {_short(saved[k]) if k in saved else 'records none'} vs now {_short(v)}"
                       for k, v in self.identity.items() if saved.get(k) != v]
        if differences and not accept_new_data:
            raise DataError(f"the instruction data differs from the checkpoint's ({'; '.join(differences)}): use "
                            f"the data and knobs the run started with, or pass --accept_new_data=true to continue "
                            f"on this data from the same position in its order")
        if differences:
            self.log(f"sft data: differs from the checkpoint's ({'; '.join(differences)}); continuing on it as "
                     f"accept_new_data asks")
        self.seek_order(state)


def _short(value) -> str:
    if isinstance(value, dict):  # a template: its name says enough
        return repr(value.get("name"))
    return repr(value)[:16] + ("..." if len(repr(value)) > 16 else "")


class SFTValData:
    """This rank's contiguous share of the validation examples, in micro-batches, every iteration."""

    def __init__(self, examples: list[Example], micro_batch: int, seq_len: int, pad_multiple: int,
                 rank: int = 0, world_size: int = 1):
        n = len(examples)
        self.examples = examples[rank * n // world_size:(rank + 1) * n // world_size]
        self.micro_batch, self.seq_len, self.pad_multiple = micro_batch, seq_len, pad_multiple

    def __len__(self) -> int:
        return -(-len(self.examples) // self.micro_batch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.examples), self.micro_batch):
            yield collate(self.examples[start:start + self.micro_batch], self.seq_len, self.pad_multiple)


# ----------------------------------------------------------------------------- config and entry point

def main(argv: list[str] | None = None) -> dict:
    return training_cli("finetune.py", __doc__, argv, SFTConfig, fine_tune)


def fine_tune(cfg: SFTConfig) -> dict:
    """The data first (a bad file is named before anything else), then the base model, then
    train_llama's loop on the instruction examples."""
    data = SFTData(cfg)
    check_base_model(cfg)
    if cfg.epochs:
        per_step = cfg.total_batch_tokens // cfg.seq_len
        cfg.max_steps = math.ceil(cfg.epochs * data.steps_per_epoch(per_step))
    return train(cfg, make_data=data.loaders)


def check_base_model(cfg: SFTConfig) -> None:
    """A fine-tuning run that has not started yet needs --init_from to exist: say how to make it
    (the pretraining command of the config that writes there) before the model is built."""
    if Path(cfg.init_from).exists() or checkpoint.complete_checkpoints(cfg.out_dir):
        return
    raise ConfigError(f"--init_from={cfg.init_from} does not exist: make the base model first with "
                      f"`{pretraining_command(cfg.init_from)}`, or point --init_from at one of our runs "
                      f"(or step_* directories) or a Hugging Face Llama directory")


def pretraining_command(out_dir: str) -> str:
    """The train_llama.py command that writes `out_dir`: a config in configs/ whose out_dir it is,
    else the tiny config sent there."""
    for path in sorted((Path(__file__).parent / "configs").glob("*.py")):
        try:
            cfg = load_config_file(str(path), TrainConfig)
        except Exception:  # noqa: BLE001 - a config that does not load is simply not the one
            continue
        if not isinstance(cfg, SFTConfig) and Path(cfg.out_dir) == Path(out_dir):
            return f"python train_llama.py --config configs/{path.name}"
    return f"python train_llama.py --config configs/tiny.py --out_dir={out_dir}"


if __name__ == "__main__":
    main()
