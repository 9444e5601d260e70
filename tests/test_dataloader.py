import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch

from llama_fineweb import dataloader
from llama_fineweb.dataloader import DataError, TrainLoader, ValLoader, data_identity, shard_name, val_batches

T = 8  # sequence length: windows of 9 tokens
TRAIN_LENGTHS = [1000, 777, 1500]  # uneven, so windows straddle shard boundaries
VAL_LENGTH = 500


def write_reference_shard(data_dir, split: str, index: int, tokens: np.ndarray) -> None:
    """Save a shard exactly as build-nanogpt's fineweb.py does: np.save of uint16, name without .npy."""
    np.save(os.path.join(data_dir, f"edufineweb_{split}_{index:06d}"), tokens.astype(np.uint16))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Shards whose stream is 0, 1, 2, ...: every token tells where in the stream it sits."""
    data_dir = tmp_path_factory.mktemp("shards")
    write_reference_shard(data_dir, "val", 0, 40000 + np.arange(VAL_LENGTH))
    start = 0
    for index, length in enumerate(TRAIN_LENGTHS, start=1):
        write_reference_shard(data_dir, "train", index, np.arange(start, start + length))
        start += length
    return str(data_dir)


def global_batches(data_dir, world_size, micro_batch, global_batch, steps, state=None, **kwargs):
    """Run world_size ranks in one process; return each global batch's x rows in global order."""
    loaders = [TrainLoader(data_dir, T, micro_batch, global_batch, rank=r, world_size=world_size,
                           log=lambda s: None, **kwargs) for r in range(world_size)]
    if state is not None:
        for loader in loaders:
            loader.load_state_dict(state)
    batches = []
    for _ in range(steps):
        rows = []
        for _ in range(loaders[0].accum_steps):
            for loader in loaders:  # micro-step m: rank 0's B sequences, then rank 1's, ...
                x, y = loader.next_batch()
                assert torch.equal(x[:, 1:], y[:, :-1])
                rows.append(x)
        batches.append(torch.cat(rows))
    return batches, loaders[0].state_dict()


def sequence_ids(x: torch.Tensor) -> list[int]:
    """In the fixture's stream token i is i, so a row's first token gives its sequence."""
    assert torch.equal(x - x[:, :1], torch.arange(T).expand_as(x)), "a row is not a window of the stream"
    assert (x[:, 0] % (T + 1) == 0).all()
    return (x[:, 0] // (T + 1)).tolist()


def test_same_global_batches_for_any_world_size(data):
    """World sizes 1, 2 and 4 (with 4, 2 and 1 accumulation steps) see identical global batches."""
    runs = [global_batches(data, w, micro_batch=2, global_batch=8, steps=50)[0] for w in (1, 2, 4)]
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))
    ids = [i for batch in runs[0] for i in sequence_ids(batch)]
    per_epoch = sum(TRAIN_LENGTHS) // (T + 1)
    assert sorted(ids[:per_epoch]) == list(range(per_epoch)), "an epoch visits every sequence once"
    assert ids[:per_epoch] != list(range(per_epoch)), "shuffled"


def test_resume_on_another_world_size_reproduces_the_rest(data):
    """A position saved on 2 ranks and loaded on 4 yields exactly the batches of an unbroken run."""
    straight, _ = global_batches(data, 1, micro_batch=2, global_batch=8, steps=15)
    first, state = global_batches(data, 2, micro_batch=2, global_batch=8, steps=5)
    assert {k: v for k, v in state.items() if k != "data"} == {"position": 40, "seed": 1337, "seq_len": T,
                                                               "shuffle": True, "skip_batches": []}
    rest, _ = global_batches(data, 4, micro_batch=2, global_batch=8, steps=10, state=state)
    assert all(torch.equal(a, b) for a, b in zip(straight, first + rest))


def test_epochs_roll_over_with_a_new_permutation(data):
    """When the data runs out the next epoch is a new permutation (seed + epoch), and it is logged."""
    lines = []
    loader = TrainLoader(data, 99, 4, 8, seed=5, log=lines.append)
    per_epoch = loader.sequences_per_epoch
    assert per_epoch == sum(TRAIN_LENGTHS) // 100
    ids = []
    for _ in range(3 * per_epoch // 4):
        x, _ = loader.next_batch()
        ids += (x[:, 0] // 100).tolist()
    epochs = [ids[e * per_epoch:(e + 1) * per_epoch] for e in range(3)]
    assert all(sorted(e) == list(range(per_epoch)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert any("epoch 1" in line and "seed 6" in line for line in lines)
    assert any("epoch 2" in line and "seed 7" in line for line in lines)


def test_sequential_order_without_shuffle(data):
    """shuffle=False keeps the reference's order: sequences in stream order."""
    batches, _ = global_batches(data, 2, micro_batch=3, global_batch=12, steps=4, shuffle=False)
    assert [i for b in batches for i in sequence_ids(b)] == list(range(48))


def test_prefetch_yields_the_same_batches(data):
    """The background prefetch thread yields the same batches, also after load_state_dict."""
    plain, state = global_batches(data, 1, micro_batch=2, global_batch=4, steps=6)
    loader = TrainLoader(data, T, 2, 4, prefetch=True, log=lambda s: None)
    fetched = [torch.cat([loader.next_batch()[0] for _ in range(2)]) for _ in range(6)]
    assert all(torch.equal(a, b) for a, b in zip(plain, fetched))
    loader.load_state_dict({**state, "position": 8})
    again = [torch.cat([loader.next_batch()[0] for _ in range(2)]) for _ in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(plain[2:], again))
    loader.close()


def test_batches_are_contiguous_int64(data):
    """next_batch returns contiguous (micro_batch, seq_len) int64 tensors; pin_memory without CUDA is a no-op."""
    x, y = TrainLoader(data, T, 3, 3, pin_memory=True, log=lambda s: None).next_batch()
    for t in (x, y):
        assert t.shape == (3, T) and t.dtype == torch.int64 and t.is_contiguous()


def test_val_set_is_the_same_for_every_world_size(data):
    """Validation sequences are fixed and sequential; W ranks' shares concatenate to the W=1 set."""
    one = torch.cat([x for x, _ in val_batches(data, T, 4)])
    assert sequence_ids(one - 40000) == list(range(VAL_LENGTH // (T + 1)))
    shares = [list(val_batches(data, T, 4, rank=r, world_size=3)) for r in range(3)]
    assert torch.equal(torch.cat([x for share in shares for x, _ in share]), one)
    capped = list(val_batches(data, T, 4, max_sequences=10))
    assert [len(x) for x, _ in capped] == [4, 4, 2]
    assert torch.equal(torch.cat([y for _, y in capped]), one[:10] + 1)


def test_reference_shards_load(data):
    """Shards written the reference way (np.save of uint16 under edufineweb_* names) load."""
    loader = TrainLoader(data, T, 1, 1, shuffle=False, vocab_size=50257, log=lambda s: None)
    x, y = loader.next_batch()
    assert x.tolist() == [list(range(T))] and y.tolist() == [list(range(1, T + 1))]
    assert len(loader.stream.paths) == 3


def test_global_batch_must_divide(data):
    """A global batch that micro_batch * world_size does not divide is a one-line ValueError."""
    with pytest.raises(ValueError, match="global_batch 10 .* micro_batch 2 x world_size 4"):
        TrainLoader(data, T, 2, 10, world_size=4, log=lambda s: None)


def _shards(tmp_path, *arrays):
    for i, a in enumerate(arrays):
        write_reference_shard(tmp_path, "val" if i == 0 else "train", i, np.asarray(a))
    return str(tmp_path)


def _corrupt(tmp_path):
    d = _shards(tmp_path, np.arange(100), np.arange(100))
    with open(os.path.join(d, "edufineweb_train_000001.npy"), "wb") as f:
        f.write(b"this is not a numpy file")
    return d, "edufineweb_train_000001.npy"


def _truncated(tmp_path):
    d = _shards(tmp_path, np.arange(100), np.arange(100))
    path = os.path.join(d, "edufineweb_train_000001.npy")
    os.truncate(path, os.path.getsize(path) - 10)
    return d, "edufineweb_train_000001.npy"


def _wrong_dtype(tmp_path):
    d = _shards(tmp_path, np.arange(100))
    np.save(os.path.join(d, "edufineweb_train_000001.npy"), np.arange(100, dtype=np.int32))
    return d, "edufineweb_train_000001.npy"


def _token_too_big(tmp_path):  # two windows of T+1, both in the first batch of 2
    return _shards(tmp_path, np.arange(100), np.r_[np.arange(10), 50300, np.arange(7)]), "50300 at position 10"


def _too_short(tmp_path):
    return _shards(tmp_path, np.arange(100), np.arange(5)), "fewer than seq_len + 1 = 9"


@pytest.mark.parametrize("make", [
    lambda p: (str(p / "missing"), "missing"),
    lambda p: (str(p), "no train shards"),
    _corrupt, _truncated, _wrong_dtype, _token_too_big, _too_short,
], ids=["missing-dir", "no-shards", "corrupt", "truncated", "wrong-dtype", "token>=vocab", "shorter-than-T+1"])
def test_bad_data_is_a_one_line_error(tmp_path, make):
    """Missing dir, no shards, corrupt/truncated/mistyped .npy, token >= vocab, too few tokens: one-line DataError."""
    data_dir, expected = make(tmp_path)
    with pytest.raises(DataError) as info:
        loader = TrainLoader(data_dir, T, 2, 2, vocab_size=50257, log=lambda s: None)
        loader.next_batch()
    message = str(info.value)
    assert "\n" not in message and expected in message


def test_val_errors_are_one_line(tmp_path):
    """A val split shorter than T+1 or with a bad token is a one-line DataError."""
    d = _shards(tmp_path, np.arange(5), np.arange(100))
    with pytest.raises(DataError, match="val shards .* fewer than seq_len"):
        list(val_batches(d, T, 2))
    _shards(tmp_path, np.r_[np.arange(50), 60000, np.arange(49)])
    with pytest.raises(DataError, match="edufineweb_val_000000.npy holds token id 60000 at position 50"):
        list(val_batches(d, T, 2, vocab_size=50257))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux's /proc")
def test_resident_memory_stays_flat(tmp_path, monkeypatch):
    """Reading 32M tokens through the memory maps leaves resident memory about where it was."""
    def rss_mb():
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["VmRSS"].split()[0]) / 1024

    length = 1 << 24
    d = _shards(tmp_path, np.arange(1000), np.zeros(length), np.ones(length))
    monkeypatch.setattr(dataloader, "RELEASE_EVERY", 4 << 20)
    loader = TrainLoader(d, 1023, 64, 64, shuffle=False, vocab_size=50257, log=lambda s: None)
    loader.next_batch()  # allocations that stay for the loader's life, before the measurement
    before = rss_mb()
    for _ in range(2 * length // (64 * 1024) - 2):
        loader.next_batch()
    assert rss_mb() - before < 24, "64 MB of shards were read; far less may stay resident"


def test_shard_names_follow_build_nanogpt():
    """shard_name gives the reference's names: shard 0 is val, the others train, six digits."""
    assert [shard_name(i) for i in (0, 1, 12)] == [
        "edufineweb_val_000000.npy", "edufineweb_train_000001.npy", "edufineweb_train_000012.npy"]
    assert dataloader.SHARD_RE.match(shard_name(7)).groups() == ("train", "000007")


# ----------------------------------------------------------------------------- token-id checks

def write_manifest(data_dir, **fields) -> None:
    """A manifest.json listing every shard in data_dir with its size, plus `fields` in each entry."""
    names = sorted(n for n in os.listdir(data_dir) if n.endswith(".npy"))
    shards = [{"file": n, "bytes": os.path.getsize(os.path.join(data_dir, n)), **fields} for n in names]
    with open(os.path.join(data_dir, "manifest.json"), "w") as f:
        json.dump({"shards": shards}, f)


def test_first_batch_checks_only_the_windows_it_returns(data):
    """Start-up scans no shard: the first batch checks the ids of its own B*(T+1) tokens and no more."""
    loader = TrainLoader(data, T, 4, 4, vocab_size=50257, log=lambda s: None)
    assert loader.stream.tokens_checked == 0
    loader.next_batch()
    assert loader.stream.tokens_checked == 4 * (T + 1)


def test_bad_token_in_a_later_shard_fails_at_the_batch_that_reads_it(tmp_path):
    """A bad id deep in the last shard lets the batches before it through and fails the one that reads it."""
    last = np.arange(300)
    last[250] = 50300
    d = _shards(tmp_path, np.arange(100), np.arange(200), np.arange(200), last)
    loader = TrainLoader(d, T, 1, 1, shuffle=False, vocab_size=50257, log=lambda s: None)
    for _ in range((400 + 250) // (T + 1)):  # the last shard's first 28 windows among them
        loader.next_batch()
    with pytest.raises(DataError, match=r"edufineweb_train_000003\.npy holds token id 50300 at position 250"):
        loader.next_batch()


@pytest.mark.parametrize("max_token, bytes_off, checked", [(99, 0, False), (50300, 0, True), (99, 2, True)],
                         ids=["vouched", "max_token>=vocab", "other-size"])
def test_manifest_max_token_skips_the_check(tmp_path, max_token, bytes_off, checked):
    """Shards listed in manifest.json with their size and a max_token below the vocabulary are not
    checked (an entry without the fingerprint cannot vouch: size alone misses a rewrite)."""
    d = _shards(tmp_path, np.arange(100), np.arange(100), np.arange(100))
    write_manifest(d, max_token=max_token)
    manifest = json.load(open(os.path.join(d, "manifest.json")))
    for entry in manifest["shards"]:
        entry["bytes"] += bytes_off
        if not bytes_off:
            entry["fingerprint"] = dataloader.fingerprint(os.path.join(d, entry["file"]))
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    loader = TrainLoader(d, T, 2, 2, vocab_size=50257, log=lambda s: None)
    loader.next_batch()
    assert loader.stream.tokens_checked == (2 * (T + 1) if checked else 0)


# ----------------------------------------------------------------------------- validation

def test_val_loader_opens_once_and_repeats(data, monkeypatch):
    """Iterating a ValLoader twice yields the same batches from the one stream opened at construction."""
    opened = []

    class CountingStream(dataloader.TokenStream):
        def __init__(self, *args, **kwargs):
            opened.append(args)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(dataloader, "TokenStream", CountingStream)
    val = ValLoader(data, T, 4, rank=1, world_size=2, vocab_size=50257)
    assert len(opened) == 1
    first, second = list(val), list(val)
    assert len(first) == len(val) > 1
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(first, second))
    assert len(opened) == 1


# ----------------------------------------------------------------------------- data identity

def _three_shards(tmp_path):
    return _shards(tmp_path, np.arange(100), np.arange(200), np.arange(200, 400), np.arange(400, 600))


def _saved_state(data_dir) -> dict:
    loader = TrainLoader(data_dir, T, 2, 4, log=lambda s: None)
    for _ in range(6):
        loader.next_batch()
    return loader.state_dict()


def _add(d):
    write_reference_shard(d, "train", 4, np.arange(50))
    return "added: edufineweb_train_000004.npy"


def _remove(d):
    os.remove(os.path.join(d, "edufineweb_train_000002.npy"))
    return "removed: edufineweb_train_000002.npy"


def _rebuild(d):  # the same number of tokens, so the same size, but other tokens
    write_reference_shard(d, "train", 2, np.arange(200)[::-1])
    return "changed: edufineweb_train_000002.npy"


@pytest.mark.parametrize("change", [_add, _remove, _rebuild], ids=["added", "removed", "rebuilt"])
def test_resume_on_other_data_is_refused(tmp_path, change):
    """A state saved on other data (a shard added, removed, or rebuilt to the same size) is a one-line DataError."""
    d = _three_shards(tmp_path)
    state = _saved_state(d)
    expected = change(d)
    loader = TrainLoader(d, T, 2, 4, log=lambda s: None)
    with pytest.raises(DataError) as info:
        loader.load_state_dict(state)
    message = str(info.value)
    assert "\n" not in message and expected in message and "--accept_new_data=true" in message


def test_accept_new_data_continues_from_the_saved_position(tmp_path):
    """With accept_new_data=True other data loads at the saved position, and the log names the differences."""
    d = _three_shards(tmp_path)
    state = _saved_state(d)
    _add(d)
    lines = []
    loader = TrainLoader(d, T, 2, 4, log=lines.append)
    loader.load_state_dict(state, accept_new_data=True)
    assert loader.state_dict()["position"] == state["position"] == 12
    assert loader.state_dict()["data"] == data_identity(d) != state["data"]
    assert any("added: edufineweb_train_000004.npy" in line for line in lines)
    loader.next_batch()


def test_state_without_data_identity_loads_with_a_note(data):
    """An older checkpoint's state, without "data", loads and the log says the data could not be checked."""
    lines = []
    loader = TrainLoader(data, T, 2, 4, log=lines.append)
    loader.load_state_dict({"position": 8, "seed": 1337, "seq_len": T, "shuffle": True})
    assert loader.step == 4 and "could not be checked" in lines[-1]


class CountingOpen:
    """Stands in for open() in dataloader, adding up the bytes read from each file."""

    def __init__(self):
        self.read = {}

    def __call__(self, path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        read, name = f.read, os.path.basename(path)

        def counting(*a):
            data = read(*a)
            self.read[name] = self.read.get(name, 0) + len(data)
            return data

        f.read = counting
        return f


def test_shards_without_manifest_are_fingerprinted_from_a_sample(tmp_path, monkeypatch):
    """Without manifest.json a 16 MB shard's identity reads a few MiB of it, and a changed byte there shows."""
    d = _shards(tmp_path, np.arange(100), np.arange(1 << 23) % 50000)
    counting = CountingOpen()
    monkeypatch.setattr(dataloader, "open", counting, raising=False)
    before = data_identity(d)
    size = os.path.getsize(os.path.join(d, "edufineweb_train_000001.npy"))
    assert 0 < counting.read["edufineweb_train_000001.npy"] <= 3 << 20 < size // 5
    with open(os.path.join(d, "edufineweb_train_000001.npy"), "r+b") as f:
        f.seek(size - 1000)
        f.write(b"\xff\xff")
    assert dataloader.identity_differences(before, data_identity(d)) == ["changed: edufineweb_train_000001.npy"]


def test_identity_takes_the_manifest_hash_beside_a_sampled_fingerprint(tmp_path, monkeypatch):
    """Shards that manifest.json lists with their size take its sha256, and each is fingerprinted from
    a sample of its own bytes too (a stale manifest cannot vouch for a rewritten file)."""
    d = _shards(tmp_path, np.arange(100), np.arange(1 << 23) % 50000, np.arange(200))
    write_manifest(d, sha256="ab" * 32)
    counting = CountingOpen()
    monkeypatch.setattr(dataloader, "open", counting, raising=False)
    identity = data_identity(d)
    assert counting.read["edufineweb_train_000001.npy"] <= 3 << 20  # of 16 MiB
    assert {s["sha256"] for s in identity["shards"].values()} == {"ab" * 32} and len(identity["shards"]) == 2
    assert all("fingerprint" in s for s in identity["shards"].values())
    assert identity["manifest"] == hashlib.sha256(open(os.path.join(d, "manifest.json"), "rb").read()).hexdigest()


def test_a_shard_rewritten_beside_its_manifest_is_refused(tmp_path):
    """fineweb_edu's manifest records a sampled fingerprint: a shard rewritten in place at the same size
    (another script writing into the directory) is refused in one line naming it, not trusted."""
    d = _three_shards(tmp_path)
    write_manifest(d, max_token=599)
    manifest = json.load(open(os.path.join(d, "manifest.json")))
    for entry in manifest["shards"]:
        entry["fingerprint"] = dataloader.fingerprint(os.path.join(d, entry["file"]))
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    state = _saved_state(d)
    _rebuild(d)
    with pytest.raises(DataError, match=r"edufineweb_train_000002\.npy no longer matches .*manifest\.json") as info:
        TrainLoader(d, T, 2, 4, log=lambda s: None)
    assert "\n" not in str(info.value) and "delete manifest.json" in str(info.value)
    os.remove(os.path.join(d, "manifest.json"))  # the way out it names: then the checkpoint sees the change
    with pytest.raises(DataError, match="changed: edufineweb_train_000002.npy"):
        TrainLoader(d, T, 2, 4, log=lambda s: None).load_state_dict(state)


@pytest.mark.parametrize("stray", ["copy_of_edufineweb_train_000001.npy", "edufineweb_train_1.npy"])
def test_stray_shards_are_refused_naming_them(tmp_path, stray):
    """A copy with another prefix, or one train index twice, beside the real shards: one line naming them."""
    d = _three_shards(tmp_path)
    shutil.copy(os.path.join(d, "edufineweb_train_000001.npy"), os.path.join(d, stray))
    with pytest.raises(DataError) as info:
        TrainLoader(d, T, 2, 4, log=lambda s: None)
    message = str(info.value)
    assert "\n" not in message and stray in message and "edufineweb_train_000001.npy" in message
