"""REPA baseline fidelity (Yu et al., arXiv 2410.06940; ``../shared/research/paper.md`` §3): REPA's
three-layer projector is the head of every REPA run (the core's two-layer head is not built),
an old checkpoint of the two-layer head is a clear error, and the label-free REPA encoder of the
benchmark never reads labels, is deterministic for a seed and trains a REPA run.

Every test can fail: the structure pins fail when the projector changes; the trainer test when
the assembly builds the core's head; the label test when labels reach the label-free training
(the label-trained encoder is checked to change with the labels, so the comparison has power).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import attrs
import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("selfflow_repa")

from selfflow_repa import REPAProjector, REPATeacher, save_encoder  # noqa: E402
from selfflow_repa.label_free import train_masked_autoencoder  # noqa: E402

from selfflow_core.builtin.dit import DiT  # noqa: E402
from selfflow_core.builtin.presets import toy  # noqa: E402
from selfflow_core.builtin.trackers import NullTracker  # noqa: E402
from selfflow_core.config.run import CheckpointConfig, TrainerConfig  # noqa: E402
from selfflow_core.errors import CheckpointError, SelfFlowError  # noqa: E402
from selfflow_core.objective import ObjectiveConfig, ProjectionHead  # noqa: E402
from selfflow_core.runtime import checkpoint  # noqa: E402
from selfflow_core.teachers import EMATeacher, NoTeacher  # noqa: E402
from selfflow_core.testing import TINY_TOY as TOY  # noqa: E402
from selfflow_core.timesteps import SingleTimestep  # noqa: E402
from selfflow_core.trainer import Trainer  # noqa: E402

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import convergence  # noqa: E402
import evaluators  # noqa: E402

FEATURES = 6
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models, 2 shared cores


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("enc") / "encoder.pt"
    save_encoder(nn.Sequential(nn.Linear(TOY.channels, FEATURES), nn.Tanh()), path)
    return path


def repa_config(tmp_path, store, encoder, *, feature_dim=FEATURES, **teacher) -> TrainerConfig:
    """The toy preset as a tiny REPA run (single timestep, gamma 0.5) on the shared toy store."""
    base = toy()
    spec = attrs.evolve(base.modalities["toy"], modality=TOY, batch_size=8, store=store,
                        source="", scheduler=SingleTimestep.Config())
    return attrs.evolve(
        base, modalities={"toy": spec}, backbone=DiT.Config(depth=2, width=16, heads=2),
        teacher=REPATeacher.Config(encoder=str(encoder), feature_dim=feature_dim, **teacher),
        objective=ObjectiveConfig(gamma=0.5, student_layer=1, teacher_layer=2),
        tracker=NullTracker.Config(), sampling=attrs.evolve(base.sampling, count=2, steps=1),
        checkpoint=CheckpointConfig(every=2, keep=2), run_dir=str(tmp_path / "run"),
        log_every=100, steps=2)


# -- the projector ---------------------------------------------------------------------------

def test_repa_projector_is_repas_three_layer_mlp(encoder_file):
    """REPA's ``build_mlp`` for SiT-XL and DINOv2-B: Linear(1152, 2048) - SiLU - Linear(2048,
    2048) - SiLU - Linear(2048, 768), about 8.1M parameters; and what the teacher hands the
    core by default (hidden 2048, three layers)."""
    d, hidden, d_enc = 1152, 2048, 768
    teacher = REPATeacher.Config(encoder=str(encoder_file), feature_dim=d_enc).build()
    for head in (REPAProjector(d, d_enc), teacher.projection_head(d)):
        layers = list(head.children())
        assert [type(m) for m in layers] == [nn.Linear, nn.SiLU, nn.Linear, nn.SiLU, nn.Linear]
        first, _, mid, _, last = layers
        assert [(m.in_features, m.out_features) for m in (first, mid, last)] == [
            (d, hidden), (hidden, hidden), (hidden, d_enc)]
        assert all(m.bias is not None for m in (first, mid, last))
        n = sum(p.numel() for p in head.parameters())
        assert n == d * hidden + hidden + hidden * hidden + hidden + hidden * d_enc + d_enc
        assert n == 8_131_328
        x = torch.randn(2, 3, d)
        torch.testing.assert_close(head(x), last(F.silu(mid(F.silu(first(x))))))
    # the width and the layer count are config fields
    small = REPAProjector(16, 6, hidden=32, layers=2)
    assert [type(m) for m in small] == [nn.Linear, nn.SiLU, nn.Linear]
    assert (small[0].out_features, small[2].in_features, small[2].out_features) == (32, 32, 6)
    assert [type(m) for m in REPAProjector(16, 6, layers=1)] == [nn.Linear]
    # Self-Flow's teachers keep the core's head
    assert EMATeacher.Config().build().projection_head(64) is None
    assert NoTeacher.Config().build().projection_head(64) is None


def test_a_repa_run_trains_repas_projector_and_builds_no_core_head(
        tmp_path, toy_store, encoder_file, monkeypatch):
    """A trainer built from a tiny REPA config holds REPA's projector (default widths) as its
    head, never constructs the core's ``ProjectionHead``, trains it, and saves its keys."""
    built = []
    original = ProjectionHead.__init__

    def spy(self, *a, **k):
        built.append(a)
        original(self, *a, **k)

    monkeypatch.setattr(ProjectionHead, "__init__", spy)
    trainer = Trainer(repa_config(tmp_path, toy_store, encoder_file), progress=False)
    head = trainer.model.objective.head
    assert isinstance(head, REPAProjector) and not isinstance(head, ProjectionHead)
    assert built == []
    assert [(m.in_features, m.out_features) for m in head if isinstance(m, nn.Linear)] == [
        (16, 2048), (2048, 2048), (2048, FEATURES)]
    before = {k: v.clone() for k, v in head.state_dict().items()}
    trainer.fit()
    assert all(math.isfinite(x) for x in trainer.losses) and len(trainer.losses) == 2
    assert all(not torch.equal(before[k], v) for k, v in head.state_dict().items())
    saved = torch.load(checkpoint.path_for(tmp_path / "run" / "checkpoints", 2),
                       weights_only=True)
    assert sorted(saved["head"]) == [f"head.{i}.{p}" for i in (0, 2, 4) for p in ("bias",
                                                                                  "weight")]
    # a Self-Flow run still builds the core's head
    Trainer(attrs.evolve(toy(), modalities={"toy": attrs.evolve(
        toy().modalities["toy"], modality=TOY, store=toy_store, source="")},
        backbone=DiT.Config(depth=2, width=16, heads=2), tracker=NullTracker.Config(),
        objective=ObjectiveConfig(student_layer=1, teacher_layer=2),
        run_dir=str(tmp_path / "sf")), progress=False)
    assert len(built) == 1


def old_checkpoint(tmp_path, toy_store, encoder_file, *, old_config: bool) -> TrainerConfig:
    """A 2-step REPA run whose checkpoint is rewritten as before REPA's projector: the core's
    Linear(d, 2d) - SiLU - Linear(2d, D) head (and, with ``old_config``, the teacher's config
    without the projector fields)."""
    cfg = repa_config(tmp_path, toy_store, encoder_file)
    Trainer(cfg, progress=False).fit()
    path = checkpoint.path_for(tmp_path / "run" / "checkpoints", 2)
    state = torch.load(path, weights_only=False)
    state["head"] = {f"head.{k}": v for k, v in ProjectionHead(16, FEATURES).state_dict().items()}
    if old_config:
        data = json.loads(state["config"])
        for key in ("projector_hidden", "projector_layers"):
            del data["teacher"][key]
        state["config"] = json.dumps(data, sort_keys=True)
    torch.save(state, path)
    return attrs.evolve(cfg, steps=4)


def test_an_old_repa_checkpoint_is_a_clear_error(tmp_path, toy_store, encoder_file):
    """A checkpoint of a REPA run with the old two-layer head does not resume: a
    :class:`CheckpointError` (config drift in ``teacher``, or, where the config matches, the head
    that does not fit), never a RuntimeError traceback. Its backbone still samples."""
    from selfflow_core.eval.samples import load_for_sampling
    from selfflow_core.plugins.manager import Components

    cfg = old_checkpoint(tmp_path / "a", toy_store, encoder_file, old_config=True)
    with pytest.raises(CheckpointError, match="differs in: teacher"):
        Trainer(cfg, progress=False)
    _, _, model = load_for_sampling(tmp_path / "a" / "run", Components())
    assert model.width == 16

    cfg = old_checkpoint(tmp_path / "b", toy_store, encoder_file, old_config=False)
    trainer = Trainer(cfg, progress=False)
    with pytest.raises(CheckpointError, match=r"projection head \(16 -> 32 -> 6\) does not fit "
                                              r"this run's \(16 -> 2048 -> 2048 -> 6\)") as info:
        trainer.resume()
    assert isinstance(info.value, SelfFlowError)


# -- the label-free encoder ------------------------------------------------------------------

@pytest.fixture(scope="module")
def toy_data():
    real = convergence.real_batch(TOY, "waves")
    return real.tokens.float(), real.labels


def test_the_label_free_encoder_never_reads_labels(tmp_path, toy_data):
    """The benchmark's assets with the labels permuted: the label-trained REPA encoder changes
    (the check has power), the label-free one is bit-identical, and equals the one trained from
    the tokens alone (no labels at all)."""
    tokens, labels = toy_data
    perm = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]
    assert not torch.equal(perm, labels)
    metas = [evaluators.build_assets(tmp_path / name, {"modality": "toy"}, tokens, y, steps=20,
                                     label_free=True)
             for name, y in (("labels", labels), ("permuted", perm))]
    key = evaluators.LABEL_FREE_KEY
    assert metas[0]["repa_encoder"]["sha256"] != metas[1]["repa_encoder"]["sha256"]
    from selfflow_repa.teacher import load_encoder

    weights = [load_encoder(tmp_path / n / evaluators.LABEL_FREE_FILE).state_dict()
               for n in ("labels", "permuted")]
    alone, _ = evaluators.train_label_free_encoder(tokens, steps=20, noise=0.05)
    for w in (weights[1], alone.state_dict()):
        assert w.keys() == weights[0].keys()
        assert all(torch.equal(w[k], weights[0][k]) for k in w)
    assert metas[0][key]["sha256"] == metas[1][key]["sha256"]
    # recorded like the label-trained one: hash, settings; the probe reads labels after training
    assert metas[0][key]["sha256"] == evaluators.sha256(tmp_path / "labels" /
                                                       evaluators.LABEL_FREE_FILE)
    assert metas[0][key]["settings"]["steps"] == 20
    assert 0 <= metas[0][key]["probe_heldout_acc"] <= 1


def test_the_label_free_encoder_is_cached_and_guarded(tmp_path, toy_data):
    """Added to a folder that lacks it (the other assets untouched), reused on the next call,
    and a tampered file is refused."""
    tokens, labels = toy_data
    folder = tmp_path / "toy"
    first = evaluators.build_assets(folder, {"modality": "toy"}, tokens, labels, steps=20)
    assert evaluators.LABEL_FREE_KEY not in first
    mtime = (folder / "repa_encoder.pt").stat().st_mtime_ns
    meta = evaluators.build_assets(folder, {"modality": "toy"}, tokens, labels, steps=20,
                                   label_free=True)
    assert {k: meta[k] for k in first} == first
    assert (folder / "repa_encoder.pt").stat().st_mtime_ns == mtime
    assert json.loads((folder / "assets.json").read_text()) == meta
    lf_mtime = (folder / evaluators.LABEL_FREE_FILE).stat().st_mtime_ns
    again = evaluators.build_assets(folder, {"modality": "toy"}, tokens, labels, steps=20,
                                    label_free=True)
    assert again == meta
    assert (folder / evaluators.LABEL_FREE_FILE).stat().st_mtime_ns == lf_mtime
    (folder / evaluators.LABEL_FREE_FILE).write_bytes(b"tampered")
    with pytest.raises(SystemExit, match="label-free"):
        evaluators.build_assets(folder, {"modality": "toy"}, tokens, labels, steps=20,
                                label_free=True)


def test_label_free_features_are_deterministic_for_a_seed(toy_data):
    tokens, _ = toy_data

    def features(seed):
        torch.manual_seed(0)  # the same initial encoder: only the training's seed differs
        enc = evaluators.TokenEncoder(tokens.shape[1], tokens.shape[2], None)
        info = train_masked_autoencoder(enc, tokens, seed=seed, steps=15)
        assert math.isfinite(info["heldout_mse"])
        with torch.no_grad():
            return enc(tokens)

    a, b, c = features(0), features(0), features(1)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    with torch.no_grad():
        torch.manual_seed(0)
        untrained = evaluators.TokenEncoder(tokens.shape[1], tokens.shape[2], None)(tokens)
    assert not torch.allclose(a, untrained)  # it trained


def test_a_repa_run_with_the_label_free_encoder_trains(tmp_path, toy_store, toy_data):
    tokens, labels = toy_data
    meta = evaluators.build_assets(tmp_path / "assets", {"modality": "toy"}, tokens, labels,
                                   steps=20, label_free=True)
    path = tmp_path / "assets" / evaluators.LABEL_FREE_FILE
    cfg = repa_config(tmp_path, toy_store, path, feature_dim=evaluators.REPA_FEATURES,
                      sha256=meta[evaluators.LABEL_FREE_KEY]["sha256"])
    trainer = Trainer(attrs.evolve(cfg, steps=4), progress=False)
    trainer.fit()
    assert len(trainer.losses) == 4 and all(math.isfinite(x) for x in trainer.losses)


def test_benchmark_repa_runs_use_lambda_half_and_one_time_per_sample():
    """The benchmark's REPA runs: lambda (``objective.gamma``) 0.5, one time per sample (no
    dual timesteps), REPA's projector; its two REPA methods differ in the encoder only."""
    setup = convergence.modality_setup("image", 0)
    job = {"setup": setup, "mask_ratio": None, "ema_decay": None, "ema_warmup": None,
           "size": (4, 64), "store": "x.zarr", "batch": 8, "lr": 1e-3, "steps": 10, "seed": 0,
           "run_dir": "r", "args": {"eval_ema": 0.0, "repa_hidden": 2048},
           "encoder": "sup.pt", "encoder_sha256": "a", "encoder_label_free": "free.pt",
           "encoder_label_free_sha256": "b"}
    sup, free = (convergence.make_config({**job, "method": m}).teacher
                 for m in ("repa", "repa_label_free"))
    assert (sup.encoder, sup.sha256, free.encoder, free.sha256) == ("sup.pt", "a", "free.pt", "b")
    assert attrs.evolve(free, encoder="sup.pt", sha256="a") == sup
    assert sup.projector_hidden == 2048 and sup.projector_layers == 3
    for m in ("repa", "repa_label_free"):
        cfg = convergence.make_config({**job, "method": m})
        assert cfg.objective.gamma == 0.5
        assert isinstance(cfg.modalities["data"].scheduler, SingleTimestep.Config)
