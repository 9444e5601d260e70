"""Talk to a model: one answer for a script, or a conversation in the terminal.

    python chat.py --checkpoint out/sft_tiny --prompt "Name a primary color." --temperature 0
    python chat.py --checkpoint out/sft_1p7b                   # interactive, multi-turn
    python chat.py --hf path/to/DMaS-LLaMa-Lite-step-43.5k-instruct

The conversation is kept in the chat template the checkpoint was fine-tuned with (finetune.py
records it; --template overrides; vicuna otherwise) and tokenized exactly as in fine-tuning. Tokens
are printed as they are decoded (bytes are held back until they complete a UTF-8 character) and
generation stops at <|endoftext|> or after --max_new_tokens, with a KV cache (static, and the decode
compiled, on CUDA or with --compile=on: see model.Transformer.decoder). --temperature 0 is
greedy; otherwise sampling from the --top_k most likely tokens, seeded by --seed.

With --prompt the answer alone goes to stdout (notes to stderr); a prompt longer than the model's
context is an error. Interactively, each turn sends the whole conversation; when it no longer
fits with room for the answer (max_new_tokens, at most half the context), the oldest turns are
dropped, and a line says so. Type /reset to start over, /exit (or Ctrl-D) to leave; Ctrl-C stops
an answer.
"""

from __future__ import annotations

import argparse
import codecs
import json
import sys
from pathlib import Path
from typing import Iterator

import torch

from llama_fineweb import checkpoint, hf_io
from llama_fineweb.chat_template import TEMPLATES, Template, checkpoint_template, encode, load_template
from llama_fineweb.tokenizer import EOT, N_VOCAB, get_encoding
from llama_fineweb.utils import DTYPES, UserError, cli_errors, closed_output_survives, resolve_device
from model import Transformer, pick_next_token


# model.generate's sampling knobs plus a stop token: the same names, passed through.
@torch.no_grad()
def stream_tokens(model: Transformer, ids: list[int], max_new_tokens: int, temperature: float = 0.0,
                  top_k: int | None = None, generator: torch.Generator | None = None,
                  stop: int | None = EOT, compile: bool | str = False) -> Iterator[int]:
    """Yield up to max_new_tokens token ids continuing `ids`, one at a time, stopping after
    `stop`. The prompt is one forward pass into the KV cache, then one `model.decoder` call per token
    (compiled with `compile`: one graph per cache length, `model.cache_length`'s few, so a long
    conversation compiles a handful of graphs, not one per turn, as in model.generate). Ids past
    GPT-2's vocabulary (the model's padding rows) are never picked: they have no text."""
    device = model.output.weight.device
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    model.setup_cache(1, model.cache_length(len(ids) + max_new_tokens, compile))
    decode = model.decoder(compile)
    try:
        logits = model.step(idx, 0)  # (1, vocab)
        pos = len(ids)
        for i in range(max_new_tokens):
            logits = logits.float()
            logits[:, N_VOCAB:] = float("-inf")
            token = pick_next_token(logits, temperature, top_k, generator)  # (1, 1)
            yield int(token)
            if int(token) == stop or i == max_new_tokens - 1:
                return
            logits = decode(token, pos)
            pos += 1
    finally:
        if not compile:
            model.clear_cache()


class TextStream:
    """Token ids -> text as it becomes printable: a character split across BPE tokens (emoji,
    CJK) is held back until its last byte arrives."""

    def __init__(self):
        self.enc = get_encoding()
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token: int) -> str:
        return self.decoder.decode(self.enc.decode_single_token_bytes(token))

    def flush(self) -> str:
        return self.decoder.decode(b"", final=True)


# stream_tokens' knobs and where to print: kept flat so the CLI's flags map one to one.
def answer(model: Transformer, ids: list[int], max_new_tokens: int, temperature: float, top_k: int | None,
           generator: torch.Generator | None, out=None, compile: bool = False) -> str:
    """Generate and print the answer to `ids` as it is decoded (to `out`, default sys.stdout);
    return its text (no <|endoftext|>, no leading whitespace: templates such as Vicuna's put a
    space before the answer)."""
    out = sys.stdout if out is None else out  # looked up now, so a redirected stdout is honoured
    stream, text = TextStream(), []
    try:
        for token in stream_tokens(model, ids, max_new_tokens, temperature, top_k, generator, compile=compile):
            if token == EOT:
                break
            piece = stream.add(token)
            text.append(piece if text else piece.lstrip())
            if not text[-1]:
                text.pop()
                continue
            out.write(text[-1])
            out.flush()
    finally:
        text.append(stream.flush())
        out.write(text[-1] + "\n")
        out.flush()
    return "".join(text)


def build_prompt(template: Template, history: list[tuple[str, str]], prompt: str, context: int,
                 reserve: int, system: str | None = None) -> tuple[list[int], int]:
    """Token ids of the conversation `history` (user, assistant) + `prompt` ending in the
    template's reply, keeping room for `reserve` new tokens by dropping the oldest turns; also
    how many turns were dropped. UserError when `prompt` alone does not fit the context."""
    start = [{"role": "system", "content": system}] if system is not None else []
    for dropped in range(len(history) + 1):
        messages = list(start)
        for user, assistant in history[dropped:]:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        messages.append({"role": "user", "content": prompt})
        ids, _ = encode(template.segments(messages, add_generation_prompt=True))
        if len(ids) + reserve <= context:
            return ids, dropped
    if len(ids) >= context:
        raise UserError(f"the prompt is {len(ids):,} tokens in the {template.name} template, and the model's "
                        f"context is {context:,}: shorten it")
    return ids, len(history)  # it fits, with less room for the answer than reserved


def load_model(args: argparse.Namespace) -> tuple[Transformer, Template, str]:
    """The model on its device and dtype, the template and a note on where the template came from."""
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    template = load_template(args.template) if args.template else None
    if args.hf:
        hf_io.check_vocabulary(args.hf)
        model = hf_io.load_hf(args.hf, device, pad_vocab_to=None, dtype=dtype)
        template = template or TEMPLATES["vicuna"]
        note = hf_template_note(Path(args.hf), template)
    else:
        if (Path(args.checkpoint) / "model_config.json").is_file():
            model = hf_io.load_weights(args.checkpoint, device)
        else:
            model = checkpoint.load_model(args.checkpoint, device, verify_files=args.verify, lora_base=args.lora_base)
        saved = checkpoint_template(args.checkpoint)
        note = (f"template {template.name} (--template)" if template else
                f"template {saved.name} (the checkpoint's)" if saved else
                "template vicuna: the checkpoint records none (it was not fine-tuned by finetune.py)")
        template = template or saved or TEMPLATES["vicuna"]
    return model.to(dtype).eval(), template, note


def hf_template_note(hf_dir: Path, template: Template) -> str:
    """Which template is used, and whether the directory's own chat template is the same one."""
    own = hf_dir / "chat_template.jinja"
    text = own.read_text() if own.is_file() else None
    if text is None and (hf_dir / "tokenizer_config.json").is_file():
        text = json.loads((hf_dir / "tokenizer_config.json").read_text()).get("chat_template")
    if text is None or text == template.jinja():
        return f"template {template.name}"
    return (f"template {template.name}; note: {hf_dir} has another chat template, which this script does not "
            f"run (pass --template if the model was tuned with one of {sorted(TEMPLATES)})")


def interactive(model: Transformer, template: Template, args: argparse.Namespace,
                generator: torch.Generator | None) -> None:
    context = model.config.max_seq_len
    reserve = min(args.max_new_tokens, context // 2)
    history: list[tuple[str, str]] = []
    print(f"chatting with a {context:,}-token context; /reset starts over, /exit or Ctrl-D leaves")
    while True:
        try:
            prompt = input("User: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if prompt in ("/exit", "/quit"):
            return
        if prompt == "/reset":
            history = []
            print("[conversation cleared]")
            continue
        if not prompt:
            continue
        try:
            ids, dropped = build_prompt(template, history, prompt, context, reserve, args.system)
        except UserError as e:
            print(f"[{e}]")
            continue
        if dropped:
            print(f"[dropped the oldest {dropped} turn{'s' * (dropped > 1)} to fit the {context:,}-token context]")
            history = history[dropped:]
        print("Assistant: ", end="", flush=True)
        try:
            reply = answer(model, ids, min(args.max_new_tokens, context - len(ids)), args.temperature,
                           args.top_k, generator, compile=args.compile)
        except KeyboardInterrupt:
            print("\n[answer interrupted; it is not kept in the conversation]")
            continue
        history.append((prompt, reply.strip()))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="our run or step_* directory (or export_hf.py --from_hf output)")
    source.add_argument("--hf", help="a Hugging Face Llama directory with GPT-2's vocabulary")
    parser.add_argument("--lora_base", help="a LoRA run whose base model moved: its new path (checked against the sha256 the run recorded)")
    parser.add_argument("--prompt", help="answer this once and exit (the answer alone on stdout)")
    parser.add_argument("--template", help=f"one of {sorted(TEMPLATES)} or a .json file; default: the "
                                           "checkpoint's, else vicuna")
    parser.add_argument("--system", help="a system message instead of the template's")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=50, help="0 = the whole vocabulary")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="weights' dtype; default bfloat16 on CUDA, "
                                                                "float32 on CPU")
    parser.add_argument("--verify", choices=("full", "size"), default="full",
                        help="check a checkpoint's files against their recorded sha256 (full) or sizes only (size)")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="decode with torch.compile (static KV caches of a few lengths, one graph each; the "
                             "first answer of each length waits for its compile): auto = on CUDA only, where it "
                             "pays back at once")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    with closed_output_survives():  # `| head` or `| true` gone: quiet, and the work is kept
        _main(argv)


def _main(argv: list[str] | None) -> None:
    args = parse_args(argv)
    with cli_errors("chat.py"):
        if args.max_new_tokens < 1 or args.temperature < 0 or args.top_k < 0:
            raise UserError("--max_new_tokens must be positive, --temperature and --top_k 0 or more")
        model, template, note = load_model(args)
        args.top_k = args.top_k or None
        device = model.output.weight.device
        generator = torch.Generator(device=device).manual_seed(args.seed) if args.temperature else None
        print(f"loaded {model.num_params():,} parameters on {device}; {note}", file=sys.stderr, flush=True)
        # On the CPU the compile costs a minute or more for ~10% at 124m (BENCHMARKS.md:
        # "Generation speed").
        args.compile = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
        if args.prompt is None:
            return interactive(model, template, args, generator)
        context = model.config.max_seq_len
        ids, _ = build_prompt(template, [], args.prompt.strip(), context, args.max_new_tokens, args.system)
        room = context - len(ids)
        if room < args.max_new_tokens:
            print(f"note: the prompt takes {len(ids):,} of the {context:,}-token context: the answer can have at "
                  f"most {room:,} tokens", file=sys.stderr, flush=True)
        answer(model, ids, min(args.max_new_tokens, room), args.temperature, args.top_k, generator,
               compile=args.compile)


if __name__ == "__main__":
    main()
