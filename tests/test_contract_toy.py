"""The core's toy modality passes the plugin-author contract kit, and the kit catches broken
components (so its checks can fail)."""

import inspect
from pathlib import Path

import attrs
import numpy as np
import pytest
import torch

from selfflow_core.builtin.dit import DiT
from selfflow_core.builtin.toy import ToyModality
from selfflow_core.interfaces import ModalityConfig
from selfflow_core.testing import (
    BackboneContract,
    ModalityContract,
    check_config_contract,
    randomize_parameters,
)


class TestToyModality(ModalityContract):
    config = ToyModality.Config(tokens=12, channels=6, classes=3, count=32, seed=5)
    entry_points = False        # a built-in: independent of whatever else is installed


class TestToyModalityCaptioned(ModalityContract):
    """With a ``captions`` text field (prompt-conditioned runs)."""

    config = ToyModality.Config(tokens=8, channels=8, classes=4, count=16, captions=3)
    entry_points = False


class TestToyModalityUnconditional(ModalityContract):
    config = ToyModality.Config(tokens=8, channels=4, classes=0, count=8)
    num_samples = 3
    entry_points = False


# ---- the kit catches broken components --------------------------------------------------------

def run_check(contract_cls, name, adapter, tmp_path):
    """Call one inherited contract test directly, with fixtures built from ``adapter``."""
    contract = contract_cls()
    encoded = adapter.encode(adapter.open_source("waves").read(0, contract.num_samples))
    fields = {k: torch.from_numpy(np.array(v)) for k, v in encoded.items()}
    values = dict(adapter=adapter, encoded=encoded, fields=fields,
                  batch=adapter.tokenize(fields), tmp_path=tmp_path)
    method = getattr(contract, name)
    method(**{k: values[k] for k in inspect.signature(method).parameters})


class LossyDetokenize(ToyModality):
    def detokenize(self, tokens):
        return tokens * 1.001


class Float64Encode(ToyModality):
    def encode(self, raw):
        return {**raw, "latents": raw["latents"].astype(np.float64)}


class IntPositions(ToyModality):
    def tokenize(self, fields):
        b = super().tokenize(fields)
        return attrs.evolve(b, positions=b.positions.long())


class LabelsOutOfRange(ToyModality):
    def tokenize(self, fields):
        b = super().tokenize(fields)
        return attrs.evolve(b, labels=b.labels + self.num_classes)


class ShortPrompt(ToyModality):
    def prompt(self, n, fields=None):
        b = super().prompt(n, fields)
        return attrs.evolve(b, tokens=b.tokens[:, 1:], positions=b.positions[:, 1:],
                            modality_ids=b.modality_ids[:, 1:], valid=b.valid[:, 1:],
                            condition=b.condition[:, 1:])


class NoFiles(ToyModality):
    def save_samples(self, latents, labels, out_dir):
        return [Path(out_dir) / "missing.png"]


@pytest.mark.parametrize("cls, check", [
    (LossyDetokenize, "test_detokenize_inverts_tokenize"),
    (Float64Encode, "test_encode_matches_fields"),
    (IntPositions, "test_tokenize_gives_valid_batch"),
    (LabelsOutOfRange, "test_tokenize_gives_valid_batch"),
    (ShortPrompt, "test_prompt_matches_tokenize"),
    (NoFiles, "test_save_samples_writes_files"),
])
def test_modality_contract_catches_broken_adapters(cls, check, tmp_path):
    good = ToyModality(TestToyModality.config)
    run_check(TestToyModality, check, good, tmp_path)
    with pytest.raises(AssertionError):
        run_check(TestToyModality, check, cls(TestToyModality.config), tmp_path)


def test_config_check_catches_unregistered_and_mutable_configs():
    @attrs.frozen(kw_only=True)
    class Unregistered(ModalityConfig):
        kind = "unregistered"

    with pytest.raises(AssertionError, match="not registered"):
        check_config_contract(Unregistered(), "modalities", entry_points=False)

    @attrs.define(kw_only=True)
    class Mutable(ModalityConfig):
        kind = "toy"

    with pytest.raises(AssertionError):
        check_config_contract(Mutable(), "modalities", entry_points=False)


class LeakyDiT(DiT):
    """Ignores the valid mask."""

    def forward(self, x, t, batch, **kw):
        return super().forward(x, t, attrs.evolve(batch, valid=torch.ones_like(batch.valid)), **kw)


class SampleTimeDiT(DiT):
    """Uses one time per sample (the first token's)."""

    def forward(self, x, t, batch, **kw):
        if t.dim() == 2:
            t = t[:, :1].expand_as(t)
        return super().forward(x, t, batch, **kw)


class OffByOneDiT(DiT):
    """Reports block k-1 as block k when truncated."""

    def forward(self, x, t, batch, *, feature_layers=(), stop_after=None):
        if stop_after is None:
            return super().forward(x, t, batch, feature_layers=feature_layers)
        out = super().forward(x, t, batch, feature_layers=[k - 1 for k in feature_layers],
                              stop_after=stop_after)
        return attrs.evolve(out, features={k + 1: v for k, v in out.features.items()})


@pytest.mark.parametrize("cls, check", [
    (LeakyDiT, "test_padding_is_ignored"),
    (SampleTimeDiT, "test_time_is_per_token"),
    (OffByOneDiT, "test_truncated_features_equal_full"),
])
def test_backbone_contract_catches_broken_backbones(cls, check):
    contract = BackboneContract()
    contract.config = DiT.Config(depth=3, width=24, heads=2)
    batch = contract.make_batch()
    t = torch.rand(contract.batch_size)
    for model_cls, ok in ((DiT, True), (cls, False)):
        model = randomize_parameters(model_cls(contract.config, token_dims=contract.token_dims,
                                               num_classes=contract.num_classes))
        if ok:
            getattr(contract, check)(model, batch, t)
        else:
            with pytest.raises(AssertionError):
                getattr(contract, check)(model, batch, t)
