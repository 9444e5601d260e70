import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dataloader  # noqa: E402
from dataloader import DataError, TrainLoader, val_batches  # noqa: E402

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
    assert state == {"position": 40, "seed": 1337, "seq_len": T, "shuffle": True}
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


def _token_too_big(tmp_path):
    return _shards(tmp_path, np.arange(100), np.r_[np.arange(100), 50300, 0]), "50300"


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
    _shards(tmp_path, np.r_[np.arange(100), 60000])
    with pytest.raises(DataError, match="edufineweb_val_000000.npy holds token id 60000"):
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
    monkeypatch.setattr(dataloader, "CHECK_CHUNK", 1 << 20)
    loader = TrainLoader(d, 1023, 64, 64, shuffle=False, vocab_size=50257, log=lambda s: None)
    loader.next_batch()  # allocations that stay for the loader's life, before the measurement
    before = rss_mb()
    for _ in range(2 * length // (64 * 1024) - 2):
        loader.next_batch()  # the second shard's vocabulary check, a full read, happens in here
    assert rss_mb() - before < 24, "64 MB of shards were read; far less may stay resident"
