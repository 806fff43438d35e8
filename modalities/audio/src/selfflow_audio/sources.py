"""Raw audio sources: fixed-length mono clips ``[B, S]`` float32 at the modality's sample rate,
with int64 labels; every clip is a pure function of its index.

- :class:`SpokenDigitsSource` (``spoken_digits``): the words "zero" .. "nine" synthesised by
  espeak-ng in several voices, speeds and pitches (label = the digit). Generated WAVs are cached
  on disk under a name that fully describes them, so a second run reads files only.
- :class:`TonesSource` (``tones``): synthetic class-dependent tones (no dependency at all).
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from selfflow_audio.features import read_wav, resample
from selfflow_core import Source
from selfflow_core import default_cache_dir as default_cache_dir

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DEFAULT_VOICES = ("en-us", "en-gb-x-rp", "en+f2", "en-us+m3", "en+klatt", "en+f4",
                  "en-gb-scotland+m1", "en-029+f3")
DEFAULT_SPEEDS = (150, 200)  # words per minute
DEFAULT_PITCHES = (40, 60)  # espeak-ng -p, 0..99
CACHE_VERSION = "v1"  # bump when the way cached files are made changes
#: the clip starts this long before the first sample above the silence threshold
PRE_ROLL_S = 0.04
PEAK = 0.8


def espeak_binary(source: str = "spoken_digits") -> str:
    """The espeak-ng executable, or a clear error (naming ``source``) saying how to install it."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError(
            f"audio source {source!r} needs the espeak-ng speech synthesiser, which is not "
            "installed (no `espeak-ng` on PATH). Install it: `apt-get install espeak-ng` on "
            "Debian/Ubuntu (the repository's scripts/setup.sh does this), `brew install "
            "espeak-ng` on macOS; or use the 'tones' source.")
    return exe


def fit_clip(x: np.ndarray, samples: int, rate: int, *, trim: bool = True) -> np.ndarray:
    """Trim leading silence to ``PRE_ROLL_S``, peak-normalise to ``PEAK`` and pad with silence
    or crop to exactly ``samples``."""
    x = np.asarray(x, dtype=np.float32)
    peak = float(np.abs(x).max()) if len(x) else 0.0
    if peak > 0:
        if trim:
            loud = np.flatnonzero(np.abs(x) > 0.02 * peak)
            x = x[max(0, int(loud[0]) - int(PRE_ROLL_S * rate)):]
        x = x * (PEAK / peak)
    out = np.zeros(samples, dtype=np.float32)
    out[: min(samples, len(x))] = x[:samples]
    return out


def synthesise(exe: str, word: str, voice: str, speed: int, pitch: int, target: Path,
               sample_rate: int) -> Path:
    """``target``: ``word`` spoken by espeak-ng (``exe``) with ``voice``, ``speed`` (words per
    minute) and ``pitch`` (0..99), resampled to ``sample_rate``, as a 16-bit WAV. Nothing is
    done when ``target`` exists; it is written atomically (concurrent readers never see half a
    file), so several threads or processes may make the same cache."""
    target = Path(target)
    if target.is_file():
        return target
    from selfflow_audio.features import write_wav

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        raw = Path(tmp) / "espeak.wav"
        cmd = [exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(raw), word]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not raw.is_file():
            raise RuntimeError(f"espeak-ng failed for {cmd}: {done.stderr.strip()}")
        x, rate = read_wav(raw)
        part = Path(tmp) / target.name
        write_wav(part, np.clip(resample(x, rate, sample_rate), -1, 1), sample_rate)
        os.replace(part, target)  # atomic: concurrent readers never see half a file
    return target


class SpokenDigitsSource(Source):
    """``10 x len(voices) x len(speeds) x len(pitches)`` spoken digits. Clip ``i`` says digit
    ``i % 10`` (so any 10 consecutive clips hold every class) with variant ``i // 10`` of
    ``itertools.product(voices, speeds, pitches)``.

    espeak-ng writes 22.05 kHz WAVs; they are resampled (band-limited, numpy FFT) to
    ``sample_rate`` and cached as 16-bit WAVs at ``cache_dir/spoken_digits/<version>/<rate>/
    <voice>_s<speed>_p<pitch>_<word>.wav`` (written atomically; missing ones are made in
    parallel on demand). Reading trims leading silence, peak-normalises and pads/crops to
    ``samples``.
    """

    def __init__(self, *, samples: int, sample_rate: int = 16000,
                 voices: tuple[str, ...] = DEFAULT_VOICES,
                 speeds: tuple[int, ...] = DEFAULT_SPEEDS,
                 pitches: tuple[int, ...] = DEFAULT_PITCHES,
                 cache_dir: str | Path | None = None, workers: int = 4) -> None:
        self.exe = espeak_binary()
        if not (voices and speeds and pitches):
            raise ValueError("spoken_digits: voices, speeds and pitches must not be empty")
        self.samples, self.sample_rate = samples, sample_rate
        self.variants = list(itertools.product(voices, speeds, pitches))
        root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.cache = root / "spoken_digits" / CACHE_VERSION / str(sample_rate)
        self.workers = workers
        self.description = (
            f"espeak-ng spoken digits: {len(self)} clips = 10 words x voices {list(voices)} x "
            f"speeds {list(speeds)} x pitches {list(pitches)}, {sample_rate} Hz, {samples} "
            f"samples each; label = digit")

    def __len__(self) -> int:
        return 10 * len(self.variants)

    def key(self, index: int) -> tuple[int, str, int, int]:
        """``(digit, voice, speed, pitch)`` of clip ``index``."""
        voice, speed, pitch = self.variants[index // 10]
        return index % 10, voice, speed, pitch

    def path(self, index: int) -> Path:
        digit, voice, speed, pitch = self.key(index)
        safe = voice.replace("/", "_")
        return self.cache / f"{safe}_s{speed}_p{pitch}_{DIGIT_WORDS[digit]}.wav"

    def _synthesise(self, index: int) -> Path:
        digit, voice, speed, pitch = self.key(index)
        return synthesise(self.exe, DIGIT_WORDS[digit], voice, speed, pitch, self.path(index),
                          self.sample_rate)

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        return self.read_indices(range(start, stop))

    def read_indices(self, indices) -> dict[str, np.ndarray]:
        """Clips at any ``indices`` (missing WAVs are synthesised in parallel first)."""
        indices = [int(i) for i in indices]
        missing = sorted({i for i in indices if not self.path(i).is_file()})
        if missing:
            with ThreadPoolExecutor(max_workers=max(1, self.workers)) as pool:
                list(pool.map(self._synthesise, missing))
        waves = np.zeros((len(indices), self.samples), dtype=np.float32)
        for row, i in enumerate(indices):
            x, rate = read_wav(self.path(i))
            if rate != self.sample_rate:
                x = resample(x, rate, self.sample_rate)
            waves[row] = fit_clip(x, self.samples, self.sample_rate)
        return {"waves": waves, "labels": np.array([i % 10 for i in indices], dtype=np.int64)}


class TonesSource(Source):
    """``count`` synthetic clips needing nothing installed: clip ``i`` (label ``i % 10``) is a
    tone of ``220 * 2 ** (label / 4)`` Hz with two harmonics, a random onset, length, vibrato
    and amplitude drawn from ``numpy.random.default_rng([seed, i])``, plus faint noise."""

    def __init__(self, *, count: int, samples: int, sample_rate: int = 16000,
                 seed: int = 0) -> None:
        self.count, self.samples, self.sample_rate, self.seed = count, samples, sample_rate, seed
        self.description = (f"synthetic tones: {count} clips, 10 pitch classes, {sample_rate} Hz, "
                            f"{samples} samples, seed {seed}")

    def __len__(self) -> int:
        return self.count

    def clip(self, index: int) -> tuple[np.ndarray, int]:
        rng = np.random.default_rng([self.seed, int(index)])
        label = int(index % 10)
        t = np.arange(self.samples) / self.sample_rate
        f0 = 220.0 * 2 ** (label / 4)
        vibrato = 1 + 0.01 * np.sin(2 * np.pi * rng.uniform(3, 7) * t)
        phase = 2 * np.pi * np.cumsum(f0 * vibrato) / self.sample_rate
        x = np.sin(phase) + 0.5 * np.sin(2 * phase) + 0.25 * np.sin(3 * phase)
        duration = self.samples / self.sample_rate
        on = rng.uniform(0.02, 0.2) * duration
        off = on + rng.uniform(0.4, 0.7) * duration
        envelope = np.clip(np.minimum((t - on) / 0.02, (off - t) / 0.05), 0, 1)
        x = x * envelope * rng.uniform(0.3, 1.0) + rng.normal(0, 0.003, self.samples)
        return fit_clip(x, self.samples, self.sample_rate, trim=False), label

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        return self.read_indices(range(start, stop))

    def read_indices(self, indices) -> dict[str, np.ndarray]:
        clips = [self.clip(int(i)) for i in indices]
        waves = (np.stack([c[0] for c in clips]) if clips
                 else np.zeros((0, self.samples), np.float32))
        return {"waves": waves, "labels": np.array([c[1] for c in clips], dtype=np.int64)}
