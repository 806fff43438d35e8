"""The block-shuffle reader (``ShuffleConfig(kind="block")``, stores larger than RAM): coverage
per epoch and rank, exact resume, determinism, contiguous reads of one window at a time, and how
well it mixes against the full shuffle and a sequential read."""

from __future__ import annotations

import collections
import io
import json
import threading

import attrs
import numpy as np
import pytest
import torch
from zarr.storage import MemoryStore

from selfflow_core.builtin.dit import DiT
from selfflow_core.builtin.presets import toy
from selfflow_core.builtin.trackers import NullTracker
from selfflow_core.config.converter import make_converter, structure, to_data
from selfflow_core.config.run import CheckpointConfig, TrainerConfig
from selfflow_core.config.validate import ADDED_KEYS, config_drift
from selfflow_core.data import block_reader
from selfflow_core.data.blocks import BlockPlan, ShuffleConfig
from selfflow_core.data.loader import LoaderSource, _Shards, block_samples, build_loader
from selfflow_core.data.store import StoreError, open_store
from selfflow_core.data.writer import StoreWriter
from selfflow_core.errors import ConfigError
from selfflow_core.plugins.hookspecs import hookimpl
from selfflow_core.plugins.manager import Components, make_plugin_manager
from selfflow_core.testing import TINY_TOY
from selfflow_core.trainer import Trainer
from selfflow_core.types import TokenBatch

N = 1003           # samples: 63 blocks of 16 (the last one of 11)
CHUNK = 8          # samples per chunk of ``x``, the field with the largest samples
SMALL = ShuffleConfig(kind="block", block_chunks=2, window_blocks=5)  # blocks of 16, windows of 80


def index_store(n: int = N, *, chunk: int = CHUNK, nan_at: int | None = None):
    """A store whose ``index`` holds each sample's index and ``x`` (3 floats, the largest
    samples, chunked by ``chunk``) the index three times; ``index`` has chunks 8x larger."""
    schema = {"format_version": 1, "modality": "test", "config_hash": "test",
              "fields": {"index": {"shape": [], "dtype": "int64"},
                         "x": {"shape": [3], "dtype": "float32"}}}
    memory = MemoryStore()
    x = np.repeat(np.arange(n, dtype=np.float32)[:, None], 3, 1)
    if nan_at is not None:
        x[nan_at, 1] = np.nan
    with StoreWriter(memory, schema, chunks={"x": chunk, "index": 8 * chunk}) as w:
        w.append({"index": np.arange(n), "x": x})
        w.finish()
    return open_store(memory)


def tokenize(fields: dict[str, torch.Tensor]) -> TokenBatch:
    index = fields["index"]
    assert torch.equal(fields["x"][:, 0].long(), index)  # the fields of a sample stay together
    return TokenBatch.single(fields["x"][:, None, :], torch.zeros(len(index), 1, 1), labels=index)


def loader(store, batch_size: int = 10, shuffle: ShuffleConfig | None = SMALL, **kw):
    return build_loader([LoaderSource(store=store, tokenize=tokenize, batch_size=batch_size)],
                        shuffle=shuffle, **{"seed": 3, **kw})


def samples(it, count: int) -> list[int]:
    """The next ``count`` sample indices from the batch iterator ``it`` (whole batches)."""
    out: list[int] = []
    while len(out) < count:
        out += next(it)[1].labels.tolist()
    return out


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_sample_once_per_epoch_and_ranks_disjoint(world_size):
    store = index_store()
    per_rank = N // world_size
    epochs = [[], []]
    for rank in range(world_size):
        it = iter(loader(store, rank=rank, world_size=world_size))
        seen = samples(it, 2 * per_rank)
        for e in range(2):
            part = seen[e * per_rank:(e + 1) * per_rank]
            assert len(set(part)) == per_rank  # no sample twice in an epoch of a rank
            epochs[e].append(part)
    for parts in epochs:
        union = set().union(*map(set, parts))
        assert sum(map(len, parts)) == len(union) == N - N % world_size  # disjoint; leftovers
        assert union <= set(range(N))
    assert epochs[0] != epochs[1]  # a new order every epoch
    if world_size == 3:  # the leftover samples differ between epochs
        assert set(range(N)) - set().union(*epochs[0]) != set(range(N)) - set().union(*epochs[1])


@pytest.mark.parametrize("stop", [3, 7, 130])  # in the first window; at its end; in epoch 2
@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_is_exact(stop, world_size):
    store = index_store()
    for rank in range(world_size):
        def make(rank=rank):
            return loader(store, rank=rank, world_size=world_size, num_workers=2, prefetch=3)
        full = [b for _, b in zip(range(150), make())]
        first = make()
        head = [b for _, b in zip(range(stop), first)]
        state = first.state_dict()
        assert state["step"] == stop and state["shuffle"]["kind"] == "block"
        buffer = io.BytesIO()
        torch.save(json.loads(json.dumps(state)), buffer)  # plain data
        buffer.seek(0)
        resumed = make()
        resumed.load_state_dict(torch.load(buffer, weights_only=True))
        tail = [b for _, b in zip(range(150 - stop), resumed)]
        for a, b in zip(full, head + tail, strict=True):  # bit for bit
            assert torch.equal(a[1].tokens, b[1].tokens) and torch.equal(a[1].labels,
                                                                         b[1].labels)


def test_deterministic_per_seed_epoch_and_rank():
    store = index_store()
    one = samples(iter(loader(store)), 2 * N)
    assert one == samples(iter(loader(store, num_workers=2)), 2 * N)
    assert one != samples(iter(loader(store, seed=4)), 2 * N)
    assert one[:N] != one[N:2 * N] and one[:N] != list(range(N))
    ranks = [samples(iter(loader(store, rank=r, world_size=2)), 501) for r in range(2)]
    assert ranks[0] != ranks[1]


def test_a_window_is_whole_blocks_read_once_and_held_alone():
    store = index_store()
    assert store.cached  # small enough for the RAM cache, which the block shuffle leaves alone
    block = block_samples(store, SMALL.block_chunks)
    assert block == 2 * CHUNK  # chunks of x (the largest samples), not of index (64)
    built = loader(store, num_workers=0, prefetch=0)
    reader = built.sources[0].store
    seen = np.array(samples(iter(built), 1000))  # 100 batches of epoch 0 (1003 samples)
    window_starts = built.shards[0].pieces(0)[2]
    for lo, hi in zip(window_starts[:-2], window_starts[1:-1]):  # every whole window but the last
        blocks = np.unique(seen[lo:hi] // block)
        assert len(blocks) == SMALL.window_blocks  # window_blocks whole blocks
        held = np.concatenate([np.arange(b * block, min((b + 1) * block, N)) for b in blocks])
        assert sorted(seen[lo:hi]) == held.tolist()
    assert reader.blocks_read == -(-N // block)  # each block read once (one slice per field)
    # the window's blocks, and those of the next that a batch spanning both touches
    assert reader.most_held <= SMALL.window_blocks + min(10, SMALL.window_blocks)
    assert store._memory is None  # the store's RAM cache was never loaded


def test_reader_gathers_like_the_store_with_text_and_repeats():
    schema = {"format_version": 1, "modality": "test", "config_hash": "test",
              "fields": {"x": {"shape": [200], "dtype": "float16"},  # 400 bytes a sample
                         "captions": {"shape": [2], "dtype": "str"}}}  # 2 x 128 bytes
    memory = MemoryStore()
    n = 300
    with StoreWriter(memory, schema, chunks={"x": 8, "captions": 128}) as w:
        w.append({"x": np.arange(200 * n, dtype=np.float16).reshape(n, 200),
                  "captions": np.array([[f"s{i}", "x" * (i % 5)] for i in range(n)])})
        w.finish()
    store = open_store(memory)
    reader = loader(store, shuffle=attrs.evolve(SMALL, window_blocks=3)).sources[0].store
    assert reader.block == 16  # chunks of x; a captions chunk holds 8 blocks
    rng = np.random.default_rng(0)
    for size in (1, 7, 40, 300, 0):  # more blocks than held at once, repeats, nothing
        idx = rng.integers(0, n, size)
        got, want = reader.read(idx), store.read(idx)
        assert got.keys() == want.keys()
        for k in want:
            assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
            assert (got[k] == want[k]).all(), k
    with pytest.raises(IndexError, match="out of range"):
        reader.read([n])


def local_store(path, compressor: str = "none", *, nonfinite: dict[str, int] | None = None,
                shards: dict[str, int] | None = None):
    """``index_store``'s fields plus ``y`` (float16, chunks of 6: not a divisor of a block), on
    disk, so that its chunk files may be read straight; ``nonfinite``: a NaN in that field at
    that sample."""
    schema = {"format_version": 1, "modality": "test", "config_hash": "test",
              "fields": {"index": {"shape": [], "dtype": "int64"},
                         "x": {"shape": [3], "dtype": "float32"},
                         "y": {"shape": [2], "dtype": "float16"}}}
    fields = {"index": np.arange(N), "x": np.repeat(np.arange(N, dtype=np.float32)[:, None], 3, 1),
              "y": np.stack([np.arange(N) % 100, -np.arange(N) % 50], 1).astype(np.float16)}
    for name, at in (nonfinite or {}).items():
        fields[name][at, 1] = np.nan
    with StoreWriter(path, schema, chunks={"x": CHUNK, "index": 64, "y": 6},
                     compressor=compressor, shards=shards) as w:
        w.append(fields)
        w.finish()
    return open_store(path, cache_bytes=0)


def test_local_chunk_files_read_as_zarr_reads_them(tmp_path):
    store = local_store(tmp_path / "s.zarr")
    reader = loader(store).sources[0].store
    assert set(reader._files) == {"index", "x", "y"}  # read straight from their files
    assert set(loader(local_store(tmp_path / "z.zarr", "zstd")).sources[0].store._files) == set()
    rng = np.random.default_rng(1)
    for size in (5, 64, 300, N):
        idx = rng.integers(0, N, size)
        got, want = reader.read(idx), store.read(idx)
        for k in want:
            assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), k
    # the whole loader, on files and through zarr (the same store in memory), gives the same
    assert samples(iter(loader(store)), 2 * N) == samples(iter(loader(index_store())), 2 * N)


def test_a_damaged_chunk_file_is_named(tmp_path):
    store = local_store(tmp_path / "s.zarr")
    chunk = tmp_path / "s.zarr" / "x" / "c" / "5" / "0"
    data = bytearray(chunk.read_bytes())
    data[3] ^= 0xFF
    chunk.write_bytes(bytes(data))
    reader = loader(store).sources[0].store
    assert np.array_equal(reader.read([3])["x"], store.read([3])["x"])  # others still read
    with pytest.raises(StoreError, match=r"field 'x': chunk 5 \(samples 40\.\.47\)"):
        reader.read([41])
    chunk.write_bytes(bytes(data[:-9]))  # truncated
    with pytest.raises(StoreError, match=r"field 'x': chunk 5"):
        reader.read([41])
    chunk.unlink()  # missing: read through zarr, as the store reads it (fill values)
    assert np.array_equal(reader.read([41, 3])["x"], store.read([41, 3])["x"])


@pytest.mark.parametrize("shards", [None, {"x": 4 * CHUNK}])
def test_chunk_files_read_into_page_aligned_arrays(tmp_path, shards):
    store = local_store(tmp_path / "s.zarr", shards=shards)
    reader = loader(store).sources[0].store
    assert reader._files["x"].per_shard == (4 if shards else 1)
    idx = np.random.default_rng(2).permutation(N)  # all 63 blocks in one call
    got, want = reader.read(idx), store.read(idx)
    for k in want:
        assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), k
    # the kernel copies a file read into a page-aligned array about twice as fast
    assert all(slab.ctypes.data % 4096 == 0 for slab in reader._slab.values())


def test_calls_on_several_threads_gather_what_the_store_holds(tmp_path):
    store = local_store(tmp_path / "s.zarr")
    reader = loader(store, shuffle=attrs.evolve(SMALL, window_blocks=2)).sources[0].store
    y, wrong = store.read(np.arange(N))["y"], []

    def reads(seed: int) -> None:  # random batches: blocks dropped, refilled, the slots grown
        rng = np.random.default_rng(seed)
        for _ in range(60):
            idx = rng.integers(0, N, int(rng.integers(1, 60)))
            got = reader.read(idx)
            right = ((got["index"] == idx) & (got["x"] == idx[:, None]).all(1)
                     & (got["y"] == y[idx]).all(1))
            wrong.extend(idx[~right].tolist())

    threads = [threading.Thread(target=reads, args=(seed,)) for seed in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong and reader.blocks_read > -(-N // reader.block)


def test_nonfinite_in_chunk_files_named_for_every_sample(tmp_path):
    store = local_store(tmp_path / "s.zarr", nonfinite={"x": 100, "y": 700})
    reader = loader(store).sources[0].store
    assert set(reader._files) == {"index", "x", "y"}
    assert np.array_equal(reader.read([3, 900])["x"], store.read([3, 900])["x"])
    with pytest.raises(StoreError, match=r"field 'y': NaN/Inf at sample index 700") as raised:
        reader.read([701])
    assert "'x'" not in str(raised.value)
    # one read of blocks holding both: every field's bad samples named, not the first block's
    with pytest.raises(StoreError, match=r"field 'x': NaN/Inf at sample index 100 .*\n"
                       r".*field 'y': NaN/Inf at sample index 700"):
        reader.read(np.arange(N))


def test_a_chunk_of_several_blocks_read_once(tmp_path, monkeypatch):
    reads, read = collections.Counter(), block_reader.ChunkFiles._read

    def counted(self, k, out):
        reads[self.arr.basename, k] += 1
        return read(self, k, out)

    monkeypatch.setattr(block_reader.ChunkFiles, "_read", counted)
    reader = loader(local_store(tmp_path / "s.zarr")).sources[0].store
    for i in range(4):  # the 4 blocks of index chunk 0 (64 samples), one call each
        reader.read([16 * i])
    assert reads["index", 0] == 1 and reads["x", 0] == 1 and reads["x", 7] == 1


def test_loader_batches_are_the_plan():
    store = index_store()
    built = loader(store, batch_size=7, rank=1, world_size=2)
    plan = BlockPlan(N, 7, 16, SMALL.window_blocks, 0, 3, 1, 2)
    got = [b.labels.tolist() for _, (_, b) in zip(range(80), built)]
    assert got == [plan.batch(k).tolist() for k in range(80)]


def test_other_shuffle_state_refused_and_old_state_fits_full():
    store = index_store()
    full, block = loader(store, shuffle=None), loader(store)
    with pytest.raises(ValueError, match="shuffle"):
        block.load_state_dict(full.state_dict())
    with pytest.raises(ValueError, match="shuffle"):
        loader(store, shuffle=attrs.evolve(SMALL, window_blocks=6)).load_state_dict(
            block.state_dict())
    old = {k: v for k, v in full.state_dict().items() if k != "shuffle"}  # saved before blocks
    loader(store, shuffle=None).load_state_dict(old)


def test_nonfinite_value_named():
    it = iter(loader(index_store(nan_at=500), num_workers=0, prefetch=0))
    with pytest.raises(StoreError, match=r"field 'x': NaN/Inf at sample index 500"):
        samples(it, 2 * N)


def batch_mean_autocorrelation(order: np.ndarray, batch: int, classes: int) -> float:
    """Lag-1 autocorrelation of the mean label of consecutive batches, on a store sorted by
    label (``classes`` equal runs): 0 for independent batches, 1 when each batch resembles
    the one before."""
    labels = order * classes // len(np.unique(order))
    means = labels[: len(labels) // batch * batch].reshape(-1, batch).mean(1)
    means = means - means.mean()
    return float((means[1:] * means[:-1]).sum() / (means * means).sum())


def test_block_shuffle_mixes_between_full_and_sequential():
    """Default settings, on the sample order alone (a million-sample store is not needed to
    know which samples the loader reads: ``test_loader_batches_are_the_plan``): 16 windows per
    epoch of 256 blocks of one 64-sample chunk (the default chunk of 8 KiB latents)."""
    config, batch, classes, chunk = ShuffleConfig(kind="block"), 64, 10, 64
    blocks = 16 * config.window_blocks
    n, epochs = blocks * chunk, 2
    steps = epochs * n // batch
    block = BlockPlan(n, batch, config.block_chunks * chunk, config.window_blocks, 0, 0, 0, 1)
    full = _Shards(n, batch, 0, 0, 0, 1)
    rho = {name: batch_mean_autocorrelation(
        np.concatenate([plan.batch(k) for k in range(steps)]), batch, classes)
        for name, plan in (("block", block), ("full", full))}
    rho["sequential"] = batch_mean_autocorrelation(np.tile(np.arange(n), epochs), batch, classes)
    # a batch mean = its window's mean (window_blocks blocks, each nearly of one label, drawn
    # from all blocks without replacement) + the batch's own draw from the window: consecutive
    # batches share the first part
    w, b = config.window_blocks, batch
    shared, own = (1 - (w - 1) / (blocks - 1)) / w, (1 - b / (w * chunk)) / b
    predicted = shared / (shared + own)
    noise = 4 / np.sqrt(steps)  # ~4 standard errors of a lag-1 autocorrelation estimate
    assert abs(rho["full"]) < noise
    assert rho["sequential"] > 1 - noise
    assert rho["full"] + noise < rho["block"]        # worse than the full shuffle ...
    assert abs(rho["block"] - predicted) < noise     # ... by what the window size predicts
    assert rho["block"] < rho["sequential"] / 4      # ... and far better than sequential


# -- the trainer ---------------------------------------------------------------------------------

def test_config_default_is_the_full_shuffle_and_old_checkpoints_fit():
    conv = make_converter(Components(make_plugin_manager([], entry_points=False)))
    config = toy()
    assert config.shuffle == ShuffleConfig(kind="full")
    data = to_data(conv, config)
    assert data["shuffle"] == ADDED_KEYS["shuffle"]  # what a checkpoint before it had
    assert config_drift({k: v for k, v in data.items() if k != "shuffle"}, data) == []
    block = attrs.evolve(config, shuffle=ShuffleConfig(kind="block", window_blocks=8))
    assert config_drift(data, to_data(conv, block)) == ["shuffle"]
    assert structure(conv, to_data(conv, block), TrainerConfig) == block
    with pytest.raises(ConfigError, match=r"\$\.shuffle\.kind: must be one of 'full', 'block'"):
        structure(conv, {**data, "shuffle": {"kind": "blocks"}}, TrainerConfig)


def tiny(run_dir, store, steps: int) -> TrainerConfig:
    base = toy()
    spec = attrs.evolve(base.modalities["toy"], modality=TINY_TOY, store=store, source="",
                        batch_size=8)
    return attrs.evolve(
        base, modalities={"toy": spec}, backbone=DiT.Config(depth=3, width=32, heads=4),
        checkpoint=CheckpointConfig(every=100, keep=2), eval_ema_decay=None,
        sampling=attrs.evolve(base.sampling, count=4, steps=2), tracker=NullTracker.Config(),
        steps=steps, run_dir=str(run_dir), log_every=1,
        shuffle=ShuffleConfig(kind="block", window_blocks=4))


class Starts:
    """Records the step each ``fit`` starts from."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    @hookimpl
    def selfflow_on_train_start(self, trainer):
        self.steps.append(trainer.step)


@pytest.mark.usefixtures("one_thread")
def test_trainer_resumes_a_block_shuffled_run_exactly(tmp_path, toy_store):
    starts = Starts()

    def run(name: str, steps: int) -> Trainer:
        tr = Trainer(tiny(tmp_path / name, toy_store, steps),
                     components=Components(make_plugin_manager([starts], entry_points=False)),
                     progress=False)
        tr.fit()
        return tr

    straight = run("a", 6)
    run("b", 4)
    resumed = run("b", 6)  # continues from b's checkpoint at step 4
    assert starts.steps == [0, 0, 4]
    assert resumed.losses == straight.losses
    assert resumed.loader.state_dict() == straight.loader.state_dict()
    assert straight.loader.state_dict()["shuffle"]["kind"] == "block"
