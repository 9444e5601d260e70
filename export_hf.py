"""Our checkpoints <-> Hugging Face `LlamaForCausalLM` directories.

Export writes what `LlamaForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` read:
`model.safetensors`, `config.json`, `generation_config.json` and GPT-2 tokenizer files built from
the same local vocabulary files as `tokenizer.py` (nothing is downloaded); a model fine-tuned by
finetune.py gets its chat template too (`tokenizer.apply_chat_template(messages,
add_generation_prompt=True)` then builds finetune.py's prompt tokens). Import (`--from_hf`) reads
a Hugging Face Llama directory through hf_io.py, which also holds the name and config mapping.

The vocabulary: GPT-2 has 50257 tokens, our model pads to 50304 for faster matmuls.
- Export keeps all rows unless asked (`vocab_size=50257` / `--vocab_size 50257`): the real
  tokens' logits are identical either way; slicing only drops the padding tokens, which training
  never targets, from the softmax.
- Import pads to `pad_vocab_to` (50304) with zero rows. Zero embedding rows are never read (no
  GPT-2 id reaches them). Zero output rows give the padding tokens a logit of exactly 0: the real
  tokens' logits are unchanged, but the softmax now includes 47 extra terms of e^0 (negligible
  when the best real logit is large, as in a trained model) and a padding token can win the
  argmax when every real logit is negative. That is the right start for continued training
  (the first steps push those logits down, as in training from scratch); to evaluate an imported
  checkpoint exactly, import with `pad_vocab_to=None` to keep its own vocabulary.

The output directory (`--out`, both directions) is written whole or not at all: the files go to a
hidden sibling directory that replaces `--out` only when complete (an atomic swap on Linux), so a
crash leaves the previous export, and no file of an earlier export survives next to the new one.
Every output carries `export_info.json` (what was exported, from where, in which dtype). An
existing `--out` is replaced when it is empty or holds that file; any other non-empty directory is
refused unless `--force`. The output is checked before the checkpoint is read.

Import reads exactly the files the directory names: `model.safetensors`, or the shards that
`model.safetensors.index.json` lists, each holding exactly the tensors the index puts in it. Both
a single file and an index, a `*.safetensors` file the index does not list, or shards without an
index are refused as leftovers of another save rather than silently chosen between. A missing
`config.json` key or an unreadable (truncated) file is one line naming it.

    python export_hf.py --checkpoint out/llama_1p7b/step_0001000 --out hf_out --dtype bfloat16
    python export_hf.py --from_hf path/to/DMaS-LLaMa-Lite --out out/imported
    python export_hf.py --checkpoint out/llama_1p7b --out some_dir --force   # replace a foreign dir

A LoRA run (finetune.py --lora_rank) exports as the merged model by default: its base with the
adapters folded into the weights, an ordinary Llama directory. With `--adapter` it exports the
adapters alone in PEFT's format (adapter_config.json, adapter_model.safetensors, plus the tokenizer
files and chat template), for `peft.PeftModel.from_pretrained(<the base exported by this script>,
<dir>)`; adapter_config.json names the base by the path the run recorded.

    python export_hf.py --checkpoint out/sft_1p7b_lora --out hf_merged
    python export_hf.py --checkpoint out/sft_1p7b_lora --out hf_adapter --adapter
    python export_hf.py --checkpoint out/llama_1p7b --out hf_base   # the base the adapter goes on
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file

from llama_fineweb import checkpoint, lora
from llama_fineweb.chat_template import checkpoint_template
from llama_fineweb.hf_io import (INDEX_FILE, SINGLE_FILE, check_vocabulary, config_from_hf, hf_config,  # noqa: F401
                                  hf_name, load_hf, load_weights, to_hf_state_dict)
from llama_fineweb.tokenizer import N_VOCAB, vocab_file
from llama_fineweb.utils import DTYPES, UserError, cli_errors, closed_output_survives, fsync_dir
from model import Transformer

EXPORT_INFO = "export_info.json"  # written last into every output: "this directory is an export"
_WRITTEN_BY = "export_hf.py"

# ----------------------------------------------------------------------------- output directory


def export_info(path: str | Path) -> dict | None:
    """The EXPORT_INFO of a directory this module wrote, else None."""
    try:
        info = json.loads((Path(path) / EXPORT_INFO).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("written_by") == _WRITTEN_BY else None


def check_output_dir(out: str | Path, force: bool = False, source: str | Path | None = None) -> Path:
    """`out` as a Path if an export may replace it: absent, empty, an earlier export (it holds
    EXPORT_INFO), or any directory with `force`. UserError otherwise, and for the `source` itself
    or a directory holding it: called before the checkpoint is read, so a bad --out costs nothing."""
    out = Path(out)
    if source is not None:
        src, dst = Path(source).resolve(), out.resolve()
        if dst == src or dst in src.parents:
            raise UserError(f"--out {out} would replace the source {source}: choose another output directory")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UserError(f"output {out} exists and is not a directory: remove it or choose another directory")
    if out.is_dir() and not force and export_info(out) is None and any(out.iterdir()):
        raise UserError(
            f"output directory {out} is not empty and holds no {EXPORT_INFO} (it is not an earlier "
            f"export): choose another directory, or pass --force (force=True) to replace it"
        )
    return out


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # old kernel, or the filesystem lacks it
        return False
    raise OSError(err, os.strerror(err), str(b))


def _move_into_place(tmp: Path, out: Path) -> None:
    """Make the complete directory `tmp` be `out`, replacing what was there."""
    if not out.exists():
        os.rename(tmp, out)
    else:
        if _exchange(tmp, out):
            old = tmp  # now holds the previous export
        else:
            # Two renames: a crash between them leaves both complete directories as hidden siblings.
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except OSError:
                os.rename(old, out)
                raise
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(out.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _writing(out: str | Path, force: bool, info: dict) -> Iterator[Path]:
    """A fresh sibling directory of `out` to write into: when the block completes it gets
    EXPORT_INFO (with `info` and its file list) and replaces `out` whole; if the block fails it is
    deleted and `out` is untouched."""
    out = check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")  # same filesystem: the rename is atomic
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        files = sorted(p.name for p in tmp.iterdir())
        info = {"written_by": _WRITTEN_BY, **info, "files": files + [EXPORT_INFO]}
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
        mode = 0o666 & ~_umask()  # safetensors writes 0600: every file gets what a plain open() gives
        for path in tmp.iterdir():  # durable before the rename makes them the export
            if path.is_file():
                os.chmod(path, mode)
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        fsync_dir(tmp)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------- export


def save_tokenizer(out_dir: str | Path, model_max_length: int = 1024, chat_template: str | None = None) -> None:
    """GPT-2 tokenizer files that `AutoTokenizer.from_pretrained(out_dir)` loads, built from the
    local, sha256-checked `encoder.json` and `vocab.bpe` (needs `transformers`, not the network);
    with `chat_template` (Jinja, finetune.Template.jinja()) for `apply_chat_template`."""
    from transformers import GPT2TokenizerFast

    # Positional on purpose: transformers 4.x names them vocab_file/merges_file, 5.x vocab/merges.
    tok = GPT2TokenizerFast(
        str(vocab_file("encoder.json")), str(vocab_file("vocab.bpe")), model_max_length=model_max_length
    )
    tok.chat_template = chat_template
    tok.save_pretrained(str(out_dir))
    if chat_template is not None:
        # Recent transformers write chat_template.jinja; older ones read tokenizer_config.json only.
        config_path = Path(out_dir) / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config["chat_template"] = chat_template
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


# Keywords with defaults, one per export option of the CLI.
def save_hf(
    model: Transformer, out_dir: str | Path, vocab_size: int | None = None,
    dtype: torch.dtype = torch.float32, force: bool = False, source: str | None = None,
    chat_template: str | None = None,
) -> None:
    """Write `model` as a Hugging Face Llama directory (model.safetensors, config.json,
    generation_config.json, the tokenizer files, EXPORT_INFO), replacing `out_dir` whole when
    complete; see check_output_dir for what may be replaced. `source` is recorded in EXPORT_INFO;
    `chat_template` (Jinja) goes to the tokenizer files."""
    config = hf_config(model.config, vocab_size, dtype)
    info = {"format": "hf_llama", "source": source, "dtype": config["torch_dtype"],
            "vocab_size": config["vocab_size"], "model_config": model.config.to_dict()}
    with _writing(out_dir, force, info) as tmp:
        hf_state = to_hf_state_dict(model, vocab_size)
        state = {k: v.to(device="cpu", dtype=dtype).contiguous() for k, v in hf_state.items()}
        save_file(state, str(tmp / SINGLE_FILE), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        # pad = EOT: GPT-2 has no pad token, and without one generate() warns on every call.
        eot = config["eos_token_id"]
        generation = {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
        save_tokenizer(tmp, model_max_length=model.config.max_seq_len, chat_template=chat_template)



def save_adapter(model: Transformer, spec: lora.LoraSpec, out_dir: str | Path, base: str,
                 dtype: torch.dtype = torch.float32, force: bool = False, source: str | None = None,
                 chat_template: str | None = None) -> None:
    """The LoRA adapters of `model` (attached, not merged) as a PEFT adapter directory whose module
    names are LlamaForCausalLM's; `base` goes to adapter_config.json's base_model_name_or_path."""
    info = {"format": "peft_lora", "source": source, "base": base, "dtype": str(dtype).removeprefix("torch."),
            "lora": spec.to_dict()}
    with _writing(out_dir, force, info) as tmp:
        state = {k: v.to(device="cpu", dtype=dtype).contiguous() for k, v in lora.peft_state_dict(model).items()}
        save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        lora.save_peft_config(spec, tmp, base_model=base)
        save_tokenizer(tmp, model_max_length=model.config.max_seq_len, chat_template=chat_template)


def _export_adapter(args: argparse.Namespace, dtype: torch.dtype) -> None:
    ckpt = checkpoint.resolve(args.checkpoint)
    adapter = checkpoint.read_meta(ckpt).get("lora") if ckpt is not None else None
    if not adapter:
        raise UserError(f"--adapter: {args.checkpoint} holds no LoRA adapters (not a finetune.py --lora_rank run); "
                        f"drop --adapter to export its whole model")
    model = checkpoint.load_model(ckpt, args.device, verify_files=args.verify, merge=False, lora_base=args.lora_base)
    template = checkpoint_template(args.checkpoint)
    base = str(Path(args.lora_base).resolve()) if args.lora_base else adapter["base"]["path"]
    save_adapter(model, lora.LoraSpec.from_dict(adapter["spec"]), args.out, base, dtype=dtype, force=args.force,
                 source=str(ckpt), chat_template=template.jinja() if template else None)
    trained = sum(t.numel() for t in lora.peft_state_dict(model).values())
    if (Path(base) / "config.json").is_file():  # a Hugging Face directory already: transformers reads it as it is
        load = f"load both with PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained({base!r}), {args.out!r})"
    else:
        load = (f"export it with export_hf.py --checkpoint {base} --out BASE_DIR and load both with "
                f"PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained('BASE_DIR'), {args.out!r})")
    print(f"exported {trained:,} adapter parameters from {ckpt} to {args.out} (PEFT format); their base is {base}: "
          + load)


# ----------------------------------------------------------------------------- our weights


def save_weights(model: Transformer, out_dir: str | Path, force: bool = False, source: str | None = None) -> None:
    """Our model's weights (our names, model.safetensors) and its config (model_config.json):
    what `--from_hf` writes and `--checkpoint` also reads, to start a run from imported weights.
    `out_dir` is replaced whole when complete, as by save_hf."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in state.values()})
    info = {"format": "ours", "source": source, "dtype": ",".join(dtypes),
            "vocab_size": model.config.vocab_size, "model_config": model.config.to_dict()}
    with _writing(out_dir, force, info) as tmp:
        save_file(state, str(tmp / SINGLE_FILE), metadata={"format": "pt"})
        (tmp / "model_config.json").write_text(json.dumps(model.config.to_dict(), indent=2))


def _load_checkpoint(path: str, device: str, verify: str = "full", lora_base: str | None = None) -> Transformer:
    if (Path(path) / "config.json").is_file():
        raise UserError(f"--checkpoint {path} is a Hugging Face model directory already: transformers loads it "
                        f"as it is (LlamaForCausalLM.from_pretrained); --from_hf imports it into our format")
    if (Path(path) / "model_config.json").is_file():
        return load_weights(path, device)
    return checkpoint.load_model(path, device, verify_files=verify, lora_base=lora_base)


def main(argv: list[str] | None = None) -> None:
    with closed_output_survives():  # `| head` or `| true` gone: quiet, and the work is kept
        _main(argv)


def _main(argv: list[str] | None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint",
                        help="our checkpoint directory (or one written by --from_hf) to export")
    source.add_argument("--from_hf", help="a Hugging Face Llama directory to import into our format")
    parser.add_argument("--out", required=True,
                        help="output directory, replaced whole when complete (if it exists: empty or an earlier export)")
    parser.add_argument("--force", action="store_true",
                        help=f"replace --out even if it is a non-empty directory without {EXPORT_INFO}")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="export: dtype of the saved weights; import: dtype of our weights")
    parser.add_argument("--vocab_size", type=int, default=None,
                        help=f"export: keep only the first N vocabulary rows ({N_VOCAB} = GPT-2's real "
                             "tokens); default keeps all")
    parser.add_argument("--pad_vocab_to", type=int, default=50304,
                        help="import: pad the vocabulary with zero rows to this size (0 keeps it)")
    parser.add_argument("--adapter", action="store_true",
                        help="a LoRA run: export the adapters alone in PEFT's format instead of the merged model")
    parser.add_argument("--lora_base", help="a LoRA run whose base model moved: its new path (checked against the sha256 the run recorded)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--verify", choices=("full", "size"), default="full",
                        help="export: check the checkpoint's files against their recorded sha256 (full) or "
                             "sizes only (size, faster)")
    args = parser.parse_args(argv)

    with cli_errors("export_hf.py"):
        dtype = DTYPES[args.dtype]
        source_dir = args.checkpoint or args.from_hf
        check_output_dir(args.out, args.force, source_dir)  # before the checkpoint is read: fail fast
        if args.adapter and not args.checkpoint:
            raise UserError("--adapter exports a LoRA run's adapters: pass it with --checkpoint")
        if args.adapter:
            _export_adapter(args, dtype)
        elif args.checkpoint:
            model = _load_checkpoint(args.checkpoint, args.device, args.verify, args.lora_base)
            template = checkpoint_template(args.checkpoint)
            save_hf(model, args.out, vocab_size=args.vocab_size, dtype=dtype, force=args.force, source=source_dir,
                    chat_template=template.jinja() if template else None)
            print(f"exported {model.num_params():,} parameters from {args.checkpoint} to {args.out}"
                  + (f" with the {template.name} chat template" if template else ""))
        else:
            check_vocabulary(args.from_hf)
            model = load_hf(args.from_hf, args.device, pad_vocab_to=args.pad_vocab_to or None, dtype=dtype)
            save_weights(model, args.out, force=args.force, source=source_dir)
            print(f"imported {model.num_params():,} parameters (vocab {model.config.vocab_size}) "
                  f"from {args.from_hf} to {args.out}")


if __name__ == "__main__":
    main()
