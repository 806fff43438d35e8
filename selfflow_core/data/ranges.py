"""Encoding one store in ranges, over processes on this machine (``encode_store(..., workers=N)``,
``selfflow encode --workers N``) or over the ranks of a ``torchrun`` (``distributed=True``).

The coordinator (the parent process, or rank 0) holds the store's write lock, makes the arrays
once at their full size and cuts the sample axis into **ranges** of ``size`` samples, a multiple
of the chunk size (of a sharded field: its shard size) of every field written in place, so no two
workers ever write one chunk file; with sharded fields a worker writes whole shards (a batch is
held back until its shard is full, or its range ends) and counts a range's progress by them. A
field whose chunks are longer than a range (int64 labels: 65 536 per chunk) is written to a
staging array instead (``_encode/<field>``, one chunk per range) and copied into place at the
end. The progress of range ``k`` is ``_encode/done[k]``, the samples of the range written; it is
a chunk of its own, written by the range's worker after every array holds the batch it counts
(the per-range commit point). A restart skips the ranges done and continues a half-done range
after its last counted batch, with any number of workers.

Only the coordinator writes the group's attributes: the plan (``ranges``) before any worker
starts, then, once it has read that every range is done and copied the staged fields, the final
``committed``/``complete``/``count`` in one write (the completeness marker), after which it
removes ``_encode``. Until then ``committed`` is 0 and the store is refused as incomplete. Layout
and commands: ``docs/store.md`` ("Encoding on N GPUs / processes").
"""

from __future__ import annotations

import math
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any

import numpy as np
import zarr
from tqdm.auto import tqdm

from selfflow_core.data.check import (
    _read_chunk,
    _Stored,
    field_specs,
    nonfinite_problem,
    open_group,
    sample_chunks,
    schema_differences,
    store_name,
    store_schema,
    write_unit,
)
from selfflow_core.data.store import LatentStore, StoreError, StoreLike, open_store
from selfflow_core.data.writer import (
    StoreWriter,
    _delete_chunk,
    _describe_source,
    _Pending,
    check_batch,
    flush_unit,
    reporter,
    writing,
)
from selfflow_core.interfaces import ModalityAdapter

#: the group attribute holding the plan while an encode in ranges runs (removed when complete)
PLAN = "ranges"
#: the subgroup of the per-range progress and the staged fields (removed when complete)
WORK = "_encode"
#: ranges made per worker when a store is planned (more: better balance, more progress chunks)
RANGES_PER_WORKER = 8
#: seconds between two reads of the progress by the coordinator
POLL_S = 0.5
#: how long ranks wait for rank 0 to prepare the store (a verify of a large store takes a while)
DIST_TIMEOUT = timedelta(hours=12)


class Plan:
    """``total`` samples cut into ranges of ``size``; ``staged`` fields go through ``_encode``."""

    def __init__(self, size: int, total: int, staged: Sequence[str]) -> None:
        self.size, self.total, self.staged = int(size), int(total), list(staged)

    @classmethod
    def choose(cls, total: int, chunks: Mapping[str, int], workers: int) -> Plan:
        """Ranges of about ``total / (RANGES_PER_WORKER * workers)`` samples, a multiple of the
        ``chunks`` (each field's file length: its chunk, or its shard) of every field whose
        chunks are no longer than that (always the field with the shortest chunks); the other
        fields are staged."""
        want = max(1, -(-total // (RANGES_PER_WORKER * max(1, workers))))
        fit = max(want, min(chunks.values()))
        base = math.lcm(*(c for c in chunks.values() if c <= fit))
        size = base * max(1, round(want / base))
        return cls(size, total, sorted(f for f, c in chunks.items() if size % c))

    @classmethod
    def of(cls, attrs: Mapping[str, Any]) -> Plan:
        plan = attrs[PLAN]
        return cls(plan["size"], plan["total"], plan["staged"])

    def to_attrs(self) -> dict[str, Any]:
        return {"size": self.size, "total": self.total, "staged": self.staged}

    @property
    def count(self) -> int:
        return -(-self.total // self.size)

    def bounds(self, k: int) -> tuple[int, int]:
        return k * self.size, min(self.total, (k + 1) * self.size)

    @property
    def lengths(self) -> np.ndarray:
        starts = np.arange(self.count, dtype=np.int64) * self.size
        return np.minimum(starts + self.size, self.total) - starts


def _targets(group: zarr.Group, plan: Plan) -> dict[str, zarr.Array]:
    """Where a worker writes each field: its array, or its staging array."""
    return {name: (group[f"{WORK}/{name}"] if name in plan.staged else group[name])
            .with_config({"write_empty_chunks": True}) for name in field_specs(group.attrs)}


def _done(group: zarr.Group) -> zarr.Array:
    return group[f"{WORK}/done"].with_config({"write_empty_chunks": True})


def read_done(group: zarr.Group) -> np.ndarray:
    """Samples written of every range (``_encode/done``)."""
    return np.asarray(_done(group)[:], dtype=np.int64)


def progress_line(group: zarr.Group) -> str | None:
    """The progress of an unfinished encode in ranges in words, or None (there is none)."""
    attrs = dict(group.attrs)
    if attrs.get("complete") or PLAN not in attrs:
        return None
    plan = Plan.of(attrs)
    try:
        done = read_done(group)
    except Exception:  # noqa: BLE001 - the progress array is missing or damaged
        return f"ranges: an encode in {plan.count} ranges, its progress ({WORK}/done) unreadable"
    finished = int((done >= plan.lengths).sum())
    return (f"ranges: {finished} of {plan.count} ranges of {plan.size} samples done, "
            f"{int(done.sum())} of {plan.total} samples (an encode in ranges, interrupted or "
            "running; run it again to resume)")


def prepare(writer: StoreWriter, total: int, workers: int) -> Plan:
    """The plan of the store ``writer`` holds open (not complete): the one recorded, or a new one
    for ``workers`` (arrays grown to ``total``, progress and staging arrays made; the samples an
    interrupted one-process encode committed count as done). The plan is recorded last, so a
    stop in between leaves a one-process store as it was."""
    group, name = writer.group, writer.name
    if writer.ranges is not None:
        plan = Plan.of(group.attrs)
        if plan.total != total:
            raise StoreError(name, [
                f"incomplete: an encode in ranges of {plan.total} samples was started, but the "
                f"source now has {total}; give the original source, or delete {name} and encode "
                "it again"])
        try:
            read_done(group)
        except Exception:  # noqa: BLE001 - missing or damaged: the ranges done are unknown
            raise StoreError(name, [
                f"incomplete: an encode in ranges whose progress ({WORK}/done) is missing or "
                f"unreadable; delete {name} and encode it again"]) from None
        return plan
    plan = Plan.choose(total, {k: write_unit(a) for k, a in writer.arrays.items()}, workers)
    committed = writer.count
    work = group.create_group(WORK, overwrite=True)
    done = work.create_array("done", shape=(plan.count,), dtype="int64", chunks=(1,),
                             fill_value=0, config={"write_empty_chunks": True})
    starts = np.arange(plan.count, dtype=np.int64) * plan.size
    done[:] = np.clip(committed - starts, 0, plan.lengths)
    for field in plan.staged:
        arr = writer.arrays[field]
        staged = work.create_array(field, shape=(total, *arr.shape[1:]), dtype=arr.dtype,
                                   chunks=(plan.size, *arr.shape[1:]),
                                   compressors=arr.compressors,
                                   config={"write_empty_chunks": True})
        if committed:
            staged[:committed] = arr[:committed]
    for arr in writer.arrays.values():
        arr.resize((total, *arr.shape[1:]))
    group.attrs[PLAN] = plan.to_attrs()
    writer.ranges = plan.to_attrs()
    return plan


def check_ranges(writer: StoreWriter, plan: Plan, *, full: bool, repair: bool,
                 fraction: float = 1.0, seed: int = 0) -> list[str]:
    """Read what the ranges done hold before continuing: with ``full``, every chunk of them
    (damaged, missing, NaN/Inf; ``fraction < 1``: of each field's chunks those
    :func:`~selfflow_core.data.check.sample_chunks` draws with ``seed``, and each range's last);
    else only the partly filled chunks the next batch rewrites. A problem is a
    :class:`StoreError` naming the chunk, unless ``repair``: then the chunk's file is deleted and
    its range encoded again. Returns what was done, one line per range."""
    group, name = writer.group, writer.name
    done = read_done(group)
    problems: list[str] = []
    damaged: dict[int, list[tuple[zarr.Array, str, int]]] = {}
    for field, arr in _targets(group, plan).items():
        step, unit, present = arr.chunks[0], write_unit(arr), None
        chosen = sample_chunks(-(-plan.total // step), 1.0 if repair else fraction, seed, field)
        for k in np.flatnonzero(done).tolist():
            start, stop = plan.bounds(k)
            end = start + int(done[k])
            last = (end - 1) // step
            rewrite = (range((end - end % unit) // step, last + 1) if end < stop and end % unit
                       else range(0))
            if full:
                chunks = [c for c in range(start // step, last + 1)
                          if c in chosen or c == last or c in rewrite]
            elif rewrite:
                chunks = list(rewrite)
            else:
                continue
            present = _Stored(arr) if present is None else present
            for c in chunks:
                block, problem = _read_chunk(arr, field, c, end, present, name)
                if problem is None and full:  # (a range starts on a chunk boundary)
                    problem = nonfinite_problem(field, block,
                                                np.arange(c * step, c * step + len(block)))
                if problem:
                    problems.append(problem)
                    damaged.setdefault(k, []).append((arr, field, c))
    if not problems:
        return []
    if not repair:
        raise StoreError(name, [*problems, (
            f"encode the damaged ranges again from the source with `selfflow encode ... "
            f"--repair` (encode_store(..., repair=True)), or delete {name} and encode it again")])
    progress, lines = _done(group), []
    for k, chunks in sorted(damaged.items()):
        for arr, _, c in chunks:
            _delete_chunk(arr, c)  # (of a sharded field: its shard, inside the range)
        progress[k] = 0
        start, stop = plan.bounds(k)
        fields = ", ".join(sorted({f"{field!r} chunk {c}" for _, field, c in chunks}))
        lines.append(f"range {k} (samples {start}..{stop - 1}): {fields} damaged; the range is "
                     "encoded again from the source")
    return lines


def finish(writer: StoreWriter, plan: Plan) -> None:
    """Once every range is done: copy the staged fields into place, then write ``committed``,
    ``complete`` and ``count`` in one write (dropping the plan) and remove ``_encode``."""
    group, name = writer.group, writer.name
    done = read_done(group)
    short = np.flatnonzero(done < plan.lengths).tolist()
    if short:
        listed = ", ".join(map(str, short[:10])) + (" ..." if len(short) > 10 else "")
        raise StoreError(name, [
            f"incomplete: {len(short)} of {plan.count} ranges not done ({listed}; "
            f"{int(done.sum())} of {plan.total} samples encoded); run the encode again to "
            "resume"])
    for field in plan.staged:
        staged, arr = group[f"{WORK}/{field}"], writer.arrays[field]
        step = write_unit(arr)  # whole chunks, or whole shards
        for start in range(0, plan.total, step):
            stop = min(start + step, plan.total)
            arr[start:stop] = staged[start:stop]
    attrs = {k: v for k, v in group.attrs.items() if k != PLAN}
    group.attrs.put({**attrs, "committed": plan.total, "complete": True, "count": plan.total})
    writer.count, writer.ranges = plan.total, None
    cleanup(group)


def cleanup(group: zarr.Group) -> None:
    """Remove ``_encode`` from a complete store (left by a stop right after the marker)."""
    if group.attrs.get("complete") and WORK in set(group.group_keys()):
        del group[WORK]


# -- workers --------------------------------------------------------------------------------------

def encode_share(path: StoreLike, adapter: ModalityAdapter, source: str, share: Sequence[int], *,
                 adapter_config: Mapping[str, Any], batch_size: int,
                 on_batch: Callable[[int], None] | None = None,
                 orphaned: Callable[[], bool] | None = None, who: str = "a worker") -> None:
    """Encode the ranges ``share`` of the store at ``path`` (prepared by the coordinator): each
    from its progress on, batches aligned to multiples of ``batch_size`` as a one-process encode
    cuts them, ``done[k]`` written after every array holds the batch (with sharded fields: held
    back until they fill whole shards, or end the range, then written together)."""
    name = store_name(path)
    raw = adapter.open_source(source)
    group = open_group(path, "r+")
    attrs = dict(group.attrs)
    if PLAN not in attrs:
        raise StoreError(name, [f"{who}: the store has no plan of an encode in ranges"])
    plan = Plan.of(attrs)
    mine = store_schema(adapter, source=source, source_description=raw.description,
                        adapter_config=adapter_config)
    if len(raw) != plan.total or mine["source"] != attrs.get("source"):
        raise StoreError(name, [
            f"{who} opened source {_describe_source(mine['source'])} with {len(raw)} samples, "
            f"but the store is being encoded from {_describe_source(attrs.get('source'))} with "
            f"{plan.total}: give every worker the same source"])
    if mine["config_hash"] != attrs.get("config_hash"):
        raise StoreError(name, [
            f"{who} was given another configuration than the store is being encoded with: "
            f"{'; '.join(schema_differences(attrs, mine))}"])
    specs = field_specs(attrs)
    arrays, progress = _targets(group, plan), _done(group)
    unit = flush_unit(arrays)  # the in-place sharded fields' shards (staging is not sharded)
    for k in share:
        start, stop = plan.bounds(k)
        pos = start + int(progress[k])
        written, pending = pos, _Pending()
        while pos < stop:
            if orphaned is not None and orphaned():
                return  # the coordinator is gone: stop before writing anything more
            end = min(stop, (pos // batch_size + 1) * batch_size)
            data, n = check_batch(name, specs, adapter.encode(raw.read(pos, end)))
            if n != end - pos:
                raise StoreError(name, [f"the encoder gave {n} samples for samples "
                                        f"{pos}..{end - 1} ({end - pos} were read)"])
            pending.add(data, n)
            upto = end if end == stop else end - end % unit
            if upto > written:
                data = pending.take(upto - written)
                for field, arr in arrays.items():
                    arr[written:upto] = data[field].astype(arr.dtype, copy=False)
                progress[k] = upto - start  # the commit point of these batches
                written = upto
            if on_batch is not None:
                on_batch(end - pos)
            pos = end


def _use_device(index: int) -> None:
    """Make GPU ``index`` (modulo the GPUs present) this process's default CUDA device."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(index % torch.cuda.device_count())


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it pickles, else a :class:`RuntimeError` saying what it was."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any exception may fail to pickle
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent dies (best effort)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux, or no prctl: the orphan check still holds
        pass


def _child(errors: Any, index: int, workers: int, path: StoreLike, adapter: ModalityAdapter,
           source: str, share: list[int], adapter_config: Mapping[str, Any],
           batch_size: int) -> None:
    """A ``--workers`` process: its ranges, then exit 0; an error goes to the parent first."""
    parent = os.getppid()
    _die_with_parent()
    try:
        _use_device(index)
        if not os.environ.get("OMP_NUM_THREADS", "").strip():
            import torch

            from selfflow_core.runtime.threads import available_cores

            torch.set_num_threads(max(1, available_cores() // workers))
        encode_share(path, adapter, source, share, adapter_config=adapter_config,
                     batch_size=batch_size, orphaned=lambda: os.getppid() != parent,
                     who=f"worker {index}")
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it
        errors.put((index, _portable(exc)))
        sys.exit(1)


# -- teams: who encodes the ranges ----------------------------------------------------------------

class _Bar:
    """One progress bar over every range, from ``_encode/done`` (read at most once a second)."""

    def __init__(self, group: zarr.Group, plan: Plan, *, enabled: bool, desc: str) -> None:
        self.group, self.plan, self.enabled = group, plan, enabled
        self.seen = int(read_done(group).sum())
        self.bar = tqdm(total=plan.total, initial=self.seen, disable=not enabled, unit="sample",
                        desc=desc)
        self.last = 0.0

    def poll(self, force: bool = False) -> int:
        """Samples done over all ranges (read now when ``force`` or a second has passed)."""
        now = time.monotonic()
        if force or now - self.last >= 1.0:
            self.last = now
            done = int(read_done(self.group).sum())
            self.bar.update(done - self.seen)
            self.seen = done
        return self.seen

    def close(self) -> None:
        self.bar.close()


class _Here:
    """Every range in this process (an encode in ranges continued with one worker)."""

    rank, size = 0, 1

    def announce(self, payload: Any) -> None:
        pass

    def fail(self, exc: BaseException) -> None:
        pass

    def run(self, job: dict[str, Any], shares: list[list[int]], bar: _Bar) -> None:
        encode_share(job["path"], job["adapter"], job["source"], shares[0],
                     adapter_config=job["adapter_config"], batch_size=job["batch_size"],
                     on_batch=lambda n: bar.poll())
        bar.poll(force=True)

    def close(self) -> None:
        pass


class _Processes(_Here):
    """``workers`` spawned processes, one share of the ranges each; this one watches them."""

    def __init__(self, workers: int) -> None:
        self.size = workers

    def run(self, job: dict[str, Any], shares: list[list[int]], bar: _Bar) -> None:
        ctx = multiprocessing.get_context("spawn")
        errors = ctx.SimpleQueue()
        procs: dict[int, Any] = {}
        name = store_name(job["path"])
        try:
            for i, share in enumerate(shares):
                if not share:
                    continue
                p = ctx.Process(target=_child, name=f"selfflow-encode-{i}", args=(
                    errors, i, self.size, job["path"], job["adapter"], job["source"], share,
                    job["adapter_config"], job["batch_size"]))
                try:
                    p.start()
                except (pickle.PicklingError, TypeError, AttributeError) as exc:
                    raise StoreError(name, [
                        f"the adapter cannot be sent to a worker process ({type(exc).__name__}: "
                        f"{exc}); run one process per rank with torchrun instead, where each "
                        "builds its own"]) from None
                procs[i] = p
            while any(p.exitcode is None for p in procs.values()):
                multiprocessing.connection.wait([p.sentinel for p in procs.values()],
                                                timeout=POLL_S)
                bar.poll()
                failed = [(i, p) for i, p in procs.items() if p.exitcode not in (None, 0)]
                if failed:
                    self._raise(errors, failed, bar, name)
            bar.poll(force=True)
        finally:
            for p in procs.values():
                if p.exitcode is None:
                    p.terminate()
            for p in procs.values():
                p.join(5)
                if p.exitcode is None:
                    p.kill()
                    p.join()

    def _raise(self, errors: Any, failed: list[tuple[int, Any]], bar: _Bar, name: str) -> None:
        reported = {}
        while not errors.empty():
            i, exc = errors.get()
            reported[i] = exc
        for i, _ in failed:
            if i in reported:
                exc = reported[i]
                exc.add_note(f"(in encode worker {i} of {self.size}; the other workers were "
                             "stopped, the ranges done are kept: run the encode again to resume)")
                raise exc
        i, p = failed[0]
        code = p.exitcode
        try:
            how = (f"was killed by {signal.Signals(-code).name}" if code < 0
                   else f"exited with status {code}")
        except ValueError:  # a signal without a name here
            how = f"was killed by signal {-code}"
        raise StoreError(name, [
            f"encode worker {i} of {self.size} (pid {p.pid}) {how}; the other workers were "
            f"stopped; {bar.poll(force=True)} of {bar.plan.total} samples are encoded and kept: "
            "run the encode again to resume"])


class _Ranks(_Here):
    """This process is one rank of a ``torchrun``: rank 0 coordinates and encodes a share too.
    A gloo group carries rank 0's outcome of preparing the store (the shares, or its error) to
    every rank; after that, the progress is read from the store itself."""

    def __init__(self) -> None:
        import torch.distributed as dist

        try:
            self.rank, self.size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        except (KeyError, ValueError):
            raise StoreError("(distributed encode)", [
                "distributed=True needs the RANK and WORLD_SIZE a torchrun sets"]) from None
        self.dist, self.created, self.group, self.announced = dist, False, None, False
        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=DIST_TIMEOUT)
            self.created = True
        elif dist.get_backend() != "gloo":
            self.group = dist.new_group(backend="gloo", timeout=DIST_TIMEOUT)
        _use_device(int(os.environ.get("LOCAL_RANK", self.rank)))

    def announce(self, payload: Any) -> None:
        self.announced = True
        self.dist.broadcast_object_list([payload], src=0, group=self.group)

    def fail(self, exc: BaseException) -> None:
        if not self.announced:  # the other ranks wait for rank 0's word: give them the error
            self.announce(("error", _portable(exc)))

    def receive(self) -> Any:
        box: list[Any] = [None]
        self.dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def run(self, job: dict[str, Any], shares: list[list[int]], bar: _Bar) -> None:
        encode_share(job["path"], job["adapter"], job["source"], shares[0],
                     adapter_config=job["adapter_config"], batch_size=job["batch_size"],
                     on_batch=lambda n: bar.poll(), who="rank 0")
        while bar.poll(force=True) < bar.plan.total:  # the others' ranges
            time.sleep(POLL_S)

    def close(self) -> None:
        if self.created:
            self.dist.destroy_process_group()


def _follow(team: _Ranks, path: StoreLike, adapter: ModalityAdapter, source: str, *,
            adapter_config: Mapping[str, Any], batch_size: int) -> LatentStore:
    """A rank other than 0: its share once rank 0 prepared the store, then wait for the marker."""
    kind, payload = team.receive()
    if kind == "error":
        raise payload
    if kind == "encode":
        encode_share(path, adapter, source, payload[team.rank], adapter_config=adapter_config,
                     batch_size=batch_size, who=f"rank {team.rank}")
        while not open_group(path, "r").attrs.get("complete"):  # rank 0 writes it
            time.sleep(POLL_S)
    return open_store(path)


# -- the coordinator ------------------------------------------------------------------------------

def encode_ranges(writer: StoreWriter, team: _Here, job: dict[str, Any], *, total: int,
                  verify: bool, repair: bool, progress: bool,
                  say: Callable[[str], None], fraction: float = 1.0, seed: int = 0) -> None:
    """Plan (or continue) the store's ranges, check the ranges done (a sampled ``fraction`` of
    their chunks with ``verify``), hand the remaining ones out round-robin, have ``team``
    encode them, then :func:`finish`."""
    plan = prepare(writer, total, team.size)
    for line in check_ranges(writer, plan, full=verify or repair, repair=repair,
                             fraction=fraction, seed=seed):
        say(line)
    done = read_done(writer.group)
    remaining = np.flatnonzero(done < plan.lengths).tolist()
    shares = [remaining[i::team.size] for i in range(team.size)]
    team.announce(("encode", shares))
    bar = _Bar(writer.group, plan, enabled=progress, desc=(
        f"encode {job['source']} -> {writer.name} ({team.size} "
        f"{'rank' if isinstance(team, _Ranks) else 'worker'}{'s' * (team.size > 1)})"))
    try:
        team.run(job, shares, bar)
    finally:
        bar.close()
    finish(writer, plan)


def encode_parallel(adapter: ModalityAdapter, source: str, path: StoreLike, *,
                    adapter_config: Mapping[str, Any], batch_size: int, progress: bool,
                    chunks: int | Mapping[str, int] | None, compressor: str, verify: bool,
                    repair: bool, workers: int, distributed: bool, shards: Any = "auto",
                    verify_fraction: float = 1.0, verify_seed: int = 0) -> LatentStore:
    """:func:`~selfflow_core.data.writer.encode_store` with ``workers`` processes or as one rank
    of a ``torchrun`` (``distributed``): see the module's docstring."""
    name = store_name(path)
    if not isinstance(path, str | os.PathLike) or os.fspath(path).startswith("memory://"):
        raise StoreError(name, ["an encode over several processes needs a path or URL that "
                                "every process opens (not an in-memory store)"])
    team: _Here = _Ranks() if distributed else _Processes(workers)
    try:
        if team.rank != 0:
            return _follow(team, path, adapter, source,  # type: ignore[arg-type]
                           adapter_config=adapter_config, batch_size=batch_size)
        return _coordinate(team, adapter, source, path, adapter_config=adapter_config,
                           batch_size=batch_size, progress=progress, chunks=chunks,
                           shards=shards, compressor=compressor, verify=verify,
                           verify_fraction=verify_fraction, verify_seed=verify_seed,
                           repair=repair)
    finally:
        team.close()


def _coordinate(team: _Here, adapter: ModalityAdapter, source: str, path: StoreLike, *,
                adapter_config: Mapping[str, Any], batch_size: int, progress: bool,
                chunks: int | Mapping[str, int] | None, compressor: str, verify: bool,
                repair: bool, shards: Any = "auto", verify_fraction: float = 1.0,
                verify_seed: int = 0) -> LatentStore:
    name, say = store_name(path), reporter(path, progress)
    try:
        raw = adapter.open_source(source)
        schema = store_schema(adapter, source=source, source_description=raw.description,
                              adapter_config=adapter_config)
        with writing(adapter, raw, path, schema, batch_size=batch_size, chunks=chunks,
                     shards=shards, compressor=compressor, repair=repair, verify=verify,
                     fraction=verify_fraction, seed=verify_seed, say=say) as (writer, verified):
            if writer.complete:
                cleanup(writer.group)
                team.announce(("complete", None))
            else:
                if writer.count > len(raw):
                    raise StoreError(name, [f"holds {writer.count} samples, the source only "
                                            f"{len(raw)}"])
                job = {"path": path, "adapter": adapter, "source": source,
                       "adapter_config": dict(adapter_config), "batch_size": batch_size}
                encode_ranges(writer, team, job, total=len(raw), verify=verify, repair=repair,
                              progress=progress, say=say, fraction=verify_fraction,
                              seed=verify_seed)
    except BaseException as exc:
        team.fail(exc)
        raise
    store = open_store(path)
    store.verified_fraction = verified
    return store
