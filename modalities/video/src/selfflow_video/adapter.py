"""The video modality: clips -> latents ``[T, C, H, W]`` -> spatio-temporal patch tokens.

Offline, a source (:mod:`selfflow_video.sources`) yields clips in ``[-1, 1]``; the latents are the
pixels (identity encoder) and ``labels`` pass through. Online, :meth:`VideoModality.tokenize`
cuts a clip into ``temporal_patch x patch x patch`` tubes, ordered time-major then row-major,
each with a 3-D float position ``(t, row, col)`` in patch units. With ``condition_first_frame``
the tokens of the first temporal patch are conditioning (image-to-video): given, out of the
loss and noise-augmented by the default scheduler (``condition_noise``), and
:meth:`VideoModality.prompt` takes them from ``fields``.

With ``captions`` > 0 the moving-digits source also stores ``K`` captions per clip naming each
digit and the direction it moves in (:mod:`selfflow_video.captions`), for text-to-video (and,
with ``condition_first_frame``, image + prompt to video); :meth:`VideoModality.prompt_metrics`
scores generated clips against their prompts with a fixed evaluator
(:mod:`selfflow_video.evaluator`; with two digits per clip, :mod:`selfflow_video.two_digits`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import attrs
import numpy as np
import torch
from attrs import validators as v
from torch import Tensor

from selfflow_core import (
    DualTimestep,
    FieldSpec,
    LogitNormal,
    ModalityConfig,
    Source,
    tile_images,
    to_uint8,
    upscale,
)
from selfflow_core.tokens import (
    CAPTIONS_FIELD,
    PatchAdapter,
    captions_field,
    captions_spec,
)
from selfflow_video.sources import (
    CARTPOLE_CLASSES,
    MOTIONS,
    MOVING_DIGITS_CLASSES,
    CartPoleSource,
    MovingDigitsSource,
)

SOURCES = ("moving_digits", "cartpole")

#: tile uint8 images ``[K, H, W, C]`` into one grid, ``nrow`` per row (the core's helper)
tile = tile_images


def write_video_files(videos: Tensor | np.ndarray, out_dir: Path, *, fps: float,
                      labels: Tensor | None = None, stem: str = "samples",
                      min_cell: int = 64, gif: bool = True, strip: bool = True) -> list[Path]:
    """Write clips ``[B, T, C, H, W]`` (``[-1, 1]``) as ``<stem>.gif`` (all clips tiled in a
    near-square grid, animated at ``fps``) and ``<stem>_frames.png`` (one row per clip, one column
    per frame); ``gif`` / ``strip`` switch either off. With ``labels``, clips are ordered by label
    (stable). Cells are upscaled by nearest neighbour to at least ``min_cell`` px."""
    from PIL import Image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frames = to_uint8(videos)
    if labels is not None and len(frames):
        frames = frames[np.argsort(labels.detach().cpu().reshape(-1).numpy(), kind="stable")]
    frames = upscale(frames, min_cell)
    b, t, c = frames.shape[0], frames.shape[1], frames.shape[-1]
    mode = "L" if c == 1 else "RGB"

    def image(a: np.ndarray):
        return Image.fromarray(a[..., 0] if c == 1 else a, mode)

    paths = []
    if gif:
        ncol = max(1, math.ceil(math.sqrt(max(b, 1))))
        grids = [image(tile_images(frames[:, k], ncol)) for k in range(t)]
        paths.append(out_dir / f"{stem}.gif")
        grids[0].save(paths[-1], save_all=True, append_images=grids[1:], loop=0,
                      duration=max(20, round(1000 / fps)))
    if strip:
        paths.append(out_dir / f"{stem}_frames.png")
        image(tile_images(frames.reshape(b * t, *frames.shape[2:]), t)).save(paths[-1])
    return paths


def slug(text: str, limit: int = 48) -> str:
    """``text`` as a file-name part: lower-case letters, digits and single dashes."""
    out = "".join(ch if ch.isalnum() else "-" for ch in text.lower())
    return "-".join(p for p in out.split("-") if p)[:limit] or "empty"


class VideoModality(PatchAdapter):
    """Clips as ``temporal_patch x patch x patch`` tube tokens with ``(t, row, col)`` positions."""

    name = "video"

    @attrs.frozen(kw_only=True)
    class Config(ModalityConfig):
        """- ``size``: frame side in pixels; a multiple of ``patch``.
        - ``frames``: frames per clip; a multiple of ``temporal_patch``.
        - ``channels``: 1 (grey) or 3 (RGB; the digits are replicated).
        - ``patch`` / ``temporal_patch``: token extent in pixels / frames.
        - ``classes``: class labels (0: unconditional); the null class is ``classes``.
        - ``fps``: playback rate of the written GIFs (and the time axis of audio-video).
        - ``condition_first_frame``: image-to-video; the first temporal patch (the first
          ``temporal_patch`` frames; exactly the first frame when it is 1) is conditioning.
        - ``count``: clips in a built-in source; ``seed``: their seed.
        - ``digits`` / ``digit_size``: digits per moving-digits clip and their side in pixels.
        - ``frame_skip``: CartPole physics steps between frames.
        - ``prompt_source``: where :meth:`prompt` takes first frames when ``fields`` has none
          (only with ``condition_first_frame``): a built-in source; ``""`` = the source this
          adapter last opened, else ``moving_digits``.
        - ``motion``: how moving digits move: ``"diagonal"`` (default; 1-2 px per frame on
          each axis, random signs, so always diagonally, bouncing from any start) or
          ``"compass"`` (along one of 8 compass directions, with a run-up of
          :data:`~selfflow_video.captions.LEAD_FRAMES` frames before the first bounce; the
          text-to-video presets).
        - ``captions``: captions per clip ``K`` for prompt conditioning (the store's
          ``captions`` field, ``[K]`` str), naming each digit and its initial direction
          (``moving_digits`` only); ``0`` (default): none, the store holds only ``latents``
          and ``labels``.
        """

        kind = "video"
        size: int = attrs.field(default=16, validator=v.ge(1))
        frames: int = attrs.field(default=8, validator=v.ge(1))
        channels: int = attrs.field(default=1)
        patch: int = attrs.field(default=4, validator=v.ge(1))
        temporal_patch: int = attrs.field(default=2, validator=v.ge(1))
        classes: int = attrs.field(default=10, validator=v.ge(0))
        fps: float = attrs.field(default=8.0, validator=v.gt(0))
        condition_first_frame: bool = False
        count: int = attrs.field(default=2048, validator=v.ge(1))
        seed: int = 0
        digits: int = attrs.field(default=2, validator=v.ge(1))
        digit_size: int = attrs.field(default=8, validator=v.ge(1))
        frame_skip: int = attrs.field(default=4, validator=v.ge(1))
        prompt_source: str = attrs.field(default="")
        motion: Literal["diagonal", "compass"] = attrs.field(default="diagonal",
                                                             validator=v.in_(MOTIONS))
        captions: int = attrs.field(default=0, validator=[v.ge(0), v.le(64)])

        @channels.validator
        def _check_channels(self, attribute: Any, value: int) -> None:
            if value not in (1, 3):
                raise ValueError(f"'channels' must be 1 (grey) or 3 (RGB) (got {value!r})")

        @size.validator
        def _check_size(self, attribute: Any, value: int) -> None:
            if value % self.patch:
                raise ValueError(f"'size' must be a multiple of patch {self.patch} (got {value})")

        @frames.validator
        def _check_frames(self, attribute: Any, value: int) -> None:
            if value % self.temporal_patch:
                raise ValueError(f"'frames' must be a multiple of temporal_patch "
                                 f"{self.temporal_patch} (got {value})")
            if getattr(self, "condition_first_frame", False) and value == self.temporal_patch:
                raise ValueError("'frames' must exceed temporal_patch when condition_first_frame "
                                 "is on (nothing would be left to generate)")

        @digit_size.validator
        def _check_digit_size(self, attribute: Any, value: int) -> None:
            if value > self.size:
                raise ValueError(f"'digit_size' must be <= size {self.size} (got {value})")

        @prompt_source.validator
        def _check_prompt_source(self, attribute: Any, value: str) -> None:
            if value and value not in SOURCES:
                raise ValueError(f"'prompt_source' must be '' or one of {', '.join(SOURCES)} "
                                 f"(got {value!r})")

        def default_scheduler(self) -> DualTimestep.Config:
            """Paper App. A.2-A.3 (WAN2.2 video): mask ratio 0.1 (temporal redundancy),
            logit-normal p(t) with shift 2.95 and 5 % of draws from U[0.95, 1] (low SNR); with
            ``condition_first_frame``, the first frame noise-augmented at t ~ U[0, 0.2]
            (App. E/F; no conditioning tokens otherwise, and the setting does nothing)."""
            return DualTimestep.Config(
                distribution=LogitNormal.Config(shift=2.95, tail_fraction=0.05), mask_ratio=0.1,
                condition_noise=0.2)

        def build(self) -> VideoModality:
            return VideoModality(self)

    def __init__(self, config: Config) -> None:
        self.config = config
        self._opened: str | None = None
        self._prompt_cache: dict[tuple[str, int], Tensor] = {}

    # ---- shapes -------------------------------------------------------------------------------

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        c = self.config
        return (c.frames, c.channels, c.size, c.size)

    @property
    def grid(self) -> tuple[int, int, int]:
        """Tokens along time, rows and columns."""
        c = self.config
        return c.frames // c.temporal_patch, c.size // c.patch, c.size // c.patch

    @property
    def tokens_per_frame_patch(self) -> int:
        """Tokens of one temporal patch (the conditioning tokens with ``condition_first_frame``)."""
        _, gh, gw = self.grid
        return gh * gw

    @property
    def num_classes(self) -> int:
        return self.config.classes

    def encoder_info(self) -> Mapping[str, Any]:
        c = self.config
        return {"name": "pixel", "version": "1",
                "settings": {"frames": c.frames, "size": c.size, "channels": c.channels}}

    # ---- offline ------------------------------------------------------------------------------

    def fields(self) -> Mapping[str, FieldSpec]:
        """``latents`` and ``labels``; with ``captions`` > 0 also ``captions`` (``[K]`` str)."""
        fields = dict(super().fields())
        if self.config.captions:
            fields[CAPTIONS_FIELD] = captions_spec(self.config.captions)
        return fields

    def sources(self) -> tuple[str, ...]:
        return SOURCES

    def open_source(self, source: str) -> Source:
        c = self.config
        if source == "moving_digits":
            if c.classes and c.classes < MOVING_DIGITS_CLASSES:
                raise ValueError(f"video source 'moving_digits' has {MOVING_DIGITS_CLASSES} "
                                 f"classes but classes={c.classes}")
            src: Source = MovingDigitsSource(
                count=c.count, size=c.size, frames=c.frames, channels=c.channels,
                digits=c.digits, digit_size=c.digit_size, seed=c.seed, motion=c.motion,
                captions=c.captions)
        elif source == "cartpole":
            if c.captions:
                raise ValueError(f"video source 'cartpole' has no captions, but the config asks "
                                 f"for {c.captions} per clip; use 'moving_digits' or captions = 0")
            if c.classes and c.classes < CARTPOLE_CLASSES:
                raise ValueError(f"video source 'cartpole' has {CARTPOLE_CLASSES} classes but "
                                 f"classes={c.classes}")
            src = CartPoleSource(count=c.count, size=c.size, frames=c.frames, channels=c.channels,
                                 frame_skip=c.frame_skip, seed=c.seed)
        else:
            raise ValueError(f"video modality: unknown source {source!r}; built-in sources: "
                             f"{', '.join(SOURCES)}")
        self._opened = source
        return src

    def encode(self, raw: Mapping[str, Any]) -> Mapping[str, np.ndarray]:
        videos = np.asarray(raw["videos"], dtype=np.float32)
        if videos.shape[1:] != self.latent_shape:
            raise ValueError(f"video: clips have shape {videos.shape[1:]}, the config wants "
                             f"{self.latent_shape}")
        out = {"latents": np.ascontiguousarray(videos),
               "labels": np.asarray(raw["labels"], dtype=np.int64)}
        if self.config.captions:  # passed through as they are; tokenize ignores them
            out[CAPTIONS_FIELD] = captions_field(raw, self.config.captions, modality="video")
        return out

    # ---- online -------------------------------------------------------------------------------

    @property
    def patch(self) -> tuple[int, int, int, int]:
        """The tube of one token over ``(T, C, H, W)``: ``(temporal_patch, C, patch, patch)``."""
        c = self.config
        return (c.temporal_patch, c.channels, c.patch, c.patch)

    def condition_mask(self, n: int, device: torch.device | str | None = None) -> Tensor:
        """``[n, N]`` bool: the conditioning tokens (the first temporal patch, when on)."""
        mask = torch.zeros(n, self.num_tokens, dtype=torch.bool, device=device)
        if self.config.condition_first_frame:
            mask[:, : self.tokens_per_frame_patch] = True
        return mask

    def conditioning_clips(self, n: int, fields: Mapping[str, Tensor] | None = None) -> Tensor:
        """``[n, T, C, H, W]`` clips whose first temporal patch is the conditioning (the rest is
        zero). From ``fields["latents"]`` (clips), ``fields["first_frame"]`` (``[n, C, H, W]``,
        repeated over the temporal patch, or ``[n, pt, C, H, W]``), else the first ``n`` clips of
        the prompt source (their labels cycle ``0, 1, ...`` like the trainer's sample labels)."""
        pt = self.config.temporal_patch
        _, ch, h, w = self.latent_shape
        fields = fields or {}
        if fields.get(self.latent_field) is not None:
            first = fields[self.latent_field][:n, :pt]
        elif fields.get("first_frame") is not None:
            first = fields["first_frame"][:n]
            if first.dim() == 4:
                first = first[:, None].expand(-1, pt, -1, -1, -1)
        else:
            first = self._source_first_frames(n)
        first = first.float().cpu()
        if tuple(first.shape) != (n, pt, ch, h, w):
            raise ValueError(f"video prompt: conditioning frames have shape {tuple(first.shape)}, "
                             f"expected {(n, pt, ch, h, w)}")
        clips = torch.zeros(n, *self.latent_shape)
        clips[:, :pt] = first
        return clips

    def _source_first_frames(self, n: int) -> Tensor:
        name = self.config.prompt_source or self._opened or "moving_digits"
        key = (name, n)
        if key not in self._prompt_cache:
            opened = self._opened
            src = self.open_source(name)
            self._opened = opened
            if len(src) < n:
                raise ValueError(f"video prompt: source {name!r} holds {len(src)} clips, fewer "
                                 f"than the {n} asked for")
            clips = self.encode(src.read(0, n))["latents"]
            self._prompt_cache[key] = torch.from_numpy(clips[:, : self.config.temporal_patch])
        return self._prompt_cache[key]

    def prompt_tokens(self, n: int, fields: Mapping[str, Tensor] | None = None) -> Tensor:
        if self.config.condition_first_frame:
            return self.patchify(self.conditioning_clips(n, fields))
        return super().prompt_tokens(n, fields)

    # ---- samples ------------------------------------------------------------------------------

    def save_samples(self, latents: Tensor, labels: Tensor | None, out_dir: Path) -> list[Path]:
        """Write ``samples.gif`` (clips tiled, ordered by label when given) and
        ``samples_frames.png`` (one row per clip, one column per frame)."""
        return write_video_files(latents, Path(out_dir), fps=self.config.fps, labels=labels)

    def save_prompt_samples(self, latents: Tensor, labels: Tensor | None, prompts,
                            out_dir: Path) -> list[Path]:
        """``samples.gif`` (all clips tiled), ``samples_frames.png`` (one row per clip, its
        prompt written above it with Pillow's bundled font) and one ``NNN-<prompt>.gif`` per
        clip, named after its prompt."""
        from PIL import Image, ImageDraw, ImageFont

        out_dir = Path(out_dir)
        paths = write_video_files(latents, out_dir, fps=self.config.fps, strip=False)
        frames = upscale(to_uint8(latents), 48)
        b, t, h, w, c = frames.shape
        font = ImageFont.load_default(size=11)
        band = 16
        rows = []
        for i, prompt in enumerate(prompts):
            strip = tile_images(frames[i], t)
            row = Image.new("RGB", (strip.shape[1], strip.shape[0] + band), (255, 255, 255))
            row.paste(Image.fromarray(strip[..., 0] if c == 1 else strip).convert("RGB"),
                      (0, band))
            ImageDraw.Draw(row).text((3, 2), f"{i:03d}  {prompt}", fill=(0, 0, 0), font=font)
            rows.append(np.asarray(row))
        if rows:
            path = out_dir / "samples_frames.png"
            Image.fromarray(np.concatenate(rows, axis=0)).save(path)
            paths.append(path)
        for i, prompt in enumerate(prompts):
            paths += write_video_files(latents[i:i + 1], out_dir, fps=self.config.fps,
                                       stem=f"{i:03d}-{slug(prompt)}", strip=False)
        return paths

    # ---- prompt-following evaluation -------------------------------------------------------

    def evaluation_prompts(self, n: int) -> list[str]:
        """With captions and one digit per clip: ``n`` prompts ``a {digit} moving
        {direction}``, digit ``i % 10`` and direction ``(i // 10) % 8`` (every pair in 80), for
        the fixed evaluator (:mod:`selfflow_video.evaluator`). With two ``"compass"`` digits:
        ``n`` prompts naming two different digits moving in two different directions
        (:func:`~selfflow_video.two_digits.two_digit_prompts`, scored by
        :mod:`selfflow_video.two_digits`; the ``"diagonal"`` motion never shows 4 of the 8
        directions, and may bounce within the frames the direction is measured on). Else none."""
        c = self.config
        if c.captions and c.digits == 1:
            from selfflow_video.evaluator import evaluation_prompts

            return evaluation_prompts(n)
        if c.captions and c.digits == 2 and c.motion == "compass":
            from selfflow_video.two_digits import two_digit_prompts

            return two_digit_prompts(n)
        return []

    def prompt_metrics(self, latents: Tensor, prompts, evaluator=None) -> dict[str, float]:
        """The fixed evaluator on generated clips against each prompt's digit and direction:
        ``digit_acc`` (frames a fixed classifier, trained once and cached with its SHA-256,
        reads as the prompt's digit), ``direction_acc`` (clips whose intensity centroid moves
        the prompt's way over the first frames) and ``class_flips`` (consecutive frame pairs
        whose digit changes). See :mod:`selfflow_video.evaluator`. With two digits per clip,
        each digit is segmented and tracked, and the same classifier reads each one:
        ``digit_acc``, ``direction_acc``, ``binding_acc`` (the digit moving each prompted way is
        the prompted one), ``class_flips`` per track and ``overlap_frames`` (see
        :mod:`selfflow_video.two_digits`). ``evaluator``: a
        :class:`~selfflow_video.evaluator.DigitClassifier` to score with (default: the default
        classifier of the frames' size, or of the crops' with two digits)."""
        c = self.config
        if c.digits == 2:
            from selfflow_video.two_digits import two_digit_scores

            return two_digit_scores(latents.detach().float().cpu(), list(prompts), evaluator,
                                    digit_size=c.digit_size)
        from selfflow_video.evaluator import clip_scores, default_classifier

        return clip_scores(latents.detach().float().cpu(), list(prompts),
                           evaluator or default_classifier(c.size, c.digit_size))
