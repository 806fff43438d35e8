"""A fixed evaluator of text to audio-video: does the clip show the prompted digit, does the
audio say its name, and do the two agree?

It reuses the two modalities' fixed evaluators, unchanged: the video's per-frame digit
classifier and centroid motion (:mod:`selfflow_video.evaluator`) and the audio's spoken-word
classifier over the log-mel latents (:mod:`selfflow_audio.evaluator`, 30 words including the
ten digits' names). Measures of pairs (video ``[B, T, C, H, W]``, audio ``[B, frames, D]``)
against the prompt each was generated from (:func:`~selfflow_audio_video.captions.parse_prompt`):

- ``digit_acc``, ``direction_acc``, ``class_flips``: the video evaluator's, on the prompt's
  unquoted text.
- ``word_acc``: pairs whose audio the word classifier hears as the prompt's word.
- ``av_agreement``: pairs whose heard word is the name of the digit shown (the most frequent
  per-frame class): content in sync, whatever the prompt.
- ``onset_in_clip``: pairs whose audio onset (:func:`onsets`) falls within the video clip
  (``frames / fps`` seconds); ``onset_s``: the mean onset of the pairs with sound.

Silent audio (its loudest frame less than :data:`SILENCE_DB` above the encoder's floor) has no
onset and says no word. Prompts naming no digit, or several, are left out; none left: NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from selfflow_audio import evaluator as audio_ev
from selfflow_audio.evaluator import Classifier, ClassifierConfig, log_mel
from selfflow_video import evaluator as video_ev
from selfflow_video.captions import DIGIT_NAMES
from selfflow_video.evaluator import DigitClassifier, clip_scores
from torch import Tensor

from selfflow_audio_video.captions import parse_prompt, video_part

#: the onset is the first frame within this many dB of the clip's loudest
ONSET_DB = 20.0
#: a clip whose loudest frame is less than this many dB above the encoder's floor is silent
SILENCE_DB = 20.0
_NEPERS = math.log(10) / 10  # dB -> natural log of power


def onsets(latents: Tensor, config: ClassifierConfig) -> Tensor:
    """``[B]`` seconds: the time of the first latent frame (frame ``k`` is centred on
    ``k * hop / sample_rate``) whose power, over all mel bands, is within :data:`ONSET_DB` of
    the clip's loudest frame; NaN for a silent clip."""
    energy = log_mel(torch.as_tensor(latents), config).logsumexp(-1)  # [B, T]
    peak = energy.amax(1)
    first = (energy >= peak[:, None] - ONSET_DB * _NEPERS).float().argmax(1)
    floor = math.log(config.n_mels * config.log_eps)
    seconds = first.double() * config.frame_seconds
    return torch.where(peak >= floor + SILENCE_DB * _NEPERS, seconds, math.nan)


class Evaluator:
    """The two fixed classifiers and the clip's duration (``frames / fps`` seconds)."""

    def __init__(self, digits: DigitClassifier, words: Classifier, clip_seconds: float) -> None:
        self.digits, self.words, self.clip_seconds = digits, words, clip_seconds

    def shown(self, videos: Tensor) -> list[int]:
        """The digit each clip shows: its most frequent per-frame class."""
        return torch.mode(self.digits.classify(videos), dim=1).values.tolist()

    def heard(self, audio: Tensor) -> list[str | None]:
        """The word each clip says; ``None`` for a silent one."""
        words = self.words.judge(audio).words
        silent = torch.isnan(onsets(audio, self.words.config)).tolist()
        return [None if s else w for w, s in zip(words, silent)]

    def scores(self, videos: Tensor, audio: Tensor, prompts: Sequence[str]) -> dict[str, float]:
        """The measures of the module doc."""
        if not len(videos) == len(audio) == len(prompts):
            raise ValueError(f"{len(videos)} clips, {len(audio)} audio clips, {len(prompts)} "
                             f"prompts")
        targets = [parse_prompt(p) for p in prompts]
        keep = [i for i, t in enumerate(targets) if t is not None]
        names = ("digit_acc", "direction_acc", "class_flips", "word_acc", "av_agreement",
                 "onset_in_clip", "onset_s")
        if not keep:
            return dict.fromkeys(names, math.nan)
        videos, audio = torch.as_tensor(videos)[keep], torch.as_tensor(audio)[keep]
        targets = [targets[i] for i in keep]
        out = clip_scores(videos, [video_part(prompts[i]) for i in keep], self.digits)
        heard, shown = self.heard(audio), self.shown(videos)
        onset = onsets(audio, self.words.config)
        sounding = onset[~torch.isnan(onset)]
        out.update(
            word_acc=float(np.mean([h == t.word for h, t in zip(heard, targets)])),
            av_agreement=float(np.mean([h == DIGIT_NAMES[d] for h, d in zip(heard, shown)])),
            onset_in_clip=float((onset < self.clip_seconds).double().mean()),
            onset_s=float(sounding.mean()) if len(sounding) else math.nan)
        return out


def evaluator_for(adapter) -> Evaluator:
    """The default evaluator of an :class:`~selfflow_audio_video.AudioVideoModality`: the video
    digit classifier at its frame and digit size and the word classifier of its audio latents
    (each trained once and cached with its SHA-256, see their modules)."""
    v, c = adapter.video.config, adapter.config
    return Evaluator(video_ev.default_classifier(v.size, c.digit_size),
                     audio_ev.classifier_for(adapter.audio.evaluator_config()),
                     v.frames / v.fps)


def real_pairs(adapter, start: int, stop: int) -> tuple[Tensor, Tensor, list[str]]:
    """Real pairs ``start .. stop`` of the adapter's ``moving_spoken_digits`` source: video,
    audio latents and each pair's first caption."""
    raw = adapter.open_source("moving_spoken_digits").read(start, stop)
    fields = adapter.encode(raw)
    return (torch.from_numpy(fields["video"]), torch.from_numpy(fields["audio"]),
            [str(c[0]) for c in raw["captions"]])


def ceiling(adapter, evaluator: Evaluator, count: int) -> dict[str, dict[str, float]]:
    """The measures on ``count`` real pairs against their own first captions (``real``), with
    the audio of pair ``i + 1`` (``swapped_audio``: another digit's name), and with silent
    audio (``silent``)."""
    videos, audio, prompts = real_pairs(adapter, 0, count)
    c = evaluator.words.config
    silent = torch.full_like(audio, (math.log(c.log_eps) - c.shift) / c.scale)
    return {"real": evaluator.scores(videos, audio, prompts),
            "swapped_audio": evaluator.scores(videos, audio.roll(1, 0), prompts),
            "silent": evaluator.scores(videos, silent, prompts)}
