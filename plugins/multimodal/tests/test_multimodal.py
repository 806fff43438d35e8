"""The composite trainer: image + video + audio + robotics through one shared backbone."""

from __future__ import annotations

import attrs
import numpy as np
import pytest
import torch

from selfflow_core import Components
from selfflow_core.builtin.trackers import NullTracker
from selfflow_core.data.store import open_store
from selfflow_core.testing.fixtures import one_thread as one_thread
from selfflow_core.testing.fixtures import selfflow_cache as selfflow_cache
from selfflow_core.trainer import Trainer

COMPONENTS = Components()
pytestmark = [pytest.mark.skipif(
    "multimodal_tiny" not in COMPONENTS.presets
    or not all(m in COMPONENTS.modalities for m in ("image", "video", "audio", "robotics")),
    reason="needs the image, video, audio and robotics plugins"),
    pytest.mark.usefixtures("one_thread", "selfflow_cache")]  # the audio plugin caches WAVs


def held_out_loss(trainer: Trainer, index: int) -> float:
    """The objective on a fixed batch with a fixed plan and noise (no training involved)."""
    m = trainer.modalities[index]
    store = open_store(m.spec.store)
    fields = {k: torch.from_numpy(v) for k, v in store.read(np.arange(min(16, len(store)))).items()}
    batch = m.adapter.tokenize(fields)
    batch = attrs.evolve(batch, modality_ids=batch.modality_ids + m.id_offset)
    gen = torch.Generator().manual_seed(123)
    plan = m.scheduler.plan(batch, generator=gen)
    noise = torch.randn(batch.tokens.shape, generator=gen)
    with torch.no_grad():
        return float(trainer.model(trainer.teacher, batch, plan, noise).flow)


@pytest.mark.slow
def test_multimodal_tiny_trains_every_modality_through_one_backbone(tmp_path):
    config = COMPONENTS.presets.get("multimodal_tiny")()
    config = attrs.evolve(
        config, run_dir=str(tmp_path / "run"), tracker=NullTracker.Config(), steps=60,
        modalities={name: attrs.evolve(spec, store=str(tmp_path / f"{name}.zarr"))
                    for name, spec in config.modalities.items()})
    trainer = Trainer(config, components=COMPONENTS, progress=False)
    seen = []
    before = [held_out_loss(trainer, i) for i in range(len(trainer.modalities))]
    while trainer.step < config.steps:
        trainer.train_step()
        seen.append(trainer.current_modality)
    after = [held_out_loss(trainer, i) for i in range(len(trainer.modalities))]
    # one backbone, one input and output projection per token stream of every modality
    dims = [d for m in trainer.modalities
            for d in getattr(m.adapter, "token_dims", (m.adapter.token_dim,))]
    assert (len(trainer.backbone.inputs) == len(dims)
            == trainer.backbone.modality_embed.num_embeddings)
    # every modality supplied batches, roughly in proportion to its probability
    shares = {name: seen.count(name) / len(seen) for name in config.modalities}
    assert all(shares[n] > 0 for n in config.modalities), shares
    assert shares["image"] > shares["robotics"]
    # and the shared model got better at each of them
    for m, b, a in zip(trainer.modalities, before, after):
        assert a < b, f"{m.name}: held-out flow loss {b:.4f} -> {a:.4f}"
