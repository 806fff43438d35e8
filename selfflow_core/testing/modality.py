"""``ModalityContract``: what every modality adapter must satisfy, as inherited pytest tests."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import attrs
import numpy as np
import pytest
import torch
from torch import Tensor

from selfflow_core.builtin.dit import MAX_POSITION_AXES, DiT
from selfflow_core.interfaces import (
    BackboneConfig,
    ModalityAdapter,
    ModalityConfig,
    SchedulerConfig,
)
from selfflow_core.objective import ObjectiveConfig, SelfFlowObjective
from selfflow_core.teachers import EMATeacher
from selfflow_core.testing.checks import (
    check_config_contract,
    check_token_batch,
    pad_batch,
    randomize_parameters,
)
from selfflow_core.timesteps import DualTimestep, Uniform
from selfflow_core.types import TimestepPlan, TokenBatch


class ModalityContract:
    """Subclass as ``class TestMyModality(ModalityContract): config = MyModality.Config(...)``.

    The checks read :attr:`num_samples` raw samples from :attr:`source` (default: the adapter's
    first built-in source), ``encode`` them, turn the arrays into tensors and ``tokenize`` them.
    Override the ``raw`` fixture when raw data must be made up (e.g. no built-in source, or one
    that downloads), and :attr:`plugins` to register a plugin object that is not installed.
    """

    #: the modality's config (required)
    config: ClassVar[ModalityConfig]
    #: how many raw samples to read and encode (keep it small: encoders can be slow)
    num_samples: ClassVar[int] = 4
    #: the raw source to read; ``None``: ``adapter.sources()[0]``
    source: ClassVar[str | None] = None
    #: plugin objects to register besides the installed ones (for an uninstalled plugin)
    plugins: ClassVar[tuple[object, ...]] = ()
    #: load installed plugins (entry points) for the registration check; ``None``: the default
    #: (on unless ``SELFFLOW_DISABLE_PLUGIN_AUTOLOAD``); ``False`` for built-ins and ``plugins``
    entry_points: ClassVar[bool | None] = None
    #: tolerance of ``detokenize(tokenize(fields).tokens) == fields[latent_field]``
    roundtrip_rtol: ClassVar[float] = 1e-6
    roundtrip_atol: ClassVar[float] = 1e-6
    #: ``prompt(n, fields)`` must lay tokens out at the same positions as ``tokenize``
    prompt_positions_match: ClassVar[bool] = True
    #: the tiny backbone the loss checks run through
    backbone_config: ClassVar[BackboneConfig] = DiT.Config(depth=2, width=24, heads=2)

    # ---- fixtures (override to adapt) -------------------------------------------------------

    @pytest.fixture(scope="class")
    @classmethod
    def adapter(cls) -> ModalityAdapter:
        return cls.config.build()

    @pytest.fixture(scope="class")
    @classmethod
    def raw(cls, adapter: ModalityAdapter) -> Any:
        """``num_samples`` raw samples in the form ``adapter.encode`` takes."""
        name = cls.source
        if name is None:
            names = list(adapter.sources())
            if not names:
                pytest.fail(f"{type(adapter).__name__} has no built-in source: set `source` or "
                            f"override the `raw` fixture")
            name = names[0]
        src = adapter.open_source(name)
        if len(src) < cls.num_samples:
            pytest.fail(f"source {name!r} holds {len(src)} samples, fewer than num_samples "
                        f"({cls.num_samples})")
        return src.read(0, cls.num_samples)

    @pytest.fixture(scope="class")
    @classmethod
    def encoded(cls, adapter: ModalityAdapter, raw: Any) -> Mapping[str, np.ndarray]:
        return adapter.encode(raw)

    @pytest.fixture
    def fields(self, encoded: Mapping[str, np.ndarray]) -> dict[str, Tensor]:
        """The encoded arrays as tensors, as the data loader hands them to ``tokenize`` (text
        fields, e.g. ``captions``, are the core's: the loader never hands them over)."""
        specs = self.adapter_fields(encoded)
        return {k: torch.from_numpy(np.array(v)) for k, v in encoded.items()
                if specs.get(k) != "str"}

    @staticmethod
    def adapter_fields(encoded: Mapping[str, np.ndarray]) -> dict[str, str]:
        return {k: ("str" if np.asarray(v).dtype.kind in "OUT" else "") for k, v in
                encoded.items()}

    @pytest.fixture
    def batch(self, adapter: ModalityAdapter, fields: dict[str, Tensor]) -> TokenBatch:
        return adapter.tokenize(fields)

    # ---- config and registration ------------------------------------------------------------

    def test_config_contract(self) -> None:
        """Frozen, keyword-only, tagged by ``kind``, registered, and round-trips the converter."""
        check_config_contract(self.config, "modalities", plugins=self.plugins,
                              entry_points=self.entry_points)

    def test_build(self, adapter: ModalityAdapter) -> None:
        assert isinstance(adapter, ModalityAdapter), (
            f"config.build() returned {type(adapter).__name__}, not a ModalityAdapter")
        assert adapter.name == type(self.config).kind, (
            f"adapter.name {adapter.name!r} differs from the config's kind "
            f"{type(self.config).kind!r}")
        assert isinstance(adapter.token_dim, int) and adapter.token_dim >= 1
        assert isinstance(adapter.num_classes, int) and adapter.num_classes >= 0
        default = self.config.default_scheduler()  # a spec naming no scheduler gets it
        assert default is None or isinstance(default, SchedulerConfig), (
            f"config.default_scheduler() returned {default!r}, not a SchedulerConfig or None")
        if default is not None:
            default.build()
        assert adapter.latent_field in adapter.fields(), (
            f"latent_field {adapter.latent_field!r} is not one of fields() "
            f"{sorted(adapter.fields())}")

    # ---- offline: encode --------------------------------------------------------------------

    def test_encode_matches_fields(self, adapter: ModalityAdapter,
                                   encoded: Mapping[str, np.ndarray]) -> None:
        """``encode`` gives exactly the arrays ``fields()`` declares: names, shapes, dtypes."""
        specs = adapter.fields()
        assert set(encoded) == set(specs), (
            f"encode() gave fields {sorted(encoded)}, fields() declares {sorted(specs)}")
        for name, spec in specs.items():
            arr = encoded[name]
            assert isinstance(arr, np.ndarray), (
                f"field {name!r} is {type(arr).__name__}, not a numpy array")
            want = (self.num_samples, *spec.shape)
            assert arr.shape == want, f"field {name!r} has shape {arr.shape}, expected {want}"
            if spec.dtype == "str":  # a text field: Python strings
                assert all(isinstance(x, str) for x in arr.reshape(-1).tolist()), (
                    f"text field {name!r} holds values that are not str")
                continue
            assert arr.dtype == np.dtype(spec.dtype), (
                f"field {name!r} has dtype {arr.dtype}, fields() declares {spec.dtype}")
            if arr.dtype.kind == "f":
                assert np.isfinite(arr).all(), f"field {name!r} contains NaN or inf"

    # ---- online: tokenize / detokenize / prompt ---------------------------------------------

    def test_tokenize_gives_valid_batch(self, adapter: ModalityAdapter, batch: TokenBatch) -> None:
        check_token_batch(batch, num_samples=self.num_samples, token_dim=adapter.token_dim,
                          num_classes=adapter.num_classes,
                          labels_required=adapter.num_classes > 0,
                          max_position_axes=MAX_POSITION_AXES)

    def test_tokenize_is_deterministic(self, adapter: ModalityAdapter,
                                       fields: dict[str, Tensor], batch: TokenBatch) -> None:
        again = adapter.tokenize(fields)
        for name in ("tokens", "positions", "modality_ids", "valid", "condition", "labels"):
            a, b = getattr(batch, name), getattr(again, name)
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), (
                f"tokenize() is not deterministic in {name}")

    def test_detokenize_inverts_tokenize(self, adapter: ModalityAdapter,
                                         fields: dict[str, Tensor], batch: TokenBatch) -> None:
        want = fields[adapter.latent_field]
        got = adapter.detokenize(batch.tokens)
        assert isinstance(got, Tensor), f"detokenize() returned {type(got).__name__}"
        assert tuple(got.shape) == tuple(want.shape), (
            f"detokenize(tokenize(x).tokens) has shape {tuple(got.shape)}, the latent field "
            f"{adapter.latent_field!r} has {tuple(want.shape)}")
        torch.testing.assert_close(got.double(), want.double(), rtol=self.roundtrip_rtol,
                                   atol=self.roundtrip_atol,
                                   msg="detokenize(tokenize(x).tokens) != x")

    def test_prompt_matches_tokenize(self, adapter: ModalityAdapter, fields: dict[str, Tensor],
                                     batch: TokenBatch) -> None:
        n = self.num_samples
        prompt = adapter.prompt(n, fields)
        check_token_batch(prompt, num_samples=n, token_dim=adapter.token_dim,
                          num_classes=adapter.num_classes, null_label_allowed=True,
                          max_position_axes=MAX_POSITION_AXES)
        for name in ("tokens", "positions", "modality_ids", "valid", "condition"):
            a, b = getattr(prompt, name), getattr(batch, name)
            assert a.shape == b.shape and a.dtype == b.dtype, (
                f"prompt().{name} is {tuple(a.shape)} {a.dtype}, tokenize() gives "
                f"{tuple(b.shape)} {b.dtype}")
        assert torch.equal(prompt.modality_ids, batch.modality_ids), (
            "prompt() and tokenize() assign different modality ids")
        if self.prompt_positions_match:
            torch.testing.assert_close(prompt.positions, batch.positions, rtol=0, atol=1e-6,
                                       msg="prompt() and tokenize() lay tokens out differently")

    # ---- the loss respects the masks --------------------------------------------------------

    def test_padding_does_not_change_loss(self, adapter: ModalityAdapter,
                                          batch: TokenBatch) -> None:
        """Tokens with ``valid=False`` (the batch's own and appended ones) change neither the flow
        nor the representation loss, whatever their values."""
        g = torch.Generator().manual_seed(0)
        n = batch.tokens.shape[1]
        padded = pad_batch(batch, 3, generator=g)
        ids = int(batch.modality_ids.max()) + 1
        model = randomize_parameters(self.backbone_config.build(
            token_dims=[adapter.token_dim] * ids, num_classes=adapter.num_classes), 1)
        teacher = EMATeacher(EMATeacher.Config())
        teacher.attach(model)
        randomize_parameters(teacher.model, 2)
        objective = SelfFlowObjective(
            ObjectiveConfig(student_layer=1, teacher_layer=model.depth),
            depth=model.depth, width=model.width)
        randomize_parameters(objective, 3)
        plan = DualTimestep(Uniform(), 0.5).plan(padded, generator=g)
        noise = torch.randn(padded.tokens.shape, generator=g)

        def loss(b: TokenBatch, p: TimestepPlan, nz: Tensor) -> tuple[float, float]:
            with torch.no_grad():
                terms = objective(model, teacher, b, p, nz)
            assert torch.isfinite(terms.total), f"non-finite loss {terms.total}"
            return terms.flow.item(), terms.rep.item()

        ref = loss(padded, plan, noise)
        pad = ~padded.valid[..., None]
        junk = torch.randn(padded.tokens.shape, generator=g) * 100
        changed = attrs.evolve(padded, tokens=torch.where(pad, junk, padded.tokens))
        got = loss(changed, plan, torch.where(pad, -junk, noise))
        assert got == pytest.approx(ref, rel=1e-5, abs=1e-6), (
            f"changing padding tokens changed (flow, rep) from {ref} to {got}")
        cut = TimestepPlan(student_t=plan.student_t[:, :n], teacher_t=plan.teacher_t[:, :n],
                           masked=plan.masked[:, :n])
        unpadded = loss(batch, cut, noise[:, :n])
        assert unpadded == pytest.approx(ref, rel=1e-5, abs=1e-6), (
            f"appending padding tokens changed (flow, rep) from {unpadded} to {ref}")

    # ---- samples ----------------------------------------------------------------------------

    def test_save_samples_writes_files(self, adapter: ModalityAdapter, batch: TokenBatch,
                                       tmp_path: Path) -> None:
        out = tmp_path / "samples"
        paths = adapter.save_samples(adapter.detokenize(batch.tokens), batch.labels, out)
        assert paths, "save_samples() returned no files"
        for p in paths:
            p = Path(p)
            assert p.is_file(), f"save_samples() returned {p}, which is not a file"
            assert p.stat().st_size > 0, f"save_samples() wrote an empty file {p}"
            assert out.resolve() in p.resolve().parents, (
                f"save_samples() wrote {p} outside its out_dir {out}")

