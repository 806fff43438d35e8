"""Joint audio-video: one token sequence holds a clip's video tokens and its audio tokens.

A sample is an aligned pair stored in one zarr store: ``video`` (``[T, C, H, W]``, as
:mod:`selfflow_video` makes it), ``audio`` (``[frames, D]`` latent frames, as
:mod:`selfflow_audio` makes them) and ``labels``. :meth:`AudioVideoModality.tokenize` puts the
video's tube tokens first and the audio's frame tokens after them, zero-padded along channels to
``max(C_video, C_audio)`` with ``channel_valid`` marking the real channels, ``modality_ids`` 0
(video) and 1 (audio), and 3-axis positions: video ``(t, row, col)``; audio ``(t, -1, -1)`` with
its time axis in the video's temporal-patch units (a token's start time x fps / temporal_patch),
so tokens that sound and show at the same moment share ``t``. The core builds one input and
output projection per entry of :attr:`AudioVideoModality.token_dims`.

``detokenize`` returns the packed token tensor itself; :meth:`AudioVideoModality.split` turns
it into ``(video, audio)`` and :meth:`save_samples` writes a GIF and a WAV per sample.

Text to audio-video: with ``captions = K`` the ``moving_spoken_digits`` pairs also store ``K``
captions naming the digit, its direction and that its name is spoken
(:mod:`selfflow_audio_video.captions`), and :meth:`AudioVideoModality.prompt_metrics` scores
generated pairs against their prompts with a fixed evaluator
(:mod:`selfflow_audio_video.evaluator`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
from attrs import validators as v
from selfflow_audio import AudioModality
from selfflow_audio.sources import SpokenDigitsSource, TonesSource
from selfflow_video import MovingDigitsSource, VideoModality, write_video_files
from torch import Tensor

from selfflow_audio_video.captions import pair_captions
from selfflow_core import (
    FieldSpec,
    ModalityAdapter,
    ModalityConfig,
    PerKindTimestep,
    Source,
    TokenBatch,
)
from selfflow_core.tokens import (
    CAPTIONS_FIELD,
    Packed,
    caption_array,
    captions_field,
    captions_spec,
    class_labels,
    expand_batch,
    pack,
    split,
)

SOURCES = ("moving_spoken_digits", "moving_tones")
CLASSES = 10


class PairSource(Source):
    """``count`` aligned pairs: pair ``i`` (label ``i % 10``) is moving-digits clip ``i`` (its
    digit is of class ``label``) and the audio clip of the same class: spoken-digit variant
    ``(i // 10) % variants`` (``moving_spoken_digits``) or tones clip ``i`` (``moving_tones``).
    With ``captions`` > 0 (spoken digits only), :meth:`read` also gives that many captions per
    pair: the video's captions of the clip with a spoken part appended
    (:func:`~selfflow_audio_video.captions.pair_captions`)."""

    def __init__(self, video: MovingDigitsSource, audio: SpokenDigitsSource | TonesSource,
                 count: int, captions: int = 0) -> None:
        self.video, self.audio, self.count, self.captions = video, audio, count, captions
        self.spoken = isinstance(audio, SpokenDigitsSource)
        if captions and not self.spoken:
            raise ValueError("audio-video captions say the digit's name is spoken; only "
                             "'moving_spoken_digits' has captions (use captions = 0)")
        extra = f", {captions} captions each" if captions else ""
        self.description = (f"{count} aligned pairs, label = i % 10{extra}: "
                            f"[{video.description}] + [{audio.description}]")

    def __len__(self) -> int:
        return self.count

    def audio_index(self, index: int) -> int:
        if not self.spoken:
            return index
        variants = len(self.audio) // CLASSES
        return (index // CLASSES) % variants * CLASSES + index % CLASSES

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        labels = np.arange(start, stop, dtype=np.int64) % CLASSES
        clips = [self.video.clip(i, first_class=int(k)) for i, k in zip(range(start, stop), labels)]
        waves = self.audio.read_indices([self.audio_index(i) for i in range(start, stop)])
        shape = (0, self.video.frames, self.video.channels, self.video.size, self.video.size)
        out = {"videos": np.stack([c[0] for c in clips]) if clips else np.zeros(shape, np.float32),
               "waves": waves["waves"], "labels": labels}
        if self.captions:
            seed = self.video.seed
            out[CAPTIONS_FIELD] = caption_array(
                [pair_captions(self.video.clip_captions(i, self.captions), int(k), seed, i)
                 for i, k in zip(range(start, stop), labels)], self.captions)
        return out


class AudioVideoModality(ModalityAdapter):
    """Video tokens then audio tokens in one sequence; two token widths (``token_dims``)."""

    name = "audio_video"
    latent_field = "video"  # both `video` and `audio` are generated; see `split`

    @attrs.frozen(kw_only=True)
    class Config(ModalityConfig):
        """- ``video``: a :class:`selfflow_video.VideoModality.Config`; used: ``size``,
          ``frames``, ``channels``, ``patch``, ``temporal_patch``, ``fps``,
          ``condition_first_frame``, ``motion`` (``"compass"`` for text to audio-video).
        - ``audio``: a :class:`selfflow_audio.AudioModality.Config`; used: the log-mel analysis,
          ``frames``, ``frames_per_token``, ``encoder``, and the spoken-digit ``voices``,
          ``speeds``, ``pitches``, ``cache_dir``.
        - ``classes``: 10 (digits) or 0 (unconditional).
        - ``count``: pairs in a built-in source; ``seed``: the moving digits' (and tones') seed.
        - ``digits`` / ``digit_size``: digits per clip (the first one has the pair's class) and
          their side in pixels.
        - ``captions``: captions per pair ``K`` for prompt conditioning (the store's
          ``captions`` field; ``moving_spoken_digits`` only); ``0`` (default): none.

        The nested configs' own ``classes``, ``count``, ``seed``, ``digits``, ``digit_size``,
        ``prompt_source`` and ``captions`` are replaced by the fields above.
        """

        kind = "audio_video"
        video: VideoModality.Config = attrs.field(
            factory=VideoModality.Config, validator=v.instance_of(VideoModality.Config))
        audio: AudioModality.Config = attrs.field(
            factory=AudioModality.Config, validator=v.instance_of(AudioModality.Config))
        classes: int = attrs.field(default=CLASSES)
        count: int = attrs.field(default=1000, validator=v.ge(1))
        seed: int = 0
        digits: int = attrs.field(default=1, validator=v.ge(1))
        digit_size: int = attrs.field(default=10, validator=v.ge(1))
        captions: int = attrs.field(default=0, validator=[v.ge(0), v.le(64)])

        @digit_size.validator
        def _check_digit_size(self, attribute: Any, value: int) -> None:
            video = getattr(self, "video", None)
            if video is not None and value > video.size:
                raise ValueError(f"'digit_size' must be <= video.size {video.size} (got {value})")

        @classes.validator
        def _check_classes(self, attribute: Any, value: int) -> None:
            if value not in (0, CLASSES):
                raise ValueError(f"'classes' must be 0 or {CLASSES} (got {value!r})")

        def default_scheduler(self) -> PerKindTimestep.Config:
            """Each kind of token with its own modality's paper settings (App. B/C, F): video
            tokens (id 0) as ``video.default_scheduler()`` (mask ratio 0.1, logit-normal p(t)
            with shift 2.95 and a 5 % low-SNR tail, the first frame noise-augmented at
            t ~ U[0, 0.2]); audio tokens (id 1) as ``audio.default_scheduler()`` (mask ratio
            0.5, logit-normal p(t) with trainshift 1.0). Each kind draws its own t and s."""
            return PerKindTimestep.Config(kinds=(self.video.default_scheduler(),
                                                 self.audio.default_scheduler()))

        def build(self) -> AudioVideoModality:
            return AudioVideoModality(self)

    def __init__(self, config: Config) -> None:
        self.config = config
        self.video = VideoModality(attrs.evolve(
            config.video, classes=config.classes, count=config.count, seed=config.seed,
            digits=config.digits, digit_size=config.digit_size, prompt_source="", captions=0))
        self.audio = AudioModality(attrs.evolve(config.audio, classes=config.classes,
                                                seed=config.seed, captions=0))
        self._first_frames: dict[int, Tensor] = {}

    # ---- shapes -------------------------------------------------------------------------------

    @property
    def token_dims(self) -> tuple[int, int]:
        """``(C_video, C_audio)``: one backbone projection each (modality ids 0 and 1)."""
        return (self.video.token_dim, self.audio.token_dim)

    @property
    def token_dim(self) -> int:
        """The padded width of the packed tokens: ``max(C_video, C_audio)``."""
        return max(self.token_dims)

    @property
    def num_video_tokens(self) -> int:
        return self.video.num_tokens

    @property
    def num_audio_tokens(self) -> int:
        return self.audio.num_tokens

    @property
    def num_tokens(self) -> int:
        return self.num_video_tokens + self.num_audio_tokens

    @property
    def num_classes(self) -> int:
        return self.config.classes

    def fields(self) -> Mapping[str, FieldSpec]:
        """``video``, ``audio`` and ``labels``; with ``captions`` > 0 also ``captions``."""
        fields = {"video": FieldSpec(shape=self.video.latent_shape, dtype="float32"),
                  "audio": FieldSpec(shape=self.audio.latent_shape, dtype="float32"),
                  "labels": FieldSpec(shape=(), dtype="int64")}
        if self.config.captions:
            fields[CAPTIONS_FIELD] = captions_spec(self.config.captions)
        return fields

    def encoder_info(self) -> Mapping[str, Any]:
        return {"name": "audio_video", "version": "1",
                "settings": {"video": dict(self.video.encoder_info()),
                             "audio": dict(self.audio.encoder_info())}}

    def normalization(self) -> Mapping[str, Any]:
        return {"video": dict(self.video.normalization()),
                "audio": dict(self.audio.normalization())}

    # ---- offline ------------------------------------------------------------------------------

    def sources(self) -> tuple[str, ...]:
        return SOURCES

    def open_source(self, source: str) -> Source:
        if source not in SOURCES:
            raise ValueError(f"audio_video modality: unknown source {source!r}; built-in "
                             f"sources: {', '.join(SOURCES)}")
        video = self._video_source()
        a = self.audio.config
        if source == "moving_spoken_digits":
            audio: SpokenDigitsSource | TonesSource = SpokenDigitsSource(
                samples=a.clip_samples, sample_rate=a.sample_rate, voices=a.voices,
                speeds=a.speeds, pitches=a.pitches, cache_dir=a.cache_dir or None)
        else:
            audio = TonesSource(count=self.config.count, samples=a.clip_samples,
                                sample_rate=a.sample_rate, seed=self.config.seed)
        return PairSource(video, audio, self.config.count, self.config.captions)

    def _video_source(self) -> MovingDigitsSource:
        c = self.video.config
        return MovingDigitsSource(count=self.config.count, size=c.size, frames=c.frames,
                                  channels=c.channels, digits=self.config.digits,
                                  digit_size=self.config.digit_size, seed=self.config.seed,
                                  motion=c.motion)

    def encode(self, raw: Mapping[str, Any]) -> Mapping[str, np.ndarray]:
        video = self.video.encode({"videos": raw["videos"], "labels": raw["labels"]})
        audio = self.audio.encode({"waves": raw["waves"], "labels": raw["labels"]})
        out = {"video": video["latents"], "audio": audio["latents"],
               "labels": np.asarray(raw["labels"], dtype=np.int64)}
        if self.config.captions:  # passed through as they are; tokenize ignores them
            out[CAPTIONS_FIELD] = captions_field(raw, self.config.captions,
                                                 modality="audio_video")
        return out

    # ---- online -------------------------------------------------------------------------------

    def positions(self, n: int, device: torch.device | str | None = None) -> Tensor:
        """``[n, N, 3]``: video ``(t, row, col)``, then audio ``(t, -1, -1)`` with ``t`` = the
        token's start time in video temporal patches."""
        vc = self.video.config
        per_token = self.audio.token_seconds * vc.fps / vc.temporal_patch
        t = torch.arange(self.num_audio_tokens, dtype=torch.float32) * per_token
        audio = torch.stack([t, torch.full_like(t, -1.0), torch.full_like(t, -1.0)], dim=-1)
        return expand_batch(torch.cat([self.video.positions(1)[0], audio]), n, device)

    @property
    def layout(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """``(tokens, channels)`` of the video part and of the audio part, in sequence order."""
        cv, ca = self.token_dims
        return ((self.num_video_tokens, cv), (self.num_audio_tokens, ca))

    def pack(self, video: Tensor, audio: Tensor) -> Packed:
        """Video ``[B, T, C, H, W]`` and audio ``[B, frames, D]`` -> the packed sequence: tokens
        ``[B, N, C]``, ``channel_valid`` and modality ids (0 video, 1 audio)."""
        return pack([self.video.patchify(video.float()), self.audio.patchify(audio.float())])

    def split(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Packed tokens ``[B, N, C]`` -> ``(video [B, T, C, H, W], audio [B, frames, D])``;
        padded channels are dropped."""
        v_tok, a_tok = split(tokens, self.layout)
        return self.video.unpatchify(v_tok), self.audio.unpatchify(a_tok)

    def _batch(self, packed: Packed, labels: Tensor | None) -> TokenBatch:
        n, dev = packed.tokens.shape[0], packed.tokens.device
        condition = torch.cat([self.video.condition_mask(n, dev),
                               torch.zeros(n, self.num_audio_tokens, dtype=torch.bool,
                                           device=dev)], dim=1)
        return TokenBatch(tokens=packed.tokens, positions=self.positions(n, dev),
                          modality_ids=packed.modality_ids,
                          valid=torch.ones(n, self.num_tokens, dtype=torch.bool, device=dev),
                          condition=condition, labels=labels,
                          channel_valid=packed.channel_valid)

    def tokenize(self, fields: Mapping[str, Tensor]) -> TokenBatch:
        return self._batch(self.pack(fields["video"], fields["audio"]),
                           class_labels(fields, self.num_classes))

    def detokenize(self, tokens: Tensor) -> Tensor:
        """The packed tokens themselves (``save_samples`` and :meth:`split` unpack them)."""
        return tokens

    def prompt(self, n: int, fields: Mapping[str, Tensor] | None = None) -> TokenBatch:
        """Zeros to sample into; with ``video.condition_first_frame``, the first temporal patch
        comes from ``fields["video"]``, ``fields["first_frame"]`` or (neither given) the first
        ``n`` moving-digit clips of this modality's source (labels ``0, 1, ...``)."""
        video = torch.zeros(n, *self.video.latent_shape)
        if self.video.config.condition_first_frame:
            given = {}
            if fields is not None and fields.get("video") is not None:
                given["latents"] = fields["video"]
            elif fields is not None and fields.get("first_frame") is not None:
                given["first_frame"] = fields["first_frame"]
            else:
                given["latents"] = self._source_clips(n)
            video = self.video.conditioning_clips(n, given)
        audio = torch.zeros(n, *self.audio.latent_shape)
        return self._batch(self.pack(video, audio), class_labels(fields, self.num_classes))

    def _source_clips(self, n: int) -> Tensor:
        if n not in self._first_frames:
            raw = self._video_source().read(0, n)
            self._first_frames[n] = torch.from_numpy(raw["videos"])
        return self._first_frames[n]

    # ---- samples ------------------------------------------------------------------------------

    def save_samples(self, latents: Tensor, labels: Tensor | None, out_dir: Path) -> list[Path]:
        """Per sample ``sample-000[-label3].gif`` and ``.wav``, plus ``samples_frames.png``
        (all clips' frames, one row per clip)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        video, audio = self.split(latents.detach().float().cpu())
        lab = None if labels is None else labels.detach().cpu().reshape(-1).tolist()
        fps = self.video.config.fps
        paths: list[Path] = []
        wavs = self.audio.write_wavs(audio, labels, out_dir)
        for i, wav in enumerate(wavs):
            stem = f"sample-{i:03d}" + (f"-label{lab[i]}" if lab is not None else "")
            paths += write_video_files(video[i:i + 1], out_dir, fps=fps, stem=stem, strip=False)
            paths.append(wav)
        paths += write_video_files(video, out_dir, fps=fps, stem="samples", gif=False)
        return paths

    def save_prompt_samples(self, latents: Tensor, labels: Tensor | None, prompts,
                            out_dir: Path) -> list[Path]:
        """Per sample ``NNN-<prompt>.gif`` and ``.wav``, ``samples.gif`` and
        ``samples_frames.png`` (each clip's frames under its prompt), ``spectrograms.png``."""
        video, audio = self.split(latents.detach().float().cpu())
        return (self.video.save_prompt_samples(video, None, prompts, out_dir)
                + self.audio.save_prompt_samples(audio, None, prompts, out_dir))

    # ---- prompt-following evaluation -------------------------------------------------------

    def evaluation_prompts(self, n: int) -> list[str]:
        """With captions and one digit per clip: ``n`` prompts ``a {digit} moving {direction},
        and its name spoken`` (every (digit, direction) pair in 80; see
        :func:`~selfflow_audio_video.captions.evaluation_prompts`); else none."""
        if not self.config.captions or self.config.digits != 1:
            return []
        from selfflow_audio_video.captions import evaluation_prompts

        return evaluation_prompts(n)

    def prompt_metrics(self, latents: Tensor, prompts, evaluator=None) -> dict[str, float]:
        """The fixed evaluator (:mod:`selfflow_audio_video.evaluator`) on generated pairs (the
        packed tokens :meth:`detokenize` gives) against their prompts: the video's
        ``digit_acc`` / ``direction_acc`` / ``class_flips``, ``word_acc`` (the prompt's word is
        heard), ``av_agreement`` (the word heard names the digit shown), ``onset_in_clip`` and
        ``onset_s``. ``evaluator``: an :class:`~selfflow_audio_video.evaluator.Evaluator` to
        score with (default: :func:`~selfflow_audio_video.evaluator.evaluator_for` this
        adapter)."""
        from selfflow_audio_video.evaluator import evaluator_for

        video, audio = self.split(latents.detach().float().cpu())
        return (evaluator or evaluator_for(self)).scores(video, audio, list(prompts))
