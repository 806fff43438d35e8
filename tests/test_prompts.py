"""Prompt conditioning in the core: captions in the store, one drawn per sample and step, the
text attached to the batch, caption dropout to the empty prompt, guidance against it."""

from __future__ import annotations

import attrs
import numpy as np
import pytest
import torch

from selfflow_core import (
    ByteTextEncoder,
    ModalitySpec,
    SamplingConfig,
    StoreError,
    ToyModality,
    TrainerConfig,
    check_store,
    encode_store,
    make_converter,
    open_store,
    to_data,
    validate,
)
from selfflow_core.builtin.toy import toy_captions
from selfflow_core.data.loader import LoaderSource, build_loader
from selfflow_core.data.writer import StoreWriter
from selfflow_core.prompts import CAPTIONS, choose_captions, drop_prompts, empty_prompt, with_text
from selfflow_core.sampling import sample
from selfflow_core.types import BackboneOutput, TokenBatch

pytestmark = pytest.mark.usefixtures("one_thread")
CAPTIONED = ToyModality.Config(tokens=4, channels=8, classes=4, count=64, captions=3)
BYTES = ByteTextEncoder.Config(max_length=32)


@pytest.fixture(scope="module")
def captioned_store(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("captioned") / "toy.zarr"
    encode_store(CAPTIONED.build(), "waves", path,
                 adapter_config=to_data(make_converter(), CAPTIONED), progress=False)
    return str(path)


def test_captions_are_a_text_field_of_the_store(captioned_store):
    store = open_store(captioned_store)
    assert store.schema["fields"][CAPTIONS] == {"shape": [3], "dtype": "str"}
    got = store.read([0, 5, 63])[CAPTIONS]
    want = toy_captions(np.array([0, 1, 3]), 3)
    assert [list(map(str, row)) for row in got] == want.tolist()
    assert got[1, 0] == "a wave of frequency two" and got[1, 2] == ""
    assert check_store(captioned_store) == []


def test_a_text_field_refuses_non_text_values(tmp_path):
    adapter = CAPTIONED.build()
    from selfflow_core.data.check import store_schema

    schema = store_schema(adapter, source="waves", source_description="x",
                          adapter_config=to_data(make_converter(), CAPTIONED))
    batch = adapter.open_source("waves").read(0, 2)
    batch[CAPTIONS] = np.zeros((2, 3))
    with StoreWriter(tmp_path / "s.zarr", schema) as writer, \
            pytest.raises(StoreError, match="'captions': a text field takes str values only"):
        writer.append(batch)


def test_one_nonempty_caption_is_drawn_uniformly():
    captions = np.array([["a", "b", ""], ["", "", ""], ["c", "", ""]], dtype=object)
    draws = [choose_captions(captions, torch.Generator().manual_seed(i)) for i in range(3000)]
    first = [d[0] for d in draws]
    assert set(first) == {"a", "b"} and abs(first.count("a") / 3000 - 0.5) < 0.04
    assert {d[1] for d in draws} == {""}                    # none: the empty prompt
    assert {d[2] for d in draws} == {"c"}


def loader(store: str, seed: int = 0):
    adapter = CAPTIONED.build()
    return build_loader([LoaderSource(store=open_store(store), tokenize=adapter.tokenize,
                                      batch_size=8, text=BYTES.build())], seed=seed)


def test_the_loader_attaches_one_of_each_samples_captions(captioned_store):
    it = iter(loader(captioned_store))
    seen = set()
    for _ in range(8):
        _, batch = next(it)
        assert batch.text_ids.shape == batch.text_mask.shape == (8, 32)
        texts = ByteTextEncoder.decode(batch.text_ids)
        for label, text in zip(batch.labels.tolist(), texts):
            assert text in toy_captions(np.array([label]), 3)[0, :2].tolist()
            seen.add(text.split()[0])
    assert len(seen) >= 2  # different templates are drawn across samples and steps


def test_caption_draws_resume_exactly(captioned_store):
    full = loader(captioned_store)
    it = iter(full)
    ids = [next(it)[1].text_ids for _ in range(6)]
    resumed = loader(captioned_store)
    it = iter(resumed)
    for _ in range(3):
        next(it)
    state = resumed.state_dict()
    again = loader(captioned_store)
    again.load_state_dict(state)
    it = iter(again)
    for want in ids[3:]:
        assert torch.equal(next(it)[1].text_ids, want)
    other = iter(loader(captioned_store, seed=1))
    assert not all(torch.equal(next(other)[1].text_ids, w) for w in ids)


def _text_batch(n: int = 4) -> TokenBatch:
    b = TokenBatch.single(torch.zeros(n, 4, 8), torch.zeros(n, 4, 1))
    return with_text(b, BYTES.build().encode([f"prompt {i}" for i in range(n)]))


def test_dropped_samples_get_the_empty_prompt_and_the_others_keep_theirs():
    batch = _text_batch()
    drop = torch.tensor([True, False, True, False])
    out = drop_prompts(batch, drop)
    assert not out.text_mask[drop].any() and bool((out.text_ids[drop] == 0).all())
    assert torch.equal(out.text_ids[~drop], batch.text_ids[~drop])
    assert torch.equal(out.text_mask[~drop], batch.text_mask[~drop])
    empty = empty_prompt(batch)
    assert not empty.text_mask.any() and torch.equal(empty.tokens, batch.tokens)
    plain = TokenBatch.single(torch.zeros(2, 4, 3), torch.zeros(2, 4, 1))
    assert drop_prompts(plain, torch.tensor([True, True])) is plain


class TextEcho(torch.nn.Module):
    """A 'backbone' whose velocity is the number of real text tokens: records what it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[TokenBatch] = []

    def forward(self, x, t, batch, **_):
        self.seen.append(batch)
        return BackboneOutput(velocity=batch.text_mask.sum(1).float()[:, None, None]
                              .expand_as(x).clone(), features={})


def test_guidance_is_against_the_empty_prompt():
    model, batch = TextEcho(), _text_batch(2)
    out = sample(model, batch, steps=1, cfg_scale=3.0, generator=torch.Generator().manual_seed(0))
    both = model.seen[0]
    assert both.tokens.shape[0] == 4 and not both.text_mask[2:].any()
    assert torch.equal(both.text_ids[:2], batch.text_ids)
    # v = uncond + 3 (cond - uncond) = 3 * n_text: x(0) = x(1) - v
    n = batch.text_mask.sum(1).float()
    x1 = out + 3 * n[:, None, None]
    assert torch.allclose(x1.std(), torch.tensor(1.0), atol=0.5)  # back to the noise


def test_a_prompt_run_is_checked_before_it_starts(core_components, captioned_store, tmp_path):
    spec = ModalitySpec(modality=CAPTIONED, store=captioned_store, batch_size=8)
    cfg = TrainerConfig(modalities={"toy": spec}, text_encoder=BYTES, run_dir=str(tmp_path))
    with pytest.raises(Exception) as info:
        validate(cfg, core_components)
    text = str(info.value)
    assert "$.backbone: the dit backbone has no text stream" in text
    assert "$.sampling.prompts: a run with a text_encoder samples from prompts" in text
    ok = attrs.evolve(cfg, sampling=SamplingConfig(prompts=("one",)))
    assert "sampling.prompts" not in str(_problems(ok, core_components))


def _problems(cfg, components):
    from selfflow_core.config.validate import problems

    return problems(cfg, components)


class FrozenBytes(ByteTextEncoder):
    """A 'frozen' encoder: embeddings are the bytes' one-hot codes scaled by ``scale`` (counts
    its calls, to show training reads the store instead)."""

    trainable = False

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__(ByteTextEncoder.Config(max_length=16))
        self.scale, self.calls = scale, 0

    def spec(self):
        from selfflow_core import TextSpec

        return TextSpec(max_length=16, dim=8)

    def encode(self, captions):
        self.calls += 1
        ids = super().encode(captions)
        emb = torch.nn.functional.one_hot(ids.ids % 8, 8).float() * self.scale
        return attrs.evolve(ids, ids=None, embeddings=emb * ids.mask[..., None])

    def info(self):
        return {"name": "frozen-bytes", "version": "1", "scale": self.scale, "dtype": "float32",
                "max_length": 16, "dim": 8}


def test_a_frozen_encoders_output_is_precomputed_into_the_store(tmp_path):
    from selfflow_core.prompts import TEXT_EMBEDDINGS, TEXT_MASK, WithTextEmbeddings

    encoder = FrozenBytes()
    adapter = WithTextEmbeddings(CAPTIONED.build(), encoder)
    path = tmp_path / "frozen.zarr"
    store = encode_store(adapter, "waves", path, progress=False,
                         adapter_config=to_data(make_converter(), CAPTIONED))
    assert store.fields[TEXT_EMBEDDINGS].shape == (3, 16, 8)
    assert store.fields[TEXT_MASK].dtype == "bool"
    assert store.schema["encoder"]["text_encoder"]["name"] == "frozen-bytes"
    calls = encoder.calls
    it = iter(build_loader([LoaderSource(store=store, tokenize=adapter.tokenize, batch_size=8,
                                         text=encoder)], seed=0))
    _, batch = next(it)
    assert encoder.calls == calls  # read from the store, not encoded again
    assert batch.text_ids is None and batch.text.shape == (8, 16, 8)
    # each sample's text is the encoding of one of its own captions
    for label, emb, mask in zip(batch.labels.tolist(), batch.text, batch.text_mask):
        options = [encoder.encode([c]) for c in toy_captions(np.array([label]), 3)[0, :2]]
        assert any(torch.equal(o.embeddings[0], emb) and torch.equal(o.mask[0], mask)
                   for o in options)
    # a store made by another text encoder is refused, not reused
    with pytest.raises(StoreError, match="different configuration"):
        encode_store(WithTextEmbeddings(CAPTIONED.build(), FrozenBytes(scale=2.0)), "waves",
                     path, progress=False, adapter_config=to_data(make_converter(), CAPTIONED))


def prompt_config(run_dir, store, **changes) -> TrainerConfig:
    from selfflow_core import CheckpointConfig, MMDiT, NullTracker

    toy = attrs.evolve(CAPTIONED, classes=0)
    cfg = TrainerConfig(
        modalities={"toy": ModalitySpec(modality=toy, store=store, source="waves",
                                        batch_size=8)},
        backbone=MMDiT.Config(double_blocks=1, single_blocks=2, width=16, heads=2,
                              axes_dim=(8,)),
        text_encoder=BYTES, sampling=SamplingConfig(prompts=("two cycles",), count=2, steps=2),
        checkpoint=CheckpointConfig(every=3), tracker=NullTracker.Config(), steps=6,
        log_every=100, run_dir=str(run_dir))
    return attrs.evolve(cfg, **changes)


def watch(trainer):
    seen = []
    original = trainer.trained.forward

    def forward(teacher, batch, plan, noise):
        seen.append(batch)
        return original(teacher, batch, plan, noise)

    trainer.trained.forward = forward
    return seen


@pytest.mark.parametrize("rate", [0.0, 1.0])
def test_caption_dropout_empties_the_prompt_the_objective_sees(tmp_path, core_components, rate):
    from selfflow_core import Trainer

    cfg = prompt_config(tmp_path / "run", str(tmp_path / "s.zarr"), caption_dropout=rate,
                        steps=2)
    trainer = Trainer(cfg, components=core_components, progress=False)
    seen = watch(trainer)
    trainer.fit()
    masks = torch.stack([b.text_mask.any(1) for b in seen])
    assert bool(masks.all()) if rate == 0 else not bool(masks.any())


def test_a_prompt_run_resumes_exactly(tmp_path, core_components):
    from selfflow_core import Trainer

    store = str(tmp_path / "s.zarr")
    whole = Trainer(prompt_config(tmp_path / "a", store), components=core_components,
                    progress=False)
    whole.fit()
    first = Trainer(prompt_config(tmp_path / "b", store, steps=3), components=core_components,
                    progress=False)
    first.fit()
    resumed = Trainer(prompt_config(tmp_path / "b", store), components=core_components,
                      progress=False)
    seen = watch(resumed)
    resumed.fit()
    assert resumed.step == 6 and len(seen) == 3
    for (name, a), b in zip(whole.backbone.state_dict().items(),
                            resumed.backbone.state_dict().values()):
        assert torch.equal(a, b), name
    assert any(n.startswith("text") or "txt" in n for n in whole.backbone.state_dict())


def test_a_prompt_run_needs_a_captioned_store(tmp_path, core_components, toy_store):
    from selfflow_core import ConfigError, Trainer

    cfg = prompt_config(tmp_path / "run", toy_store)
    cfg = attrs.evolve(cfg, modalities={"toy": attrs.evolve(cfg.modalities["toy"], source="",
                       modality=ToyModality.Config(tokens=4, channels=3, classes=4,
                                                   count=64))})
    with pytest.raises((ConfigError, StoreError)):
        Trainer(cfg, components=core_components, progress=False)


def test_the_toy_frequency_evaluator_scores_real_and_wrong_waves():
    adapter = CAPTIONED.build()
    raw = adapter.open_source("waves").read(0, 32)
    latents = torch.from_numpy(raw["latents"])
    right = [f"a wave of frequency {['one', 'two', 'three', 'four'][k]}" for k in raw["labels"]]
    wrong = [f"a wave of frequency {['two', 'three', 'four', 'one'][k]}" for k in raw["labels"]]
    assert adapter.prompt_metrics(latents, right)["frequency_acc"] == 1.0
    assert adapter.prompt_metrics(latents, wrong)["frequency_acc"] == 0.0
    assert len(adapter.evaluation_prompts(8)) == 8
    assert ToyModality.Config().build().evaluation_prompts(8) == ()


def test_selfflow_evaluate_scores_a_prompt_run(tmp_path, core_components, capsys):
    import json

    from selfflow_core import Trainer
    from selfflow_core.cli.main import main

    cfg = prompt_config(tmp_path / "run", str(tmp_path / "s.zarr"), steps=2)
    Trainer(cfg, components=core_components, progress=False).fit()
    assert main(["evaluate", str(tmp_path / "run"), "--count", "4", "--steps", "2", "--json",
                 "--out", str(tmp_path / "eval")]) == 0
    out = json.loads(capsys.readouterr().out)
    scores = out["modalities"]["toy"]
    assert scores["prompts"] == 4 and 0.0 <= scores["frequency_acc"] <= 1.0
    assert out["step"] == 2 and out["weights"] == "eval_ema"
    saved = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert saved == out and (tmp_path / "eval" / "toy" / "prompts.json").is_file()
    # a run without prompts: one line, no traceback
    plain = attrs.evolve(cfg, text_encoder=None, run_dir=str(tmp_path / "plain"),
                         backbone=__import__("selfflow_core").DiT.Config(depth=3, width=16,
                                                                        heads=2))
    Trainer(plain, components=core_components, progress=False).fit()
    assert main(["evaluate", str(tmp_path / "plain")]) != 0
    assert "not prompt-conditioned" in capsys.readouterr().err


def test_sampling_evaluate_logs_the_prompt_metrics_of_the_trainers_samples(tmp_path,
                                                                          core_components):
    import json

    from selfflow_core import JsonlTracker, Trainer

    cfg = prompt_config(tmp_path / "run", str(tmp_path / "s.zarr"), steps=2,
                        tracker=JsonlTracker.Config())
    on = attrs.evolve(cfg, sampling=attrs.evolve(cfg.sampling, evaluate=True))
    Trainer(on, components=core_components, progress=False).fit()
    rows = [json.loads(line) for line in
            (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in rows if "eval/toy/frequency_acc" in r]
    assert len(scored) == 1 and scored[0]["step"] == 2
    assert 0.0 <= scored[0]["eval/toy/frequency_acc"] <= 1.0
    off = attrs.evolve(cfg, run_dir=str(tmp_path / "off"))
    Trainer(off, components=core_components, progress=False).fit()
    assert "eval/" not in (tmp_path / "off" / "metrics.jsonl").read_text()


# ---- the empty prompt: the text encoder's encoding of "", stored once with a frozen encoder ----

class FrozenEos(FrozenBytes):
    """A frozen encoder that ends every caption with an end token (as T5 does), so even ``""``
    has one real token with a non-zero embedding, and pools (the mean embedding)."""

    def spec(self):
        from selfflow_core import TextSpec

        return TextSpec(max_length=16, dim=8, pooled_dim=8)

    def encode(self, captions):
        out = super().encode(captions)
        emb, mask = out.embeddings.clone(), out.mask.clone()
        n = mask.sum(1)
        rows = torch.arange(len(captions))
        emb[rows, n.clamp(max=15)] = 0.5 * self.scale   # the end token
        mask[rows, n.clamp(max=15)] = True
        pooled = (emb * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return attrs.evolve(out, embeddings=emb, mask=mask, pooled=pooled)

    def info(self):
        return {**super().info(), "name": "frozen-eos", "pooled_dim": 8}


@attrs.frozen(kw_only=True)
class FrozenEosConfig(ByteTextEncoder.Config):
    kind = "frozen_eos"
    max_length: int = 16

    def build(self):
        return FrozenEos()


class FrozenEosPlugin:
    from selfflow_core import hookimpl as _hookimpl

    @_hookimpl
    def selfflow_register_text_encoders(self, registry):
        registry.add(FrozenEosConfig)


def test_a_frozen_encoders_empty_prompt_is_stored_once_and_checked(tmp_path):
    from selfflow_core.prompts import EMPTY_PROMPT, WithTextEmbeddings, encoding_from_record

    encoder = FrozenEos()
    path = tmp_path / "eos.zarr"
    store = encode_store(WithTextEmbeddings(CAPTIONED.build(), encoder), "waves", path,
                         progress=False, adapter_config=to_data(make_converter(), CAPTIONED))
    record = store.schema[EMPTY_PROMPT]
    assert record["length"] == 1 and record["dim"] == 8
    got, want = encoding_from_record(record, 16), encoder.encode([""])
    assert torch.equal(got.mask, want.mask) and torch.equal(got.embeddings, want.embeddings)
    assert torch.allclose(got.pooled, want.pooled) and float(got.embeddings.abs().sum()) > 0
    assert check_store(path) == []
    # a tampered record is refused before use, naming the entry
    import zarr

    group = zarr.open_group(str(path), mode="r+")
    group.attrs[EMPTY_PROMPT] = {**record, "length": 2}
    assert any("'empty_prompt'" in p and "SHA-256" in p for p in check_store(path))
    with pytest.raises(StoreError, match="empty_prompt"):
        open_store(path)
    del group.attrs[EMPTY_PROMPT]
    assert any("'empty_prompt' is missing" in p for p in check_store(path))


def test_dropout_and_guidance_use_the_stored_empty_prompt(tmp_path):
    from selfflow_core import Components, Trainer, make_plugin_manager
    from selfflow_core.eval.samples import generate
    from selfflow_core.prompts import EMPTY_PROMPT, encoding_from_record

    components = Components(make_plugin_manager([FrozenEosPlugin()]))
    cfg = prompt_config(tmp_path / "run", str(tmp_path / "s.zarr"), caption_dropout=1.0,
                        steps=2, text_encoder=FrozenEosConfig())
    trainer = Trainer(cfg, components=components, progress=False)
    seen = watch(trainer)
    trainer.fit()
    empty = encoding_from_record(open_store(tmp_path / "s.zarr").schema[EMPTY_PROMPT], 16)
    for batch in seen:  # every prompt dropped: each sample sees the encoding of "" (not zeros)
        assert torch.equal(batch.text_mask, empty.mask.expand_as(batch.text_mask))
        assert torch.equal(batch.text, empty.embeddings.expand_as(batch.text))
        assert torch.allclose(batch.text_pooled, empty.pooled.expand_as(batch.text_pooled))
    # guidance: the unconditional half of each model call holds the same encoding
    calls = []
    model = trainer.eval_model()
    original = model.forward

    def forward(x, t, batch, **kw):
        calls.append(batch)
        return original(x, t, batch, **kw)

    model.forward = forward
    sampling = attrs.evolve(cfg.sampling, cfg_scale=2.0, count=2)
    generate(model, trainer.modalities[0], sampling, null_label=model.num_classes,
             device=torch.device("cpu"), text=trainer.text_encoder)
    assert calls and all(torch.equal(c.text[2:], empty.embeddings.expand(2, -1, -1))
                         and torch.equal(c.text_mask[2:], empty.mask.expand(2, -1))
                         for c in calls)


def test_the_empty_prompt_fits_the_batch_and_keeps_pooled_vectors():
    from selfflow_core.interfaces import TextEncoding

    b = TokenBatch.single(torch.zeros(3, 4, 8), torch.zeros(3, 4, 1))
    enc = FrozenEos().encode(["ab", "c", ""])
    batch = with_text(b, enc)
    short = TextEncoding(embeddings=torch.ones(1, 4, 8), mask=torch.tensor([[1, 1, 0, 0]]).bool(),
                         pooled=torch.full((1, 8), 2.0))
    out = empty_prompt(batch, short)
    assert out.text.shape == (3, 16, 8) and out.text_pooled.shape == (3, 8)
    assert out.text_mask.sum(1).tolist() == [2, 2, 2] and float(out.text[:, 4:].abs().sum()) == 0
    assert bool((out.text_pooled == 2.0).all())
    dropped = drop_prompts(batch, torch.tensor([False, True, False]), short)
    assert torch.equal(dropped.text[0], batch.text[0]) and torch.equal(dropped.text[1], out.text[1])
    too_long = TextEncoding(embeddings=torch.ones(1, 20, 8), mask=torch.ones(1, 20).bool())
    with pytest.raises(ValueError, match="more than the batch's 16"):
        empty_prompt(batch, too_long)


def test_an_adapter_with_text_embeddings_pickles_for_encode_workers():
    import pickle

    from selfflow_core.prompts import WithTextEmbeddings

    adapter = WithTextEmbeddings(CAPTIONED.build(), FrozenBytes())
    again = pickle.loads(pickle.dumps(adapter))
    assert again.fields().keys() == adapter.fields().keys()
    assert again.encoder_info() == adapter.encoder_info()
