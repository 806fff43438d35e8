"""shrink(): the ``*_debug_tiny`` twin of a preset."""

from __future__ import annotations

import attrs
import pytest

from selfflow_core import DiT, EMATeacher, ModalitySpec, SamplingConfig, TrainerConfig, shrink
from selfflow_core.builtin.presets import toy


def test_shrink_keeps_the_recipe_and_shrinks_the_run():
    base = attrs.evolve(toy(), sampling=SamplingConfig(count=50, steps=40, shift=3.0,
                                                       method="heun"))
    tiny = shrink(base, run_dir="runs/t", stores={"toy": "data/t.zarr"},
                  modality={"toy": {"count": 8}}, steps=40, samples=3, sample_steps=4)
    spec = tiny.modalities["toy"]
    assert spec.store == "data/t.zarr" and spec.batch_size == 16
    assert spec.modality == attrs.evolve(base.modalities["toy"].modality, count=8)
    assert tiny.backbone == DiT.Config(depth=4, width=32, heads=4)
    assert tiny.teacher == EMATeacher.Config(decay=0.9, warmup=True)
    assert (tiny.steps, tiny.log_every, tiny.checkpoint.every) == (40, 10, 20)
    assert tiny.sampling == SamplingConfig(count=3, steps=4, shift=3.0)
    assert tiny.run_dir == "runs/t"
    assert shrink(base, run_dir="r", stores={}).sampling.steps == 5
    with pytest.raises(ValueError, match="no modality"):
        shrink(base, run_dir="r", stores={"image": "x"})


@attrs.frozen(kw_only=True)
class _Inner:
    a: int = 1
    b: int = 2


def test_shrink_changes_nested_configs_field_by_field():
    from selfflow_core.builtin.toy import ToyModality

    @attrs.frozen(kw_only=True)
    class Outer(ToyModality.Config):
        inner: _Inner = attrs.field(factory=_Inner)
        table: dict = attrs.field(factory=dict)

    base = toy()
    spec = ModalitySpec(modality=Outer(), store="s", source="waves", batch_size=4)
    config = attrs.evolve(base, modalities={"toy": spec})
    tiny = shrink(config, run_dir="r", stores={},
                  modality={"toy": {"inner": {"b": 5}, "table": {"k": 1}, "tokens": 4}})
    m = tiny.modalities["toy"].modality
    assert m.inner == _Inner(a=1, b=5) and m.table == {"k": 1} and m.tokens == 4
    assert isinstance(tiny, TrainerConfig)
