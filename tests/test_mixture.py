"""Weighted data mixtures (mixture.py): shares, world-size independence, resume, changed weights,
per-source identity and validation; the one-directory order unchanged."""

import os
from fractions import Fraction

import numpy as np
import pytest
import torch

import metrics as metrics_cli
from llama_fineweb.dataloader import DataError, TrainLoader
from llama_fineweb.mixture import MixtureLoader, MixturePlan, integer_weights, parse_data_mix
from runs import losses, metric_rows, refusal, run_here

T = 8  # windows of 9 tokens
SOURCES = {"edu": (0, 1800), "code": (30000, 700)}  # first token, length: a token tells source and place


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, str]:
    """Two sources whose streams are first, first + 1, ...; each with a val shard."""
    out = {}
    for name, (first, length) in SOURCES.items():
        path = tmp_path_factory.mktemp(name)
        np.save(path / "x_val_000000.npy", np.arange(first, first + 90, dtype=np.uint16))
        np.save(path / "x_train_000001.npy", np.arange(first, first + length // 2, dtype=np.uint16))
        np.save(path / "x_train_000002.npy", np.arange(first + length // 2, first + length, dtype=np.uint16))
        out[name] = str(path)
    return out


def mix(dirs, edu="0.75", code="0.25") -> list[tuple[str, Fraction]]:
    return parse_data_mix(f"{dirs['edu']}:{edu},{dirs['code']}:{code}")


def batches(make, world_size: int, steps: int, state=None, global_batch: int = 8, micro_batch: int = 2):
    """Each global batch's rows, ranks run side by side in one process; and the final state."""
    loaders = [make(micro_batch, global_batch, r, world_size) for r in range(world_size)]
    if state is not None:
        for loader in loaders:
            loader.load_state_dict(state)
    out = []
    for _ in range(steps):
        rows = [loader.next_batch()[0] for _ in range(loaders[0].accum_steps) for loader in loaders]
        out.append(torch.cat(rows))
    return out, loaders[0].state_dict()


def mixture(dirs, **weights):
    return lambda b, g, r, w: MixtureLoader(mix(dirs, **weights), T, b, g, rank=r, world_size=w, log=lambda s: None)


def origin(x: torch.Tensor) -> list[tuple[str, int]]:
    """(source, sequence) of each row, read off its first token."""
    return [("code", (t - 30000) // (T + 1)) if t >= 30000 else ("edu", t // (T + 1)) for t in x[:, 0].tolist()]


@pytest.mark.parametrize("weights", [[Fraction(9, 10), Fraction(1, 10)], [Fraction(1, 2), Fraction(3, 10), Fraction(1, 5)],
                                     [Fraction(1, 3), Fraction(1, 3), Fraction(1, 3)], [Fraction(7), Fraction(0), Fraction(2)]])
def test_shares_stay_within_one_sequence_of_the_weights(weights):
    """Over every prefix each source's count is within one sequence of weight x positions, so over
    any window of steps within two."""
    plan = MixturePlan(integer_weights(weights), 24, 0, [0] * len(weights), [0] * len(weights))
    share = [w / sum(weights) for w in weights]
    counts = np.zeros(len(weights))
    for batch in range(300):
        for n, s in enumerate(plan.batch(batch)[0], start=batch * 24 + 1):
            counts[s] += 1
            assert all(abs(c - float(w) * n) < 1 for c, w in zip(counts, share))


def test_same_global_batches_for_any_world_size(dirs):
    """1, 2 and 4 ranks see the same global batches; each source in its own shuffled order, all of it
    per epoch, the smaller one in more epochs."""
    runs = [batches(mixture(dirs), w, steps=60)[0] for w in (1, 2, 4)]
    assert all(torch.equal(a, b) for other in runs[1:] for a, b in zip(runs[0], other))
    drawn = [o for x in runs[0] for o in origin(x)]
    assert sum(s == "code" for s, _ in drawn) == 120  # a quarter of 480
    for name, (_, length) in SOURCES.items():
        ids = [i for s, i in drawn if s == name]
        per_epoch = length // (T + 1)
        assert sorted(ids[:per_epoch]) == list(range(per_epoch)) and ids[:per_epoch] != sorted(ids[:per_epoch])


def test_resume_equals_straight_run_on_another_world_size(dirs):
    """Saved on 2 ranks after 7 steps, resumed on 4: the straight run's batches."""
    straight, _ = batches(mixture(dirs), 1, steps=20)
    first, state = batches(mixture(dirs), 2, steps=7)
    assert [e["given"] for e in state["mixture"]] == [42, 14] and state["position"] == 56
    rest, _ = batches(mixture(dirs), 4, steps=13, state=state)
    assert all(torch.equal(a, b) for a, b in zip(straight, first + rest))


def test_changed_weights_continue_each_source(dirs):
    """New weights on resume: a warning, the new shares from there, each source's next sequences the
    ones its own order had next."""
    straight, _ = batches(mixture(dirs), 1, steps=30)
    _, state = batches(mixture(dirs), 1, steps=5)
    logged = []
    loader = MixtureLoader(mix(dirs, edu="1", code="1"), T, 8, 8, log=logged.append)
    loader.load_state_dict(state)
    assert any("mixture changed on resume" in line for line in logged)
    after = [o for _ in range(10) for o in origin(loader.next_batch()[0])]
    assert sum(s == "code" for s, _ in after) == 40
    before = [o for x in straight for o in origin(x)]
    for name in SOURCES:
        seen = sum(s == name for s, _ in before[:40])
        assert [i for s, i in after if s == name] == [i for s, i in before if s == name][seen:seen + 40]


def test_batch_at_names_each_sequence_source(dirs):
    """Spike forensics: batch_at(step) rebuilds the micro-batch and names each row's source, shard and offset."""
    loader = mixture(dirs)(2, 8, 1, 2)
    for step in range(6):
        x, y, sources = loader.batch_at(step)
        assert torch.equal(x, loader.next_batch()[0]) and torch.equal(x[:, 1:], y[:, :-1])
        assert all(s["source"].startswith(name) and s["sequence"] == i for s, (name, i) in zip(sources, origin(x)))
        assert all(os.path.basename(s["shard"]).startswith("x_train_") for s in sources)


def test_one_directory_order_is_unchanged(dirs):
    """Without --data_mix the order is today's (each epoch a permutation seeded with seed + epoch);
    a mixture of that one directory draws the very same sequences."""
    path, n = dirs["edu"], 1800 // (T + 1)
    expected = []
    for epoch in range(2):
        order = np.arange(n, dtype=np.uint32)
        np.random.default_rng(1337 + epoch).shuffle(order)
        expected += order.tolist()
    single = [TrainLoader(path, T, 8, 8, log=lambda s: None)]
    got = [i for _ in range(50) for _, i in origin(single[0].next_batch()[0])]
    assert got == expected[:400]
    alone = MixtureLoader(parse_data_mix(f"{path}:1"), T, 8, 8, log=lambda s: None)
    assert [i for _ in range(50) for _, i in origin(alone.next_batch()[0])] == expected[:400]


def test_one_directory_checkpoint_continues_as_source_0(dirs):
    """A one-directory state resumed as a mixture: source 0 goes on in its order, a warning says so;
    the reverse is refused with the --data_mix to use."""
    single = TrainLoader(dirs["edu"], T, 8, 8, log=lambda s: None)
    for _ in range(5):
        single.next_batch()
    state, following = single.state_dict(), origin(single.next_batch()[0])
    loader = MixtureLoader(mix(dirs), T, 8, 8, log=lambda s: None)
    loader.load_state_dict(state)
    edu = [i for s, i in origin(loader.next_batch()[0]) if s == "edu"]
    assert edu == [i for _, i in following][:len(edu)]
    with pytest.raises(DataError, match="resume with --data_mix="):
        TrainLoader(dirs["edu"], T, 8, 8, log=lambda s: None).load_state_dict(loader.state_dict())


def test_each_source_data_is_checked_on_resume(dirs, tmp_path):
    """A source whose shards changed is named; accept_new_data lets it go on."""
    _, state = batches(mixture(dirs), 1, steps=3)
    state["mixture"][1]["data"]["shards"]["x_train_000002.npy"]["bytes"] += 2
    loader = MixtureLoader(mix(dirs), T, 8, 8, log=lambda s: None)
    with pytest.raises(DataError, match="mixture source 1"):
        loader.load_state_dict(state)
    loader.load_state_dict(state, accept_new_data=True)


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory, data_dir) -> str:
    """conftest's random shards and a second directory of other random tokens, 3:1."""
    other = tmp_path_factory.mktemp("other")
    rng = np.random.default_rng(1)
    for i, split in enumerate(["val", "train"]):
        np.save(other / f"edufineweb_{split}_{i:06d}.npy", rng.integers(0, 50257, size=12_000, dtype=np.uint16))
    return f"--data_mix={data_dir}:3,{other}:1"


def test_training_on_a_mixture_logs_each_source_and_resumes_exactly(tmp_path, data_dir, two_sources):
    """train_llama.py on two sources: per-source val loss, tokens and epochs in metrics.jsonl; a
    resumed run's losses are the straight run's, bitwise."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_here(straight, data_dir, two_sources, "--eval_interval=4", "--max_steps=8")
    rows = metric_rows(straight)
    val = next(r for r in rows if "val_loss" in r)
    names = [k for k in val if k.startswith("val_loss/")]
    assert names == [f"val_loss/{os.path.basename(d.split(':')[0])}" for d in two_sources[11:].split(",")]
    assert val["val_loss"] == pytest.approx(0.75 * val[names[0]] + 0.25 * val[names[1]])
    last = [r for r in rows if "loss" in r][-1]
    tokens = sorted(v for k, v in last.items() if k.startswith("tokens/"))
    assert tokens == [16 * 32, 48 * 32] and sum(k.startswith("epoch/") for k in last) == 2
    metrics_cli.main([str(straight)])  # the plot draws each source's val loss, tokens and epochs
    assert (straight / "metrics.png").stat().st_size > 0
    run_here(resumed, data_dir, two_sources, "--eval_interval=4", "--max_steps=8", "--stop_step=3")
    run_here(resumed, data_dir, two_sources, "--eval_interval=4", "--max_steps=8")
    assert losses(resumed) == losses(straight)
    assert refusal(tmp_path / "bad", data_dir, "--data_mix=a:x").startswith("train_llama.py: error: --data_mix entry 'a:x'")


def test_skipped_windows_of_a_mixture_are_kept_and_resumed(dirs):
    """--skip_batches on a mixture: the global batches in a window are never served (the others are
    the straight order's), the windows are in the loader's state, and a state saved at the window's
    start resumes past it with the sources' counts of the straight order."""
    straight, _ = batches(mixture(dirs), 1, steps=8)
    loader = mixture(dirs)(2, 8, 0, 1)
    loader.skip([(2, 4)])
    served = [torch.cat([loader.next_batch()[0] for _ in range(loader.accum_steps)]) for _ in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(served, [straight[i] for i in (0, 1, 4, 5)]))
    assert loader.state_dict()["skip_batches"] == [[2, 4]]
    at_window = mixture(dirs)(2, 8, 0, 1)
    for _ in range(2 * at_window.accum_steps):
        at_window.next_batch()
    state = at_window.state_dict()  # at global batch 2, before the window is known
    state["skip_batches"] = [[2, 4]]
    resumed, _ = batches(mixture(dirs), 1, steps=2, state=state)
    assert all(torch.equal(a, b) for a, b in zip(resumed, straight[4:6]))


def test_seven_decimal_weights_over_five_sources_keep_their_shares():
    """Weights as an optimiser prints them (seven decimals, five sources) stay exact integers: each
    source gets its share, none is starved by an overflowing common denominator."""
    text = "a:0.2815156,b:0.3547779,c:0.1008833,d:0.3918534,e:0.2868089"
    weights = [w for _, w in parse_data_mix(text)]
    plan = MixturePlan(integer_weights(weights), 32, 0, [0] * 5, [0] * 5)
    drawn = [s for batch in range(5) for s in plan.batch(batch)[0]]
    share = [float(w / sum(weights)) for w in weights]
    assert all(abs(drawn.count(s) - share[s] * 160) < 1 for s in range(5))


def test_a_tiny_weight_is_honoured_and_one_directory_by_two_paths_is_refused(dirs, monkeypatch):
    """1e-7 stays positive (two of them are a mixture), and the same directory named by a relative and
    an absolute path is refused as named twice."""
    weights = [w for _, w in parse_data_mix(f"{dirs['edu']}:1e-7,{dirs['code']}:1e-7")]
    assert weights == [Fraction(1, 10**7)] * 2 and integer_weights(weights) == [1, 1]
    assert integer_weights([w for _, w in parse_data_mix("a:1,b:1e-7")]) == [10**7, 1]
    monkeypatch.chdir(os.path.dirname(dirs["edu"]))
    with pytest.raises(DataError, match="names the directory .* twice"):
        parse_data_mix(f"{os.path.basename(dirs['edu'])}:1,{dirs['edu']}:1")


def test_a_batch_256_batches_back_is_still_planned():
    """The plan's cache keeps a batch and its end state together: a look-up KEPT_STATES batches behind
    the newest works."""
    plan = MixturePlan([3, 1], 8, 0, [0, 0], [0, 0])
    fresh = MixturePlan([3, 1], 8, 0, [0, 0], [0, 0])
    plan.batch(300)
    assert plan.batch(300 - 256) == fresh.batch(300 - 256)
