"""The strict converter: typos, types, unknown kinds, all problems at once, round trips, files."""

import attrs
import pytest

from selfflow_core.builtin.dit import DiT
from selfflow_core.builtin.toy import ToyModality
from selfflow_core.config.converter import (
    ConfigError,
    apply_overrides,
    make_converter,
    parse_override,
    read_file,
    structure,
    to_data,
)
from selfflow_core.config.run import ModalitySpec, TrainerConfig
from selfflow_core.interfaces import (
    BackboneConfig,
    ComponentConfig,
    ModalityConfig,
    SchedulerConfig,
    TeacherConfig,
    TrackerConfig,
)
from selfflow_core.objective import ObjectiveConfig
from selfflow_core.plugins.hookspecs import hookimpl
from selfflow_core.plugins.manager import Components, make_plugin_manager
from selfflow_core.teachers import EMATeacher
from selfflow_core.timesteps import DualTimestep, LogitNormal, SingleTimestep, Uniform


@pytest.fixture
def conv(core_components):
    """The strict converter of the core's built-ins (installed plugins not loaded)."""
    return make_converter(core_components)


@attrs.frozen(kw_only=True)
class Run:
    """A composite config, as a trainer config holds components."""

    modality: ModalityConfig
    backbone: BackboneConfig
    scheduler: SchedulerConfig = attrs.field(factory=DualTimestep.Config)
    teacher: TeacherConfig = attrs.field(factory=EMATeacher.Config)
    objective: ObjectiveConfig = attrs.field(factory=ObjectiveConfig)
    steps: int = 10


def problems(excinfo):
    return "\n".join(excinfo.value.problems)


def test_misspelled_key_is_reported_with_its_path(conv):
    with pytest.raises(ConfigError) as e:
        structure(conv, {"kind": "ema", "decya": 0.9}, TeacherConfig)
    assert "decya" in problems(e) and "unknown key" in problems(e)
    with pytest.raises(ConfigError) as e:
        structure(conv, {"modality": {"kind": "toy"}, "backbone": {"kind": "dit", "depht": 4}},
                  Run)
    assert "$.backbone" in problems(e) and "depht" in problems(e)


@pytest.mark.parametrize("data, cls, path", [
    ({"kind": "ema", "warmup": "false"}, TeacherConfig, "$.warmup"),     # no "false" -> True
    ({"kind": "ema", "warmup": 1}, TeacherConfig, "$.warmup"),           # no 1 -> True
    ({"kind": "dit", "depth": "5"}, BackboneConfig, "$.depth"),          # no "5" -> 5
    ({"kind": "dit", "depth": 5.0}, BackboneConfig, "$.depth"),          # no 5.0 -> 5
    ({"kind": "dit", "depth": True}, BackboneConfig, "$.depth"),         # no True -> 1
    ({"kind": "ema", "decay": "0.9"}, TeacherConfig, "$.decay"),
    ({"kind": "toy", "seed": None}, ModalityConfig, "$.seed"),
])
def test_wrong_types_are_not_coerced(conv, data, cls, path):
    with pytest.raises(ConfigError) as e:
        structure(conv, data, cls)
    assert path in problems(e)


def test_ints_are_accepted_for_floats_and_layers_keep_their_type(conv):
    cfg = structure(conv, {"kind": "ema", "decay": 0}, TeacherConfig)
    assert cfg == EMATeacher.Config(decay=0.0)
    obj = structure(conv, {"student_layer": 4, "teacher_layer": 0.7}, ObjectiveConfig)
    assert obj.student_layer == 4 and isinstance(obj.student_layer, int)
    assert obj.teacher_layer == 0.7 and isinstance(obj.teacher_layer, float)
    with pytest.raises(ConfigError):
        structure(conv, {"student_layer": "4"}, ObjectiveConfig)


def test_unknown_kind_lists_installed_kinds_and_their_distribution(conv):
    with pytest.raises(ConfigError) as e:
        structure(conv, {"kind": "ditt"}, BackboneConfig)
    msg = str(e.value)
    assert "'ditt'" in msg and "dit (selfflow" in msg
    with pytest.raises(ConfigError) as e:
        structure(conv, {"kind": "dual", "distribution": {"kind": "gauss"}}, SchedulerConfig)
    msg = problems(e)
    assert "$.distribution" in msg and "logit_normal" in msg and "uniform" in msg
    with pytest.raises(ConfigError) as e:
        structure(conv, {"depth": 3}, BackboneConfig)
    assert "missing `kind`" in problems(e) and "dit" in problems(e)


def test_validators_report_their_path(conv):
    with pytest.raises(ConfigError) as e:
        structure(conv, {"kind": "dual", "mask_ratio": 0.9}, SchedulerConfig)
    assert "$.mask_ratio" in problems(e) and "0.5" in problems(e)


def test_all_problems_are_reported_together(conv):
    data = {"modality": {"kind": "toy", "chanels": 3},
            "backbone": {"kind": "dit", "depth": "4"},
            "teacher": {"kind": "emaa"},
            "steps": "10"}
    with pytest.raises(ConfigError) as e:
        structure(conv, data, Run)
    found = e.value.problems
    assert len(found) == 4, found
    for path in ("$.modality", "$.backbone.depth", "$.teacher", "$.steps"):
        assert any(p.startswith(path) for p in found), (path, found)
    assert str(e.value).startswith("4 problem(s)")


def builtin_configs():
    """Every built-in component with its defaults, plus some non-default variants."""
    components = Components(make_plugin_manager(entry_points=False))
    out = []
    for registry in components.registries():
        for kind in registry:
            cls = registry.get(kind)
            if cls.__module__.startswith("selfflow_core."):
                out.append(cls())
    assert len(out) >= 10
    return out + [
        DiT.Config.sized("S", mlp_ratio=2.0),
        DualTimestep.Config(mask_ratio=0.1, distribution=LogitNormal.Config(
            mean=0.1, std=0.9, shift=2.95, tail_fraction=0.05)),
        SingleTimestep.Config(distribution=LogitNormal.Config(shift=4.63)),
        EMATeacher.Config(decay=0.999, warmup=True, truncate=False),
        ToyModality.Config(tokens=3, channels=2, classes=0, seed=-4),
    ]


@pytest.mark.parametrize("cfg", builtin_configs(), ids=lambda c: repr(c)[:60])
def test_builtin_configs_round_trip(conv, core_components, cfg):
    base = next(r.base for r in core_components.registries() if isinstance(cfg, r.base))
    data = to_data(conv, cfg)
    assert data["kind"] == type(cfg).kind
    assert structure(conv, data, base) == cfg
    assert structure(conv, conv.unstructure(cfg), type(cfg)) == cfg


def test_composite_round_trip(conv):
    run = Run(modality=ToyModality.Config(channels=3), backbone=DiT.Config(depth=2),
              scheduler=SingleTimestep.Config(distribution=Uniform.Config()),
              objective=ObjectiveConfig(gamma=0.5, student_layer=1, teacher_layer=0.75))
    assert structure(conv, to_data(conv, run), Run) == run


def test_overrides_then_structure(conv):
    run = Run(modality=ToyModality.Config(), backbone=DiT.Config())
    data = apply_overrides(to_data(conv, run), [
        "backbone.depth=6", "teacher.warmup=true", "scheduler.mask_ratio=0.1",
        "scheduler.distribution.kind=logit_normal", "scheduler.distribution.shift=2.95",
        "modality=toy", "objective.student_layer=2", "steps=1_000"])
    # a bare word is a string: `modality=toy` replaces the table, which must then fail cleanly
    with pytest.raises(ConfigError) as e:
        structure(conv, data, Run)
    assert "$.modality" in problems(e)
    data["modality"] = {"kind": "toy"}
    got = structure(conv, data, Run)
    assert got == attrs.evolve(
        run, backbone=DiT.Config(depth=6), teacher=EMATeacher.Config(warmup=True),
        scheduler=DualTimestep.Config(mask_ratio=0.1,
                                      distribution=LogitNormal.Config(shift=2.95)),
        objective=ObjectiveConfig(student_layer=2), steps=1000)
    assert isinstance(got.objective.student_layer, int)
    # the input is not modified
    assert to_data(conv, run)["backbone"]["depth"] == 4


def test_override_syntax():
    assert parse_override("optim.lr=3e-4") == (["optim", "lr"], 3e-4)
    assert parse_override("a=false") == (["a"], False)
    assert parse_override("a=\"5\"") == (["a"], "5")
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert parse_override("eval_ema_decay=null") == (["eval_ema_decay"], None)  # unset
    assert parse_override('a="null"') == (["a"], "null")                       # the string
    with pytest.raises(ConfigError) as e:
        apply_overrides({"a": 1}, ["novalue", "a.b=1", "=3"])
    assert len(e.value.problems) == 3


@pytest.mark.parametrize("name, text", [
    ("bad.toml", "[backbone\nkind = 'dit'\n"),
    ("bad.json", "{\"backbone\": }"),
    ("list.json", "[1, 2]"),
])
def test_file_errors_name_the_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        read_file(path)
    assert e.value.source == str(path) and str(path) in str(e.value)


def test_missing_file_and_good_file(tmp_path, conv):
    with pytest.raises(ConfigError) as e:
        read_file(tmp_path / "nope.toml")
    assert str(tmp_path / "nope.toml") in str(e.value)
    path = tmp_path / "run.toml"
    path.write_text('steps = 3\n[modality]\nkind = "toy"\n[backbone]\nkind = "dit"\ndepth = 2\n')
    run = structure(conv, read_file(path), Run, source=str(path))
    assert run == Run(modality=ToyModality.Config(), backbone=DiT.Config(depth=2), steps=3)
    path.write_text('steps = 3\n[modality]\nkind = "toy"\n[backbone]\nkind = "dit"\ndepth = "2"\n')
    with pytest.raises(ConfigError) as e:
        structure(conv, read_file(path), Run, source=str(path))
    assert str(path) in str(e.value) and "$.backbone.depth" in problems(e)


def test_tracker_configs_structure(conv):
    assert structure(conv, {"kind": "jsonl"}, TrackerConfig).kind == "jsonl"


@attrs.frozen(kw_only=True)
class SparseModalityConfig(ModalityConfig):
    """A modality whose paper settings differ from the core's default scheduler."""

    kind = "sparse"
    ratio: float = 0.1

    def build(self):
        raise NotImplementedError

    def default_scheduler(self) -> SchedulerConfig:
        return DualTimestep.Config(
            distribution=LogitNormal.Config(shift=2.95, tail_fraction=0.05), mask_ratio=self.ratio)


class SparsePlugin:
    @hookimpl
    def selfflow_register_modalities(self, registry):
        registry.add(SparseModalityConfig)


def test_a_spec_without_a_scheduler_gets_its_modalitys_default(tmp_path):
    components = Components(make_plugin_manager([SparsePlugin()], entry_points=False))
    conv = make_converter(components)
    want = SparseModalityConfig().default_scheduler()
    # in Python: omitted or None, the modality's declared default; explicit ones are kept
    spec = ModalitySpec(modality=SparseModalityConfig(), store="s.zarr")
    assert spec.scheduler == want
    assert ModalitySpec(modality=SparseModalityConfig(), store="s.zarr", scheduler=None) == spec
    assert ModalitySpec(modality=SparseModalityConfig(ratio=0.3), store="s.zarr"
                        ).scheduler.mask_ratio == 0.3
    mine = SingleTimestep.Config()
    assert ModalitySpec(modality=SparseModalityConfig(), store="s.zarr",
                        scheduler=mine).scheduler == mine
    # a modality declaring none (the toy) gets the core's default: uniform p(t), ratio 0.25
    assert ToyModality.Config().default_scheduler() is None
    assert ModalitySpec(modality=ToyModality.Config(), store="t.zarr"
                        ).scheduler == DualTimestep.Config(distribution=Uniform.Config())
    # in a TOML file, and the resolved scheduler is what the config's data records (checkpoints,
    # `selfflow config show`): written out and read back, the same config
    path = tmp_path / "run.toml"
    path.write_text('[modalities.a]\nstore = "a.zarr"\n[modalities.a.modality]\nkind = "sparse"\n')
    config = structure(conv, read_file(path), TrainerConfig, source=str(path))
    assert config.modalities["a"].scheduler == want
    data = to_data(conv, config)
    assert data["modalities"]["a"]["scheduler"] == to_data(conv, want)
    assert structure(conv, data, TrainerConfig) == config
    assert config == TrainerConfig(modalities={"a": attrs.evolve(spec, store="a.zarr")})


def test_a_field_added_later_is_left_out_of_the_data_at_its_default():
    """``added_field``: configs saved before the field existed (checkpoints, store schemas,
    compared as data) still match a config that leaves it at its default; set, it is saved and
    read back like any field."""
    from selfflow_core import added_field

    @attrs.frozen(kw_only=True)
    class Widget(ComponentConfig):
        kind = "widget"
        size: int = 1
        extra: int = added_field(default=0)
        table: dict = added_field(factory=dict)

    conv = make_converter()
    assert to_data(conv, Widget()) == {"kind": "widget", "size": 1}
    assert to_data(conv, Widget(extra=2)) == {"kind": "widget", "size": 1, "extra": 2}
    assert to_data(conv, Widget(table={"a": 1}))["table"] == {"a": 1}
    assert structure(conv, {"kind": "widget", "size": 1}, Widget) == Widget()
    assert structure(conv, {"kind": "widget", "size": 1, "extra": 2}, Widget) == Widget(extra=2)
    assert attrs.fields(Widget).extra.metadata  # the marker is the field's own metadata


def test_a_field_added_later_to_a_plain_table_is_left_out_at_its_default():
    """The same for a plain attrs table (no ``kind``) nested in a component config."""
    from selfflow_core import added_field

    @attrs.frozen(kw_only=True)
    class Look:
        size: int = 1
        extra: str = added_field(default="a")

    @attrs.frozen(kw_only=True)
    class Holder(ComponentConfig):
        kind = "holder"
        look: Look = attrs.field(factory=Look)

    conv = make_converter()
    assert to_data(conv, Holder()) == {"kind": "holder", "look": {"size": 1}}
    assert to_data(conv, Holder(look=Look(extra="b")))["look"] == {"size": 1, "extra": "b"}
    assert structure(conv, {"kind": "holder", "look": {"size": 1}}, Holder) == Holder()
    assert structure(conv, {"kind": "holder", "look": {"size": 1, "extra": "b"}},
                     Holder) == Holder(look=Look(extra="b"))
