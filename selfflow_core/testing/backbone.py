"""``BackboneContract``: what every backbone must satisfy, as inherited pytest tests."""

from __future__ import annotations

from typing import ClassVar

import attrs
import pytest
import torch
from torch import Tensor

from selfflow_core.interfaces import Backbone, BackboneConfig, TextSpec
from selfflow_core.testing.checks import check_config_contract, randomize_parameters
from selfflow_core.types import TokenBatch


class BackboneContract:
    """Subclass as ``class TestMyBackbone(BackboneContract): config = MyBackbone.Config(...)``.

    The backbone is built with :attr:`token_dims` (several widths: one sequence mixes modalities,
    narrower ones zero-padded and marked in ``channel_valid``) and :attr:`num_classes`, and its
    parameters are randomised (zero-initialised gates would make most checks trivially true).
    With :attr:`text` (a :class:`~selfflow_core.interfaces.text.TextSpec`), it is built with
    ``text=`` too and every batch carries a prompt (ids and/or embeddings as the spec says, a
    mask with padding, a pooled vector if ``pooled_dim``).
    """

    #: the backbone's config (required); depth >= 2
    config: ClassVar[BackboneConfig]
    #: token widths per modality id
    token_dims: ClassVar[tuple[int, ...]] = (6,)
    #: class labels (0: unconditional)
    num_classes: ClassVar[int] = 3
    batch_size: ClassVar[int] = 2
    num_tokens: ClassVar[int] = 10
    position_axes: ClassVar[int] = 2
    plugins: ClassVar[tuple[object, ...]] = ()
    #: load installed plugins (entry points) for the registration check; ``None``: the default
    #: (on unless ``SELFFLOW_DISABLE_PLUGIN_AUTOLOAD``); ``False`` for built-ins and ``plugins``
    entry_points: ClassVar[bool | None] = None
    #: tolerance of "truncated == full" and "[B] time == homogeneous [B, N] time" (exact by default)
    exact_rtol: ClassVar[float] = 0.0
    exact_atol: ClassVar[float] = 0.0
    #: tolerance of "padding does not change valid tokens' outputs"
    padding_atol: ClassVar[float] = 1e-5
    #: the prompt the backbone reads (None: built without ``text=``, batches carry no prompt)
    text: ClassVar[TextSpec | None] = None
    #: text tokens per sample (at most ``text.max_length``)
    text_length: ClassVar[int] = 5

    # ---- fixtures ---------------------------------------------------------------------------

    @pytest.fixture
    def backbone(self) -> Backbone:
        return self.make_backbone()

    @pytest.fixture
    def batch(self) -> TokenBatch:
        return self.make_batch()

    @pytest.fixture
    def t(self) -> Tensor:
        return torch.rand(self.batch_size, generator=torch.Generator().manual_seed(2))

    def make_backbone(self) -> Backbone:
        """The backbone under test, with randomised parameters."""
        extra = {} if self.text is None else {"text": self.text}
        model = self.config.build(token_dims=self.token_dims, num_classes=self.num_classes,
                                  **extra)
        return randomize_parameters(model, seed=0, std=0.1)

    def make_batch(self) -> TokenBatch:
        """A batch mixing every modality id, tokens zero on channels their modality lacks."""
        g = torch.Generator().manual_seed(1)
        b, n, c = self.batch_size, self.num_tokens, max(self.token_dims)
        ids = (torch.arange(n) % len(self.token_dims))[None].expand(b, n).contiguous()
        widths = torch.tensor(self.token_dims)[ids]
        channel_valid = torch.arange(c)[None, None, :] < widths[..., None]
        tokens = torch.randn(b, n, c, generator=g) * channel_valid
        positions = torch.rand(b, n, self.position_axes, generator=g) * 8
        labels = (torch.randint(0, self.num_classes, (b,), generator=g)
                  if self.num_classes else None)
        return TokenBatch(
            tokens=tokens, positions=positions, modality_ids=ids,
            valid=torch.ones(b, n, dtype=torch.bool), condition=torch.zeros(b, n, dtype=torch.bool),
            labels=labels,
            channel_valid=channel_valid if len(set(self.token_dims)) > 1 else None,
            **self.make_text(b, g))

    def make_text(self, b: int, g: torch.Generator) -> dict[str, Tensor]:
        """The prompt fields of a batch (none without :attr:`text`): the first sample's last
        two text tokens are padding (id 0, zero embeddings)."""
        spec = self.text
        if spec is None:
            return {}
        length = self.text_length
        mask = torch.ones(b, length, dtype=torch.bool)
        mask[0, -2:] = False
        out = {"text_mask": mask}
        if spec.vocab_size is not None:
            out["text_ids"] = torch.randint(1, spec.vocab_size, (b, length), generator=g) * mask
        if spec.dim is not None:
            out["text"] = torch.randn(b, length, spec.dim, generator=g) * mask[..., None]
        if spec.pooled_dim:
            out["text_pooled"] = torch.randn(b, spec.pooled_dim, generator=g)
        return out

    def _exact(self, a: Tensor, b: Tensor, msg: str) -> None:
        torch.testing.assert_close(a, b, rtol=self.exact_rtol, atol=self.exact_atol, msg=msg)

    # ---- tests ------------------------------------------------------------------------------

    def test_config_contract(self) -> None:
        check_config_contract(self.config, "backbones", plugins=self.plugins,
                              entry_points=self.entry_points)

    def test_build(self, backbone: Backbone) -> None:
        assert isinstance(backbone, Backbone), f"build() returned {type(backbone).__name__}"
        assert isinstance(backbone.depth, int) and backbone.depth >= 2, (
            f"depth must be an int >= 2 (student layer < teacher layer), got {backbone.depth!r}")
        assert isinstance(backbone.width, int) and backbone.width >= 1

    def test_output_shapes(self, backbone: Backbone, batch: TokenBatch, t: Tensor) -> None:
        layers = tuple(range(1, backbone.depth + 1))
        out = backbone(batch.tokens, t, batch, feature_layers=layers)
        assert out.velocity is not None and out.velocity.shape == batch.tokens.shape, (
            f"velocity {None if out.velocity is None else tuple(out.velocity.shape)}, expected "
            f"{tuple(batch.tokens.shape)}")
        assert out.velocity.dtype == batch.tokens.dtype
        assert bool(torch.isfinite(out.velocity).all())
        assert set(out.features) == set(layers), (
            f"asked for features of blocks {layers}, got {sorted(out.features)}")
        b, n, _ = batch.tokens.shape
        for k, h in out.features.items():
            assert tuple(h.shape) == (b, n, backbone.width), (
                f"features[{k}] is {tuple(h.shape)}, expected {(b, n, backbone.width)}")
        assert not backbone(batch.tokens, t, batch).features, (
            "features returned without being asked for")

    def test_truncated_features_equal_full(self, backbone: Backbone, batch: TokenBatch,
                                           t: Tensor) -> None:
        full = backbone(batch.tokens, t, batch, feature_layers=range(1, backbone.depth + 1))
        for k in range(1, backbone.depth + 1):
            out = backbone(batch.tokens, t, batch, feature_layers=(k,), stop_after=k)
            assert set(out.features) == {k}, (
                f"stop_after={k}, feature_layers=({k},) returned features {sorted(out.features)}")
            if k < backbone.depth:
                assert out.velocity is None, f"stop_after={k} still computed the velocity"
            self._exact(out.features[k], full.features[k],
                        f"features of block {k}: truncated forward != full forward")

    def test_scalar_time_is_homogeneous_time(self, backbone: Backbone, batch: TokenBatch,
                                             t: Tensor) -> None:
        b, n = batch.valid.shape
        layers = (1, backbone.depth)
        a = backbone(batch.tokens, t, batch, feature_layers=layers)
        h = backbone(batch.tokens, t[:, None].expand(b, n).contiguous(), batch,
                     feature_layers=layers)
        self._exact(a.velocity, h.velocity, "a [B] time differs from the same time per token")
        for k in layers:
            self._exact(a.features[k], h.features[k], f"features[{k}]: [B] time != [B, N] time")

    def test_time_is_per_token(self, backbone: Backbone, batch: TokenBatch, t: Tensor) -> None:
        b, n = batch.valid.shape
        j = n // 2
        tt = t[:, None].expand(b, n).clone()
        base = backbone(batch.tokens, tt, batch).velocity
        tt[:, j] = 1.0 - tt[:, j]
        moved = backbone(batch.tokens, tt, batch).velocity
        assert not torch.allclose(base[:, j], moved[:, j], atol=1e-4), (
            "changing one token's time did not change its velocity: per-token time is ignored")

    def test_padding_is_ignored(self, backbone: Backbone, batch: TokenBatch, t: Tensor) -> None:
        """Outputs of valid tokens depend neither on padding tokens (``valid=False``: values,
        times) nor on channels a token's modality does not have."""
        b, n, c = batch.tokens.shape
        valid = torch.ones(b, n, dtype=torch.bool)
        valid[0, -3:] = False
        valid[-1, :2] = False
        padded = attrs.evolve(batch, valid=valid)
        tt = t[:, None].expand(b, n).contiguous()
        layers = tuple(range(1, backbone.depth + 1))
        ref = backbone(padded.tokens, tt, padded, feature_layers=layers)
        g = torch.Generator().manual_seed(3)
        junk = torch.randn(b, n, c, generator=g) * 50
        keep = valid[..., None]
        if batch.channel_valid is not None:
            keep = keep & batch.channel_valid
        x = torch.where(keep, padded.tokens, junk)
        t2 = torch.where(valid, tt, torch.rand(b, n, generator=g))
        got = backbone(x, t2, padded, feature_layers=layers)
        torch.testing.assert_close(got.velocity[valid], ref.velocity[valid], rtol=0,
                                   atol=self.padding_atol,
                                   msg="padding tokens or channels changed valid tokens' velocity")
        for k in layers:
            torch.testing.assert_close(got.features[k][valid], ref.features[k][valid], rtol=0,
                                       atol=self.padding_atol,
                                       msg=f"padding changed valid tokens' features[{k}]")

    def test_labels_and_null_class(self, backbone: Backbone, batch: TokenBatch, t: Tensor
                                   ) -> None:
        if not self.num_classes:
            pytest.skip("unconditional (num_classes = 0)")
        b = batch.tokens.shape[0]
        null = torch.full((b,), self.num_classes, dtype=torch.long)
        real = torch.zeros(b, dtype=torch.long)
        v_null = backbone(batch.tokens, t, attrs.evolve(batch, labels=null)).velocity
        v_real = backbone(batch.tokens, t, attrs.evolve(batch, labels=real)).velocity
        assert bool(torch.isfinite(v_null).all())
        assert not torch.allclose(v_null, v_real, atol=1e-4), "labels do not change the output"
        v_none = backbone(batch.tokens, t, attrs.evolve(batch, labels=None)).velocity
        assert v_none.shape == batch.tokens.shape

    def test_every_parameter_gets_gradient(self, backbone: Backbone, batch: TokenBatch,
                                           t: Tensor) -> None:
        out = backbone(batch.tokens, t, batch)
        out.velocity.square().mean().backward()
        missing = [name for name, p in backbone.named_parameters()
                   if p.requires_grad and (p.grad is None or not bool(p.grad.ne(0).any()))]
        assert not missing, f"parameters without gradient (unused?): {missing}"
        bad = [name for name, p in backbone.named_parameters()
               if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
        assert not bad, f"non-finite gradients: {bad}"

    def test_text_conditions_and_padding_is_ignored(self, backbone: Backbone, batch: TokenBatch,
                                                    t: Tensor) -> None:
        """A real text token changes every sample's velocity, a padded one changes nothing, and
        the empty prompt (``text_mask`` all False) gives finite outputs."""
        if self.text is None:
            pytest.skip("no text stream (text = None)")
        ref = backbone(batch.tokens, t, batch).velocity
        g = torch.Generator().manual_seed(4)

        def changed(where: Tensor) -> TokenBatch:
            fields = {}
            if batch.text_ids is not None:
                other = (batch.text_ids % (self.text.vocab_size - 1)) + 1  # another real id
                fields["text_ids"] = torch.where(where, other, batch.text_ids)
            if batch.text is not None:
                junk = torch.randn(batch.text.shape, generator=g) * 5
                fields["text"] = torch.where(where[..., None], junk, batch.text)
            return attrs.evolve(batch, **fields)

        real = torch.zeros_like(batch.text_mask)
        real[:, 0] = True
        moved = backbone(batch.tokens, t, changed(real)).velocity
        for i in range(moved.shape[0]):
            assert not torch.allclose(moved[i], ref[i], atol=1e-4), (
                f"changing sample {i}'s first text token did not change its velocity")
        pad = ~batch.text_mask
        assert bool(pad.any())
        same = backbone(batch.tokens, t, changed(pad)).velocity
        torch.testing.assert_close(same, ref, rtol=0, atol=self.padding_atol,
                                   msg="a padded text token (text_mask False) changed the output")
        empty = attrs.evolve(batch, text_mask=torch.zeros_like(batch.text_mask))
        v_empty = backbone(batch.tokens, t, empty).velocity
        assert v_empty.shape == batch.tokens.shape and bool(torch.isfinite(v_empty).all())
