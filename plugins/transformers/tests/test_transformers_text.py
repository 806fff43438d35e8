"""Tests of selfflow-transformers on tiny random models built here and saved to tmp directories:
nothing is ever downloaded (the encoders are also built with sockets refused)."""

from __future__ import annotations

import json
import pickle
import shutil
import socket
import sys
from pathlib import Path

import attrs
import pytest
import torch

from selfflow_core import (
    ConfigError,
    SelfFlowError,
    TextEncoder,
    TextEncoderConfig,
    make_converter,
    structure,
    to_data,
)
from selfflow_core.testing import installed_components

transformers = pytest.importorskip("transformers")
from selfflow_transformers import (  # noqa: E402
    AutoTextEncoder,
    CLIPTextEncoder,
    ModelDirError,
    T5TextEncoder,
    model_dir_version,
)

DIST = "selfflow-transformers"
KINDS = {"t5": T5TextEncoder, "clip": CLIPTextEncoder, "auto": AutoTextEncoder}
CAPTIONS = ["a photo of a cat", "", "a red dog on a sofa", "a cat"]  # under 24 tokens each
#: the special tokens each tiny tokenizer adds: T5 ``</s>``; CLIP BOS, EOS; BERT [CLS], [SEP]
SPECIALS = {"t5": 1, "clip": 2, "auto": 2}
EMPTY = 1  # CAPTIONS[EMPTY] is the empty prompt
REAL = [i for i in range(len(CAPTIONS)) if i != EMPTY]
WORDS = "a photo of cat dog red blue on sofa".split()


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def no_network(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise OSError("network access in a test of selfflow-transformers")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def tiny_t5(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.T5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                   num_heads=4)
    return transformers.T5EncoderModel(config).eval(), transformers.ByT5Tokenizer()


def tiny_clip(seed: int = 0):
    """CLIP's own BPE tokenizer over a 512-token byte alphabet (no merges); BOS 512, EOS 513 is
    also the pad token, as in OpenAI's tokenizer, and the highest id (legacy argmax pooling and
    ``eos_token_id`` pooling agree)."""
    from tokenizers.pre_tokenizers import ByteLevel

    chars = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + 256 for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=[])
    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=1000, max_position_embeddings=40, projection_dim=16, bos_token_id=512,
        eos_token_id=513, pad_token_id=513)
    return transformers.CLIPTextModel(config).eval(), tokenizer


def word_tokenizer(template: str, specials: dict[str, int], **names: str):
    """A WordLevel fast tokenizer over :data:`WORDS` (lower-cased, split on whitespace)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = dict(specials)
    for w in WORDS:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(s, i) for s, i in specials.items()
                                         if s in template])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", **names)


def tiny_bert(seed: int = 0, model_class: str = "BertModel"):
    tokenizer = word_tokenizer("[CLS] $A [SEP]",
                               {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3},
                               pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]")
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=37,
                                     max_position_embeddings=64)
    return getattr(transformers, model_class)(config).eval(), tokenizer


BUILDERS = {"t5": tiny_t5, "clip": tiny_clip, "auto": tiny_bert}


def save(model, tokenizer, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """kind -> (model directory, the model as built, its tokenizer as built)."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for kind, build in BUILDERS.items():
        model, tokenizer = build()
        out[kind] = (save(model, tokenizer, root / kind), model, tokenizer)
    return out


@pytest.fixture(scope="module")
def encoders(tiny):
    """kind -> its encoder at max_length 24, batch_size 2 (CAPTIONS span two batches)."""
    return {kind: KINDS[kind].Config(path=str(tiny[kind][0]), max_length=24,
                                     batch_size=2).build() for kind in KINDS}


def reference(kind: str, tiny, captions: list[str], length: int):
    """What the transformers model itself gives: (mask, last hidden state, pooled or None)."""
    _, model, tokenizer = tiny[kind]
    tokens = tokenizer(captions, padding="max_length", truncation=True, max_length=length,
                       return_tensors="pt")
    with torch.no_grad():
        out = model(**tokens)
    pooled = getattr(out, "pooler_output", None) if kind != "t5" else None
    return tokens["attention_mask"].bool(), out.last_hidden_state, pooled


# ---- encoding ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_shapes_spec_and_mask(kind, encoders, tiny):
    enc = encoders[kind]
    assert isinstance(enc, TextEncoder) and enc.trainable is False
    spec = enc.spec()
    pooled_dim = {"t5": 0, "clip": 32, "auto": 32}[kind]
    assert (spec.max_length, spec.dim, spec.vocab_size, spec.pooled_dim) == (24, 32, None,
                                                                             pooled_dim)
    out = enc.encode(CAPTIONS)
    assert out.ids is None
    assert out.mask.shape == (4, 24) and out.mask.dtype == torch.bool
    assert out.embeddings.shape == (4, 24, 32) and out.embeddings.dtype == torch.float32
    if pooled_dim:
        assert out.pooled.shape == (4, pooled_dim) and out.pooled.dtype == torch.float32
    else:
        assert out.pooled is None
    # real tokens first, then padding (right-padded), and padding embeddings are exactly zero
    lengths = out.mask.sum(1)
    assert torch.equal(out.mask, torch.arange(24)[None] < lengths[:, None])
    assert torch.all(out.embeddings[~out.mask] == 0)
    assert torch.all(out.embeddings[out.mask].abs().sum(-1) > 0)
    # a caption's special tokens are real tokens (the tokenizer's attention mask) ...
    assert all(int(lengths[i]) > SPECIALS[kind] for i in REAL)
    # ... but the empty prompt is the null prompt: nothing real, all zeros, whatever the model
    assert int(lengths[EMPTY]) == 0 and torch.all(out.embeddings[EMPTY] == 0)
    if pooled_dim:
        assert torch.all(out.pooled[EMPTY] == 0) and torch.all(out.pooled[REAL].abs().sum(-1) > 0)
    alone = enc.encode(["", ""])
    assert not alone.mask.any() and torch.all(alone.embeddings == 0)


@pytest.mark.parametrize("kind", KINDS)
def test_equals_the_transformers_model_called_directly(kind, encoders, tiny):
    """Against the model object that was saved (so the save/load round trip is covered too):
    the same mask, the same hidden states at real positions, the same pooled output (for every
    caption but the empty prompt, which is zeros by definition)."""
    out = encoders[kind].encode(CAPTIONS)
    mask, hidden, pooled = reference(kind, tiny, [CAPTIONS[i] for i in REAL], 24)
    assert torch.equal(out.mask[REAL], mask)
    torch.testing.assert_close(out.embeddings[REAL][mask], hidden[mask], rtol=1e-5, atol=1e-6)
    if pooled is not None:
        torch.testing.assert_close(out.pooled[REAL], pooled, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_deterministic(kind, encoders, tiny):
    """The same captions give identical outputs, again and from a second build of the same
    config, whatever the batch size."""
    enc = encoders[kind]
    a, b = enc.encode(CAPTIONS), enc.encode(CAPTIONS)
    again = attrs.evolve(enc.config, batch_size=3).build().encode(CAPTIONS)
    for other in (b, again):
        assert torch.equal(a.mask, other.mask)
        torch.testing.assert_close(a.embeddings, other.embeddings, rtol=0, atol=1e-6)
        if a.pooled is not None:
            torch.testing.assert_close(a.pooled, other.pooled, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_padding_does_not_change_real_positions(kind, encoders):
    """All three models mask padded keys (T5 and BERT bidirectionally, CLIP causally too), so
    the embeddings of real tokens (and the pooled output) are the same at max_length 24 and 40,
    and the extra positions are padding (False, zero)."""
    short = encoders[kind].encode(CAPTIONS)
    long = attrs.evolve(encoders[kind].config, max_length=40).build().encode(CAPTIONS)
    assert torch.equal(long.mask[:, :24], short.mask) and not long.mask[:, 24:].any()
    assert torch.all(long.embeddings[:, 24:] == 0)
    torch.testing.assert_close(long.embeddings[:, :24], short.embeddings, rtol=1e-5, atol=1e-5)
    if short.pooled is not None:
        torch.testing.assert_close(long.pooled, short.pooled, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_long_captions_are_truncated_keeping_the_special_tokens(kind, encoders, tiny):
    caption = " ".join(["a red dog"] * 30)
    enc = attrs.evolve(encoders[kind].config, max_length=8).build()
    out = enc.encode([caption])
    assert out.mask.shape == (1, 8) and out.mask.all()
    mask, hidden, _ = reference(kind, tiny, [caption], 8)
    tokenizer = tiny[kind][2]
    ids = tokenizer([caption], truncation=True, max_length=8)["input_ids"][0]
    last = tokenizer.sep_token_id if kind == "auto" else tokenizer.eos_token_id
    assert len(ids) == 8 and ids[-1] == last
    torch.testing.assert_close(out.embeddings, hidden, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dtype_is_the_stored_embeddings_dtype(dtype, encoders):
    full = encoders["clip"].encode(CAPTIONS)
    out = attrs.evolve(encoders["clip"].config, dtype=dtype).build().encode(CAPTIONS)
    want = getattr(torch, dtype)
    assert out.embeddings.dtype == want and out.pooled.dtype == want
    assert torch.equal(out.embeddings, full.embeddings.to(want))
    assert torch.equal(out.pooled, full.pooled.to(want))
    assert attrs.evolve(encoders["clip"].config, dtype=dtype).build().info()["dtype"] == dtype


def test_no_captions(encoders):
    out = encoders["clip"].encode([])
    assert out.mask.shape == (0, 24) and out.embeddings.shape == (0, 24, 32)
    assert out.pooled.shape == (0, 32)
    with pytest.raises(TypeError, match="sequence of captions"):
        encoders["clip"].encode("a cat")


def test_a_model_without_pooler_weights_has_no_pooled_output(tmp_path):
    """A BERT saved without its pooler (BertForMaskedLM) would pool through random weights:
    the encoder reports no pooled output instead."""
    model, tokenizer = tiny_bert(model_class="BertForMaskedLM")
    enc = AutoTextEncoder.Config(path=str(save(model, tokenizer, tmp_path / "mlm")),
                                 max_length=12).build()
    assert enc.spec().pooled_dim == 0 and enc.encode(["a cat"]).pooled is None
    assert enc.info()["name"] == "auto:BertModel"


def test_a_full_t5_checkpoint_loads_its_encoder(tmp_path, tiny):
    torch.manual_seed(0)
    _, t5, tokenizer = tiny["t5"]
    full = transformers.T5ForConditionalGeneration(t5.config).eval()
    enc = T5TextEncoder.Config(path=str(save(full, tokenizer, tmp_path / "full")),
                               max_length=16).build()
    real = [CAPTIONS[i] for i in REAL]
    with torch.no_grad():
        direct = full.get_encoder()(**tokenizer(real, padding="max_length", max_length=16,
                                                truncation=True, return_tensors="pt"))
    out = enc.encode(real)
    torch.testing.assert_close(out.embeddings[out.mask], direct.last_hidden_state[out.mask],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_matches_cpu(kind, encoders):
    cpu = encoders[kind].encode(CAPTIONS)
    cuda = attrs.evolve(encoders[kind].config, device="cuda").build()
    assert next(cuda.model.parameters()).device.type == "cuda"
    out = cuda.encode(CAPTIONS)
    assert out.embeddings.device.type == "cpu" and torch.equal(out.mask, cpu.mask)
    torch.testing.assert_close(out.embeddings, cpu.embeddings, rtol=1e-3, atol=1e-4)
    assert cuda.info() == encoders[kind].info()


# ---- identity ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_info(kind, encoders):
    info = encoders[kind].info()
    model = {"t5": "T5EncoderModel", "clip": "CLIPTextModel", "auto": "BertModel"}[kind]
    assert info["name"] == f"{kind}:{model}"
    assert (info["max_length"], info["dtype"], info["dim"]) == (24, "float32", 32)
    assert info["transformers"] == transformers.__version__
    assert len(info["version"]) == 64 and info["version"] == model_dir_version(
        Path(encoders[kind].config.path))
    assert json.loads(json.dumps(info)) == info  # JSON-safe
    assert encoders[kind].info() == info


def test_info_changes_with_the_weights_not_with_the_path(tmp_path, tiny, encoders):
    moved = shutil.copytree(tiny["t5"][0], tmp_path / "moved")
    same = T5TextEncoder.Config(path=str(moved), max_length=24).build().info()
    assert same == encoders["t5"].info()
    model, tokenizer = tiny_t5(seed=1)  # the same architecture and file sizes, other weights
    other_dir = save(model, tokenizer, tmp_path / "reseeded")
    assert ({p.name: p.stat().st_size for p in other_dir.iterdir()}
            == {p.name: p.stat().st_size for p in Path(tiny["t5"][0]).iterdir()})
    other = T5TextEncoder.Config(path=str(other_dir), max_length=24).build().info()
    assert other["version"] != same["version"]
    assert {k: v for k, v in other.items() if k != "version"} == {
        k: v for k, v in same.items() if k != "version"}
    # the tokenizer's files count too
    config = json.loads((moved / "tokenizer_config.json").read_text())
    config["model_max_length"] = 123
    (moved / "tokenizer_config.json").write_text(json.dumps(config))
    assert model_dir_version(moved) != same["version"]


# ---- errors --------------------------------------------------------------------------------


def not_a_model_dir(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """name -> (path, what the message must say)."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "config-only").mkdir()
    (tmp_path / "config-only" / "config.json").write_text("{}")
    return {
        "missing": (str(tmp_path / "nowhere"), "does not exist"),
        "hub id": ("google-t5/t5-small", "does not exist"),
        "file": (str(tmp_path / "file.txt"), "is not a directory"),
        "empty dir": (str(tmp_path / "empty"), "has no config.json"),
        "no weights": (str(tmp_path / "config-only"), "has no weights"),
        "unset": ("", "is empty"),
    }


@pytest.mark.parametrize("kind", KINDS)
def test_a_bad_path_is_one_clear_error(kind, tmp_path, monkeypatch):
    no_network(monkeypatch)
    for name, (path, says) in not_a_model_dir(tmp_path).items():
        cfg = KINDS[kind].Config(path=path)
        problems = cfg.problems()
        assert len(problems) == 1 and problems[0].startswith(f"path: {path!r} {says}"), name
        assert "expected a local directory written by save_pretrained" in problems[0], name
        with pytest.raises(ModelDirError) as err:
            cfg.build()
        message = str(err.value)
        assert isinstance(err.value, SelfFlowError) and isinstance(err.value, FileNotFoundError)
        assert "\n" not in message and repr(path) in message and says in message, name
        assert message.startswith(f"text encoder {kind!r}: path "), name
        again = pickle.loads(pickle.dumps(err.value))
        assert type(again) is ModelDirError and str(again) == message


def test_the_wrong_kind_of_model_is_one_clear_error(tiny):
    with pytest.raises(ModelDirError, match=r"holds a model of type 'clip_text_model' .*"
                                            r"expected one of \['mt5', 't5', 'umt5'\]"):
        T5TextEncoder.Config(path=str(tiny["clip"][0])).build()
    with pytest.raises(ModelDirError, match="holds a model of type 't5'"):
        CLIPTextEncoder.Config(path=str(tiny["t5"][0])).build()


def test_weights_of_another_architecture_are_refused(tmp_path, tiny):
    """A directory whose weights do not fit its config (random weights otherwise)."""
    bad = shutil.copytree(tiny["auto"][0], tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelDirError, match="has weights that do not fit AutoModel: .* missing"):
        AutoTextEncoder.Config(path=str(bad), max_length=16).build()


def test_max_length_beyond_the_models_positions(tiny):
    cfg = CLIPTextEncoder.Config(path=str(tiny["clip"][0]), max_length=41)
    assert cfg.problems() == [f"max_length: 41 exceeds the 40 positions of the model in "
                              f"{str(tiny['clip'][0])!r}"]
    with pytest.raises(ConfigError, match="max_length: 41 exceeds the 40 positions"):
        cfg.build()
    assert CLIPTextEncoder.Config(path=str(tiny["clip"][0]), max_length=40).problems() == []


def test_field_validators():
    for bad in ({"dtype": "float64"}, {"device": "tpu"}, {"device": "gpu"}, {"max_length": 0},
                {"batch_size": 0}):
        with pytest.raises((ValueError, TypeError)):
            T5TextEncoder.Config(**bad)
    T5TextEncoder.Config(device="cuda:1")  # (the device is used only when built)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")
def test_cuda_without_cuda_is_one_clear_error(tiny):
    with pytest.raises(ConfigError, match="device: 'cuda', but CUDA is not available"):
        T5TextEncoder.Config(path=str(tiny["t5"][0]), device="cuda").build()


def test_loading_is_offline_and_restores_the_environment(tiny, monkeypatch):
    no_network(monkeypatch)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    T5TextEncoder.Config(path=str(tiny["t5"][0])).build()
    import os

    assert "HF_HUB_OFFLINE" not in os.environ and os.environ["TRANSFORMERS_OFFLINE"] == "0"


# ---- registration --------------------------------------------------------------------------


def test_registered_through_the_entry_point():
    """The installed distribution's entry point registers the three kinds (what
    and the contract kit's ``check_discovered``)."""
    import importlib.metadata as md

    eps = [ep for ep in md.entry_points(group="selfflow")
           if ep.dist is not None and ep.dist.name.replace("_", "-") == DIST]
    assert [ep.name for ep in eps] == ["transformers"], "pip install -e plugins/transformers"
    components = installed_components()
    for kind, encoder in KINDS.items():
        assert components.text_encoders.get(kind) is encoder.Config
        provider = components.text_encoders.provider(kind)
        assert (provider.distribution, provider.plugin) == (DIST, "transformers")
    from selfflow_core.testing import check_discovered

    for kind, encoder in KINDS.items():
        check_discovered("text_encoders", kind, DIST, config_class=encoder.Config)


@pytest.mark.parametrize("kind", KINDS)
def test_config_contract(kind, tiny):
    """Frozen, keyword-only, ``kind`` a class variable, and unchanged through the strict
    converter (with the category's base class picking the kind)."""
    cls = KINDS[kind].Config
    cfg = cls(path=str(tiny[kind][0]), max_length=16, dtype="bfloat16", batch_size=3)
    assert isinstance(cfg, TextEncoderConfig) and cls.kind == kind
    assert all(f.kw_only for f in attrs.fields(cls)) and "kind" not in attrs.fields_dict(cls)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        cfg.max_length = 3
    conv = make_converter(installed_components())
    data = to_data(conv, cfg)
    assert data == {"kind": kind, "path": str(tiny[kind][0]), "max_length": 16,
                    "dtype": "bfloat16", "device": "cpu", "batch_size": 3}
    assert structure(conv, json.loads(json.dumps(data)), TextEncoderConfig) == cfg


def test_selfflow_plugins_lists_the_encoders(capsys):
    from selfflow_core.cli.main import main

    assert main(["plugins", "--json"]) == 0
    rows = {row["plugin"]: row for row in json.loads(capsys.readouterr().out)}
    row = rows["transformers"]
    assert row["distribution"] == DIST
    assert sorted(row["components"]) == ["text encoder:auto", "text encoder:clip",
                                         "text encoder:t5"]


def test_importing_the_plugin_does_not_import_transformers():
    import subprocess

    code = ("import sys, selfflow_transformers.plugin; "
            "assert 'transformers' not in sys.modules, 'transformers imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---- end to end: a prompt-conditioned run with a frozen encoder --------------------------------


def toy_prompt_run(store, run_dir, encoder, steps: int = 2):
    """A tiny prompt-conditioned run of the core's toy modality (16 samples, 2 captions each)
    with the frozen ``encoder``."""
    from selfflow_core import (
        CheckpointConfig,
        MMDiT,
        ModalitySpec,
        NullTracker,
        SamplingConfig,
        ToyModality,
        TrainerConfig,
    )

    toy = ToyModality.Config(tokens=4, channels=8, classes=0, count=16, captions=2)
    return TrainerConfig(
        modalities={"toy": ModalitySpec(modality=toy, store=str(store), source="waves",
                                        batch_size=4)},
        backbone=MMDiT.Config(double_blocks=1, single_blocks=2, width=16, heads=2, axes_dim=(8,)),
        text_encoder=encoder, sampling=SamplingConfig(prompts=("two cycles",), count=2, steps=2),
        checkpoint=CheckpointConfig(every=2), tracker=NullTracker.Config(), steps=steps,
        log_every=10, run_dir=str(run_dir))


@pytest.mark.parametrize("kind", ["t5", "clip"])
def test_a_run_precomputes_the_frozen_encoders_output_into_its_store(kind, tiny, tmp_path,
                                                                    monkeypatch):
    """The trainer encodes a captioned store with the encoder's embeddings beside the captions
    (the encoder runs while encoding, never while training), trains on them and samples from
    prompts through the same encoder."""
    from selfflow_core import Trainer, open_store
    from selfflow_core.prompts import TEXT_EMBEDDINGS, TEXT_MASK

    no_network(monkeypatch)
    encoder = KINDS[kind].Config(path=str(tiny[kind][0]), max_length=16)
    cfg = toy_prompt_run(tmp_path / "s.zarr", tmp_path / "run", encoder)
    calls = []
    original = KINDS[kind].encode
    monkeypatch.setattr(KINDS[kind], "encode", lambda self, c: calls.append(len(c))
                        or original(self, c))
    trainer = Trainer(cfg, components=installed_components(), progress=False)
    encoded = sum(calls)
    assert encoded == 16 * 2 + 1   # every caption, once, while encoding; "" once, for the schema
    store = open_store(tmp_path / "s.zarr")
    assert store.schema["empty_prompt"]["length"] == 0  # this plugin's "": no token (zeros)
    dim = encoder.build().spec().dim
    assert store.fields[TEXT_EMBEDDINGS].shape == (2, 16, dim)
    assert store.fields[TEXT_MASK].shape == (2, 16)
    assert store.schema["encoder"]["text_encoder"]["name"].startswith(kind)
    trainer.fit()
    assert trainer.step == 2
    # training read the store; only the final samples' prompts were encoded again
    assert sum(calls) - encoded == 2


def test_selfflow_encode_precomputes_the_store_a_run_with_that_encoder_reuses(tiny, tmp_path,
                                                                            monkeypatch, capsys):
    """``selfflow encode ... text_encoder.kind=t5 text_encoder.path=...`` makes the very store a
    run with that text_encoder would: the run finds it complete and encodes nothing again."""
    from selfflow_core import Trainer, open_store
    from selfflow_core.cli.main import main
    from selfflow_core.prompts import TEXT_EMBEDDINGS

    no_network(monkeypatch)
    store = tmp_path / "s.zarr"
    path = str(tiny["t5"][0])
    assert main(["encode", "toy", "waves", str(store), "tokens=4", "channels=8", "classes=0",
                 "count=16", "captions=2", f"text_encoder.path={path!r}",
                 "text_encoder.kind='t5'", "text_encoder.max_length=16"]) == 0
    made = open_store(store)
    assert made.fields[TEXT_EMBEDDINGS].shape[:2] == (2, 16)
    cfg = toy_prompt_run(store, tmp_path / "run", KINDS["t5"].Config(path=path, max_length=16),
                         steps=1)
    calls = []
    original = KINDS["t5"].encode
    monkeypatch.setattr(KINDS["t5"], "encode", lambda self, c: calls.append(list(c))
                        or original(self, c))
    Trainer(cfg, components=installed_components(), progress=False)
    assert all(c == [""] for c in calls)  # no caption encoded again (only "" for the schema)
    assert open_store(store).schema["config_hash"] == made.schema["config_hash"]
    # a trainable encoder has nothing to precompute: one line, exit status 2, no store
    assert main(["encode", "toy", "waves", str(tmp_path / "b.zarr"), "captions=2",
                 "text_encoder.kind='bytes'"]) == 2
    assert "nothing to precompute" in capsys.readouterr().err
    assert not (tmp_path / "b.zarr").exists()
