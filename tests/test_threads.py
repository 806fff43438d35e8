"""``TrainerConfig.threads`` (torch's intra-op threads of a CPU run) and the oversubscription
field of the progress line. Tiny toy runs; no wall-clock is asserted."""

from __future__ import annotations

import os

import attrs
import pytest
import torch

from selfflow_core import CheckpointConfig, DiT, NullTracker, Trainer, TrainerConfig
from selfflow_core.builtin.presets import toy
from selfflow_core.config.converter import ConfigError, make_converter, structure, to_data
from selfflow_core.config.validate import RESUMABLE_CHANGES, config_drift
from selfflow_core.plugins.hookspecs import hookimpl
from selfflow_core.plugins.manager import Components, make_plugin_manager
from selfflow_core.runtime import progress, threads
from selfflow_core.runtime.progress import Progress
from selfflow_core.runtime.threads import apply_threads, default_threads, resolve_threads
from selfflow_core.testing import TINY_TOY as TOY  # the modality of the kit's `toy_store`

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(run_dir, store, **changes) -> TrainerConfig:
    base = toy()
    spec = attrs.evolve(base.modalities["toy"], modality=TOY, store=store, source="",
                        batch_size=8)
    config = attrs.evolve(base, modalities={"toy": spec},
                          backbone=DiT.Config(depth=3, width=16, heads=4),
                          checkpoint=CheckpointConfig(every=2), tracker=NullTracker.Config(),
                          sampling=attrs.evolve(base.sampling, count=2, steps=1),
                          steps=2, log_every=1, run_dir=str(run_dir), device="cpu")
    return attrs.evolve(config, **changes)


class ThreadsSeen:
    """Records torch's thread count at every step of a run."""

    def __init__(self) -> None:
        self.counts: list[int] = []

    @hookimpl
    def selfflow_on_step_end(self, trainer, step, terms):
        self.counts.append(torch.get_num_threads())


def components(*plugins) -> Components:
    return Components(make_plugin_manager(list(plugins), entry_points=False))


# -- the setting is applied ---------------------------------------------------------------------

def test_threads_is_applied_for_the_run(tmp_path, toy_store):
    seen = ThreadsSeen()
    trainer = Trainer(tiny(tmp_path / "run", toy_store, threads=2), components=components(seen),
                      progress=False)
    assert trainer.threads == 2
    trainer.fit()
    assert seen.counts == [2, 2]


def test_threads_may_change_on_resume(tmp_path, toy_store):
    assert "threads" in RESUMABLE_CHANGES
    assert config_drift({"threads": None}, {"threads": 2}) == []
    Trainer(tiny(tmp_path / "run", toy_store, threads=1), components=components(),
            progress=False).fit()
    seen = ThreadsSeen()
    resumed = Trainer(tiny(tmp_path / "run", toy_store, threads=2, steps=3),
                      components=components(seen), progress=False)
    assert resumed.fit()["step"] == 3
    assert seen.counts == [2]


def test_none_never_raises_the_count_and_a_gpu_run_changes_nothing(tmp_path, toy_store):
    # the `one_thread` fixture pinned torch to 1: the default keeps it
    trainer = Trainer(tiny(tmp_path / "run", toy_store), components=components(), progress=False)
    assert trainer.threads == 1 and torch.get_num_threads() == 1
    assert apply_threads(2, torch.device("cuda")) is None  # no CUDA needed: nothing is touched
    assert apply_threads(None, torch.device("meta")) is None
    assert torch.get_num_threads() == 1


# -- the default ---------------------------------------------------------------------------------

@pytest.mark.parametrize("cores, processes, current, expected", [
    (2, 1, 2, 1),     # a 2-core machine: one thread (benchmarks/RESULTS.md, "CPU threads")
    (1, 1, 1, 1),     # at least one
    (16, 1, 16, 8),   # half the cores
    (16, 4, 16, 2),   # shared among torchrun's local processes
    (3, 4, 3, 1),     # more processes than cores
    (16, 1, 1, 1),    # never more than torch is set to already
])
def test_default_threads(cores, processes, current, expected):
    assert default_threads(cores=cores, processes=processes, current=current) == expected


def test_none_resolves_from_the_cores_this_process_may_use(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert threads.available_cores() == 8
    with monkeypatch.context() as m:
        m.setattr(torch, "get_num_threads", lambda: 64)
        assert resolve_threads(None) == 4
        m.setenv("LOCAL_WORLD_SIZE", "2")
        assert resolve_threads(None) == 2
        m.setenv("OMP_NUM_THREADS", "3")  # the caller chose: torch's count as it is
        assert resolve_threads(None) == 64
        assert resolve_threads(5) == 5  # a set value wins
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # macOS, Windows
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert threads.available_cores() == 6


# -- validation ----------------------------------------------------------------------------------

def test_threads_must_be_at_least_one(toy_store):
    config = tiny("run", toy_store)
    with pytest.raises(ValueError, match="threads"):
        attrs.evolve(config, threads=0)
    conv = make_converter(Components(make_plugin_manager(entry_points=False)))
    data = to_data(conv, config)
    assert structure(conv, {**data, "threads": 3}, TrainerConfig).threads == 3
    with pytest.raises(ConfigError) as e:
        structure(conv, {**data, "threads": 0}, TrainerConfig)
    assert any(p.startswith("$.threads") for p in e.value.problems), e.value.problems
    assert structure(conv, data, TrainerConfig) == config  # None round-trips


# -- oversubscription ----------------------------------------------------------------------------

def lines(capsys) -> list[str]:
    return capsys.readouterr().out.splitlines()


def test_an_oversubscribed_machine_is_said_once_and_on_every_log_line(monkeypatch, capsys):
    monkeypatch.setattr(progress.os, "getloadavg", lambda: (5.0, 4.0, 3.0))
    monkeypatch.setattr(progress, "available_cores", lambda: 2)
    assert progress.oversubscription() == (5.0, 2)
    bar = Progress(4, 0, enabled=True, every=2)
    assert bar.bar is None  # pytest captures stderr: the plain lines
    for step in range(1, 5):
        bar.update(step, {"loss": 0.5} if step % 2 == 0 else None)
    out = lines(capsys)
    messages = [line for line in out if "oversubscribed:" in line]
    steps = [line for line in out if line.startswith("step=")]
    assert len(messages) == 1 and "load average 5.0" in messages[0]
    assert "2 core(s)" in messages[0] and "threads=1" not in messages[0]  # already one thread
    assert len(steps) == 2
    assert all(line.endswith("load=5.0 cores=2 (oversubscribed)") for line in steps), steps


def test_the_message_advises_one_thread_when_torch_uses_more(monkeypatch, capsys):
    monkeypatch.setattr(progress.os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    monkeypatch.setattr(progress, "available_cores", lambda: 4)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    Progress(1, 0, enabled=True, every=1).update(1, {"loss": 1.0})
    message = next(line for line in lines(capsys) if "oversubscribed:" in line)
    assert "here 4" in message and "`threads=1`" in message


@pytest.mark.parametrize("loadavg", [lambda: (2.0, 0.0, 0.0), lambda: (0.3, 0.0, 0.0), None])
def test_no_load_field_when_the_machine_keeps_up(monkeypatch, capsys, loadavg):
    if loadavg is None:  # no load average on this OS
        def loadavg():
            raise OSError("no load average")
    monkeypatch.setattr(progress.os, "getloadavg", loadavg)
    monkeypatch.setattr(progress, "available_cores", lambda: 2)
    assert progress.oversubscription() is None
    Progress(2, 0, enabled=True, every=1).update(1, {"loss": 1.0})
    out = lines(capsys)
    assert len(out) == 1 and "load=" not in out[0] and "oversubscribed" not in out[0]


def test_the_terminal_bar_shows_the_load(monkeypatch):
    monkeypatch.setattr(progress.os, "getloadavg", lambda: (3.5, 0.0, 0.0))
    monkeypatch.setattr(progress, "available_cores", lambda: 1)

    class Bar:  # stands in for the tqdm bar of a terminal
        def __init__(self):
            self.n, self.written, self.postfix = 0, [], {}

        def update(self, n):
            self.n += n

        def set_postfix(self, postfix, refresh):
            self.postfix = postfix

        def write(self, text):
            self.written.append(text)

    bar = Progress(2, 0, enabled=True, every=1)
    bar.bar = Bar()
    bar.update(1, {"loss": 1.0})
    assert bar.bar.postfix == {"loss": "1", "load": "3.5 cores=1 (oversubscribed)"}
    assert len(bar.bar.written) == 1 and "oversubscribed" in bar.bar.written[0]
