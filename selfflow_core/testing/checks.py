"""Reusable checks of the contract kit (plain functions that raise ``AssertionError``)."""

from __future__ import annotations

import importlib.metadata as md
import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

import attrs
import cattrs
import torch
from torch import Tensor, nn

from selfflow_core.config.converter import make_converter, structure, to_data
from selfflow_core.interfaces.base import ComponentConfig
from selfflow_core.plugins.manager import ENTRY_POINT_GROUP, Components, make_plugin_manager
from selfflow_core.types import TokenBatch

#: ``Components`` attribute -> the base config class of that category
CATEGORIES = ("modalities", "backbones", "schedulers", "distributions", "teachers", "trackers",
              "text_encoders")


def randomize_parameters(module: nn.Module, seed: int = 0, std: float = 0.1) -> nn.Module:
    """Add N(0, std^2) noise to every parameter (in place, seeded). Zero-initialised layers (adaLN-
    Zero gates, output projections) otherwise make a fresh network the identity, and many
    properties (masking, per-token time, truncation) would hold trivially."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_((torch.randn(p.shape, generator=g) * std).to(p.device, p.dtype))
    return module


def check_token_batch(batch: TokenBatch, *, num_samples: int | None = None,
                      token_dim: int | None = None, num_classes: int | None = None,
                      labels_required: bool = False, null_label_allowed: bool = False,
                      max_position_axes: int | None = None) -> None:
    """Assert that ``batch`` is a well-formed :class:`TokenBatch` (shapes agree, dtypes are right,
    every sample has something to generate, labels in range)."""
    assert isinstance(batch, TokenBatch), f"expected a TokenBatch, got {type(batch).__name__}"
    x = batch.tokens
    assert isinstance(x, Tensor) and x.dim() == 3, f"tokens must be [B, N, C], got {_shape(x)}"
    b, n, c = x.shape
    assert b >= 1 and n >= 1 and c >= 1, f"empty tokens {tuple(x.shape)}"
    assert x.is_floating_point(), f"tokens must be floating point, got {x.dtype}"
    assert bool(torch.isfinite(x).all()), "tokens contain NaN or inf"
    if num_samples is not None:
        assert b == num_samples, f"tokens hold {b} samples, expected {num_samples}"
    if token_dim is not None:
        assert c == token_dim, f"tokens have {c} channels, the adapter's token_dim is {token_dim}"

    pos = batch.positions
    assert isinstance(pos, Tensor) and pos.dim() == 3 and tuple(pos.shape[:2]) == (b, n), (
        f"positions must be [B, N, P] = [{b}, {n}, P], got {_shape(pos)}")
    assert pos.is_floating_point(), f"positions must be float, got {pos.dtype}"
    assert pos.shape[2] >= 1, "positions need at least one axis"
    if max_position_axes is not None:
        assert pos.shape[2] <= max_position_axes, (
            f"positions have {pos.shape[2]} axes; the reference backbone takes at most "
            f"{max_position_axes}")
    assert bool(torch.isfinite(pos).all()), "positions contain NaN or inf"

    for name, dtype in (("modality_ids", torch.long), ("valid", torch.bool),
                        ("condition", torch.bool)):
        t = getattr(batch, name)
        assert isinstance(t, Tensor) and tuple(t.shape) == (b, n), (
            f"{name} must be [B, N] = [{b}, {n}], got {_shape(t)}")
        assert t.dtype == dtype, f"{name} must be {dtype}, got {t.dtype}"
    assert bool((batch.modality_ids >= 0).all()), "modality_ids must be >= 0"
    assert bool(batch.valid.any(dim=1).all()), "a sample has no valid token"
    assert bool(batch.target_mask.any()), "no token to generate (all padding or conditioning)"

    if batch.channel_valid is not None:
        cv = batch.channel_valid
        assert tuple(cv.shape) == (b, n, c) and cv.dtype == torch.bool, (
            f"channel_valid must be bool [B, N, C] = [{b}, {n}, {c}], got {_shape(cv)} {cv.dtype}")
        assert bool(cv.any(dim=-1)[batch.valid].all()), "a valid token has no valid channel"

    labels = batch.labels
    if num_classes is not None and num_classes == 0:
        assert labels is None, "an unconditional modality (num_classes 0) must give labels=None"
    if labels_required:
        assert labels is not None, f"labels are missing (num_classes {num_classes})"
    if labels is not None:
        assert isinstance(labels, Tensor) and tuple(labels.shape) == (b,), (
            f"labels must be [B] = [{b}], got {_shape(labels)}")
        assert labels.dtype == torch.long, f"labels must be long, got {labels.dtype}"
        if num_classes is not None:
            hi = num_classes + 1 if null_label_allowed else num_classes
            assert bool(((labels >= 0) & (labels < hi)).all()), (
                f"labels must be in [0, {hi}), got {labels.tolist()}")

    devices = {t.device for t in (x, pos, batch.modality_ids, batch.valid, batch.condition,
                                  labels, batch.channel_valid) if t is not None}
    assert len(devices) == 1, f"tensors on several devices: {devices}"


def pad_batch(batch: TokenBatch, extra: int, *, generator: torch.Generator) -> TokenBatch:
    """``batch`` with ``extra`` padding tokens (``valid=False``, random values and positions)
    appended to every sample, as a collator that pads to a common length would."""
    b, n, c = batch.tokens.shape
    dev = batch.tokens.device

    def rand(*shape: int) -> Tensor:
        return torch.randn(shape, generator=generator).to(dev)

    def cat(a: Tensor, pad: Tensor) -> Tensor:
        return torch.cat([a, pad.to(a.dtype)], dim=1)

    return TokenBatch(
        tokens=cat(batch.tokens, rand(b, extra, c)),
        positions=cat(batch.positions, rand(b, extra, batch.positions.shape[-1]).abs() * 7),
        modality_ids=cat(batch.modality_ids, batch.modality_ids[:, -1:].expand(b, extra)),
        valid=cat(batch.valid, torch.zeros(b, extra, dtype=torch.bool, device=dev)),
        condition=cat(batch.condition, torch.zeros(b, extra, dtype=torch.bool, device=dev)),
        labels=batch.labels,
        channel_valid=None if batch.channel_valid is None else cat(
            batch.channel_valid, torch.ones(b, extra, c, dtype=torch.bool, device=dev)),
    )


def check_config_contract(cfg: ComponentConfig, category: str, *,
                          plugins: Iterable[object] = (), entry_points: bool | None = None
                          ) -> None:
    """Assert that a component config is frozen and keyword-only, has a ``kind``, is registered
    under it in ``Components()`` (category: ``"modalities"``, ``"backbones"``, ...), and survives
    unstructure -> JSON -> structure through the strict converter unchanged. ``plugins`` and
    ``entry_points`` go to :func:`make_plugin_manager` (``entry_points=None``: the installed
    plugins, unless ``SELFFLOW_DISABLE_PLUGIN_AUTOLOAD`` is set)."""
    assert category in CATEGORIES, f"category must be one of {CATEGORIES}, got {category!r}"
    cls = type(cfg)
    assert isinstance(cfg, ComponentConfig), f"{cls.__qualname__} is not a ComponentConfig"
    assert attrs.has(cls), f"{cls.__qualname__} is not an attrs class"
    kind = cls.kind
    assert isinstance(kind, str) and kind, f"{cls.__qualname__}.kind must be a non-empty string"
    names = [f.name for f in attrs.fields(cls)]
    assert "kind" not in names, "`kind` must be a class variable, not a field"
    positional = [f.name for f in attrs.fields(cls) if not f.kw_only]
    assert not positional, (
        f"fields must be keyword-only (@attrs.frozen(kw_only=True)): {positional}")
    for name in names or ["not_a_field"]:
        try:
            setattr(cfg, name, getattr(cfg, name, None))
        except attrs.exceptions.FrozenInstanceError:
            pass
        else:
            raise AssertionError(f"{cls.__qualname__} is not frozen: setting {name!r} worked")

    components = Components(make_plugin_manager(plugins, entry_points=entry_points))
    registry = getattr(components, category)
    assert kind in registry, (
        f"{category[:-1]} {kind!r} is not registered; registered: {registry.describe()}")
    assert registry.get(kind) is cls, (
        f"{category[:-1]} {kind!r} is registered as {registry.get(kind)!r}, not {cls!r}")

    conv = make_converter(components)
    data = to_data(conv, cfg)
    assert data.get("kind") == kind, f"unstructured config lacks kind {kind!r}: {data}"
    again = structure(conv, data, registry.base)
    assert again == cfg, f"config changed in a round trip:\n  {cfg!r}\n  {again!r}"


def installed_components() -> Components:
    """Fresh components with every installed plugin loaded through its entry point (whatever
    ``SELFFLOW_DISABLE_PLUGIN_AUTOLOAD`` says: the checks below are about installed plugins)."""
    return Components(make_plugin_manager(entry_points=True))


def check_discovered(category: str, kind: str, distribution: str, *,
                     config_class: type | None = None, presets: Iterable[str] = ()
                     ) -> Components:
    """Assert that the installed distribution ``distribution`` declares a ``selfflow`` entry
    point, and that ``Components()`` (entry points on) lists ``kind`` under ``category``
    (``"modalities"``, ``"trackers"``, ...) as registered by that entry point's plugin, with the
    distribution as its provider; likewise each of ``presets``. ``config_class``: the class
    ``kind`` must map to. Returns the components."""
    assert category in CATEGORIES, f"category must be one of {CATEGORIES}, got {category!r}"
    eps = [ep for ep in md.entry_points(group=ENTRY_POINT_GROUP)
           if ep.dist is not None and _canonical(ep.dist.name) == _canonical(distribution)]
    if not eps:
        others = sorted({f"{ep.name} ({ep.dist.name if ep.dist else '?'})"
                         for ep in md.entry_points(group=ENTRY_POINT_GROUP)})
        raise AssertionError(
            f"no installed distribution {distribution!r} with a {ENTRY_POINT_GROUP!r} entry point "
            f"(install it, e.g. `pip install -e .`); entry points found: {others or 'none'}")
    names = sorted(ep.name for ep in eps)
    components = installed_components()
    registry = getattr(components, category)
    what = category[:-1]
    assert kind in registry, (
        f"{what} {kind!r} is not registered by the entry point(s) {names} of {distribution}; "
        f"registered: {registry.describe()}")
    provider = registry.provider(kind)
    assert provider.distribution == distribution and provider.plugin in names, (
        f"{what} {kind!r} is provided by {provider}, not by {distribution}'s entry point(s) "
        f"{names}")
    if config_class is not None:
        assert registry.get(kind) is config_class, (
            f"{what} {kind!r} is registered as {registry.get(kind)!r}, not {config_class!r}")
    for name in presets:
        assert name in components.presets, (
            f"preset {name!r} is not registered; registered: {components.presets.describe()}")
        provider = components.presets.provider(name)
        assert provider.distribution == distribution, (
            f"preset {name!r} is provided by {provider}, not by {distribution}")
    return components


def check_round_trip(conv: cattrs.Converter, cfg: Any, cls: type) -> None:
    """Assert that ``cfg`` comes back equal from ``to_data`` (JSON-safe data, as a config file
    holds it) and ``structure(conv, data, cls)``; ``cls`` may be the category's base class
    (``ModalityConfig``: the ``kind`` tag picks the class) or ``TrainerConfig``."""
    name = type(cfg).__qualname__
    try:
        data = to_data(conv, cfg)
    except Exception as exc:
        raise AssertionError(f"{name} does not unstructure: {type(exc).__name__}: {exc}") from exc
    try:
        again = structure(conv, data, cls)
    except Exception as exc:
        raise AssertionError(f"{name} does not structure back from its own data {data}: "
                             f"{type(exc).__name__}: {exc}") from exc
    assert again == cfg, (f"{name} changed in a round trip through the converter:\n  {cfg!r}\n"
                          f"  {again!r}")


def check_loss_lowered(losses: Sequence[float], *, window: int = 5, ratio: float = 0.9) -> None:
    """Assert that every loss is finite and that the mean of the last ``window`` is below
    ``ratio`` times the mean of the first ``window`` (means: robust to a noisy step)."""
    losses = [float(x) for x in losses]
    assert window >= 1 and len(losses) >= 2 * window, (
        f"{len(losses)} losses are too few for two windows of {window}")
    bad = [i for i, x in enumerate(losses) if not math.isfinite(x)]
    assert not bad, f"non-finite losses at steps {[i + 1 for i in bad]}: {losses}"
    first = sum(losses[:window]) / window
    last = sum(losses[-window:]) / window
    assert last < ratio * first, (
        f"training did not lower the loss: mean of the last {window} steps {last:.4g} is not "
        f"below {ratio} x the mean of the first {window} ({first:.4g}); losses: "
        f"{[round(x, 4) for x in losses]}")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _shape(t: object) -> str:
    return str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__
