"""The REPA teacher plugin: discovery, clean-token targets without grads, training through the
Trainer, and clear errors for a bad encoder path or file."""

from __future__ import annotations

import attrs
import pytest
import torch
from selfflow_repa import EncoderError, REPATeacher, file_sha256, save_encoder
from torch import nn

from selfflow_core.builtin.dit import DiT
from selfflow_core.builtin.presets import toy
from selfflow_core.builtin.trackers import NullTracker
from selfflow_core.cli.main import resolve_config
from selfflow_core.config.converter import ConfigError, make_converter, structure, to_data
from selfflow_core.config.run import TrainerConfig
from selfflow_core.eval.diagnostics import objective_metrics
from selfflow_core.objective import ObjectiveConfig
from selfflow_core.plugins.manager import Components
from selfflow_core.testing import TINY_TOY as TOY
from selfflow_core.testing import check_discovered, check_loss_lowered
from selfflow_core.testing.fixtures import one_thread as one_thread
from selfflow_core.testing.fixtures import toy_store as toy_store
from selfflow_core.timesteps import SingleTimestep
from selfflow_core.types import TokenBatch

FEATURES = 6
pytestmark = pytest.mark.usefixtures("one_thread")


class TokenEncoder(nn.Module):
    """Per-token features that also mix in the sequence mean (so they are not token-local)."""

    def __init__(self, channels: int, dim: int) -> None:
        super().__init__()
        self.local = nn.Linear(channels, dim)
        self.glob = nn.Linear(channels, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.local(tokens) + self.glob(tokens.mean(1, keepdim=True)))


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    torch.manual_seed(0)
    module = TokenEncoder(TOY.channels, FEATURES)
    path = tmp_path_factory.mktemp("enc") / "encoder.pt"
    save_encoder(module, path)
    return path, module


def batch(b=3, n=8, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    pos = torch.arange(n, dtype=torch.float32)[None, :, None].expand(b, n, 1)
    return TokenBatch.single(torch.randn(b, n, c, generator=g), pos,
                             labels=torch.zeros(b, dtype=torch.long))


def test_entry_point_registers_the_teacher():
    # entry points on: the installed distribution's `repa`
    components = check_discovered("teachers", "repa", "selfflow-repa",
                                  config_class=REPATeacher.Config)
    assert "teacher:repa" in components.by_plugin()["repa"]


def test_config_round_trips_through_toml_data_and_cli_overrides(encoder_file, tmp_path):
    path, _ = encoder_file
    components = Components()
    conv = make_converter(components)
    cfg = attrs.evolve(toy(), teacher=REPATeacher.Config(encoder=str(path), feature_dim=FEATURES))
    data = to_data(conv, cfg)
    assert data["teacher"] == {"kind": "repa", "encoder": str(path), "feature_dim": FEATURES,
                               "sha256": "", "projector_hidden": 2048, "projector_layers": 3}
    assert structure(conv, data, TrainerConfig) == cfg
    over = resolve_config(components, "toy", [
        f'teacher={{kind="repa", encoder="{path}", feature_dim={FEATURES}}}',
        "modalities.toy.scheduler={kind=\"single\"}", "objective.gamma=0.5"])
    assert isinstance(over.teacher, REPATeacher.Config) and over.objective.gamma == 0.5
    with pytest.raises(ConfigError, match="feature_dim"):
        structure(conv, {**data, "teacher": {"kind": "repa", "encoder": str(path)}}, TrainerConfig)


def test_features_are_the_encoders_of_the_clean_tokens_without_grad(encoder_file):
    path, module = encoder_file
    teacher = REPATeacher.Config(encoder=str(path), feature_dim=FEATURES).build()
    assert teacher.feature_dim == FEATURES and teacher.provides_targets and teacher.model is None
    b = batch()
    b = attrs.evolve(b, tokens=b.tokens.requires_grad_(True))
    noisy_a, noisy_b = torch.randn_like(b.tokens), torch.randn_like(b.tokens)
    ta, tb = torch.full((3, 8), 0.3), torch.full((3, 8), 0.9)
    fa = teacher.features(noisy_a, ta, b, layer=2)
    fb = teacher.features(noisy_b, tb, b, layer=3)
    with torch.no_grad():
        expect = module(b.tokens)
    assert fa.shape == (3, 8, FEATURES)
    torch.testing.assert_close(fa, expect)
    assert torch.equal(fa, fb)  # the noisy view, its time and the layer do not matter
    assert not fa.requires_grad and fa.grad_fn is None
    assert all(not p.requires_grad for p in teacher.encoder.parameters())
    assert teacher.state_dict() == {"encoder_sha256": file_sha256(path)}


def repa_config(tmp_path, store, encoder, *, projector_hidden=2048, projector_layers=3,
                **changes) -> TrainerConfig:
    """The toy preset with a REPA teacher, on the shared toy store (read-only: no source)."""
    base = toy()
    spec = attrs.evolve(base.modalities["toy"], modality=TOY, batch_size=16, store=store,
                        source="", scheduler=SingleTimestep.Config())
    return attrs.evolve(
        base, modalities={"toy": spec}, backbone=DiT.Config(depth=3, width=32, heads=4),
        teacher=REPATeacher.Config(encoder=str(encoder), feature_dim=FEATURES,
                                   projector_hidden=projector_hidden,
                                   projector_layers=projector_layers),
        objective=ObjectiveConfig(gamma=0.5, student_layer=1, teacher_layer=2),
        tracker=NullTracker.Config(), sampling=attrs.evolve(base.sampling, count=2, steps=1),
        run_dir=str(tmp_path / "run"), log_every=5, **changes)


def test_training_through_the_trainer_lowers_the_loss(encoder_file, tmp_path, toy_store):
    from selfflow_core.trainer import Trainer

    path, _ = encoder_file
    # a small two-layer projector (32 -> 64 -> 6, the widths of the core's head): REPA's
    # 2048-wide three-layer one (4M parameters on a 32-wide model) fits these targets within the
    # first step, which leaves this two-window check of the loss nothing to see. REPA's default
    # projector is trained in tests/test_repa_fidelity.py.
    small = {"projector_hidden": 64, "projector_layers": 2}
    trainer = Trainer(repa_config(tmp_path, toy_store, path, steps=40, **small),
                      progress=False)
    assert trainer.model.objective.head[-1].out_features == FEATURES
    summary = trainer.fit()
    assert summary["reason"] == "done" and len(trainer.losses) == 40
    check_loss_lowered(trainer.losses, window=8, ratio=0.8)
    fresh = Trainer(repa_config(tmp_path / "fresh", toy_store, path, steps=1, **small),
                    progress=False)

    def cos(tr):
        return sum(objective_metrics(tr.model, tr.teacher, batch(16, 8, 4, seed),
                                     SingleTimestep.Config().build(), seed=seed)["feature_cos"]
                   for seed in range(3)) / 3

    assert cos(trainer) > cos(fresh) + 0.05  # training aligned the head to the encoder's features


def test_a_missing_encoder_path_is_a_clear_config_error(tmp_path, toy_store):
    from selfflow_core.config.validate import validate as check
    from selfflow_core.trainer import Trainer

    missing = tmp_path / "nope" / "encoder.pt"
    cfg = repa_config(tmp_path, toy_store, missing, steps=2)
    with pytest.raises(ConfigError,
                       match=r"\$\.teacher\.encoder: encoder file .*nope.* does not exist"):
        check(cfg, Components())
    with pytest.raises(ConfigError, match="does not exist"):
        Trainer(cfg, progress=False)
    with pytest.raises(EncoderError, match="does not exist"):
        REPATeacher.Config(encoder=str(missing), feature_dim=4).build()
    with pytest.raises(ValueError, match="empty"):
        REPATeacher.Config(encoder=" ", feature_dim=4)


def test_cli_reports_a_missing_encoder_as_a_user_error(tmp_path, capsys):
    from selfflow_core.cli.main import main as cli_main

    rc = cli_main(["config", "validate", "toy",
                   f'teacher={{kind="repa", encoder="{tmp_path}/missing.pt", feature_dim=8}}'])
    err = capsys.readouterr().err
    assert rc == 2 and "missing.pt" in err and "does not exist" in err and "Traceback" not in err


def test_a_pickle_is_refused_and_wrong_shapes_are_named(tmp_path, encoder_file):
    pickled = tmp_path / "state.pt"
    torch.save({"w": torch.zeros(2)}, pickled)
    with pytest.raises(EncoderError, match="not a TorchScript archive"):
        REPATeacher.Config(encoder=str(pickled), feature_dim=4).build()
    path, _ = encoder_file
    wrong = REPATeacher.Config(encoder=str(path), feature_dim=FEATURES + 1).build()
    with pytest.raises(EncoderError, match=r"expected \(3, 8, 7\)"):
        wrong.features(None, None, batch(), layer=1)
    with pytest.raises(EncoderError, match="SHA-256"):
        REPATeacher.Config(encoder=str(path), feature_dim=FEATURES, sha256="0" * 64).build()


def test_resuming_against_another_encoder_file_fails(tmp_path, encoder_file):
    path, _ = encoder_file
    teacher = REPATeacher.Config(encoder=str(path), feature_dim=FEATURES).build()
    with pytest.raises(EncoderError, match="different|SHA-256"):
        teacher.load_state_dict({"encoder_sha256": "f" * 64})
    teacher.load_state_dict(teacher.state_dict())
