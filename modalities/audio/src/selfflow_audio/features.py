"""Signal processing in plain torch (no torchaudio): a mel filterbank, log-mel spectrograms,
Griffin-Lim phase reconstruction, resampling, and 16-bit WAV files through the stdlib ``wave``."""

from __future__ import annotations

import functools
import math
import wave
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


def hz_to_mel(f: Tensor | float) -> Tensor:
    """HTK mel scale: ``2595 log10(1 + f / 700)``."""
    return 2595.0 * torch.log10(1.0 + torch.as_tensor(f, dtype=torch.float64) / 700.0)


def mel_to_hz(m: Tensor | float) -> Tensor:
    return 700.0 * (10.0 ** (torch.as_tensor(m, dtype=torch.float64) / 2595.0) - 1.0)


@functools.cache
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float = 0.0,
                   f_max: float | None = None) -> Tensor:
    """``[n_mels, n_fft // 2 + 1]`` float32 triangular filters, equally spaced on the HTK mel
    scale between ``f_min`` and ``f_max`` (default: Nyquist), each peaking at 1."""
    f_max = sample_rate / 2 if f_max is None else f_max
    bins = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    edges = mel_to_hz(torch.linspace(float(hz_to_mel(f_min)), float(hz_to_mel(f_max)),
                                     n_mels + 2, dtype=torch.float64))
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (bins[None] - lo) / (mid - lo)
    down = (hi - bins[None]) / (hi - mid)
    fb = torch.clamp(torch.minimum(up, down), min=0.0).float()
    fb.requires_grad_(False)
    return fb


@functools.cache
def _window(n_fft: int) -> Tensor:
    return torch.hann_window(n_fft, dtype=torch.float32)


def stft(x: Tensor, n_fft: int, hop: int) -> Tensor:
    """Complex STFT ``[B, n_fft/2+1, 1 + S/hop]`` of waveforms ``[B, S]`` (Hann, centred)."""
    return torch.stft(x.float(), n_fft, hop, window=_window(n_fft).to(x.device), center=True,
                      return_complex=True)


def istft(spec: Tensor, n_fft: int, hop: int, length: int) -> Tensor:
    return torch.istft(spec, n_fft, hop, window=_window(n_fft).to(spec.device), center=True,
                       length=length)


def mel_power(x: Tensor, *, sample_rate: int, n_fft: int, hop: int, n_mels: int) -> Tensor:
    """Mel power spectrogram ``[B, frames, n_mels]`` (time-major) of waveforms ``[B, S]``."""
    fb = mel_filterbank(sample_rate, n_fft, n_mels).to(x.device)
    power = stft(x, n_fft, hop).abs().square()  # [B, F, frames]
    return torch.einsum("mf,bft->btm", fb, power)


def griffin_lim(magnitude: Tensor, *, n_fft: int, hop: int, length: int, iters: int = 32,
                momentum: float = 0.99, generator: torch.Generator | None = None) -> Tensor:
    """Waveforms ``[B, length]`` whose STFT magnitude approximates ``magnitude`` ``[B, F, T]``:
    the fast Griffin-Lim algorithm (Perraudin et al. 2013; ``momentum`` 0 is plain Griffin-Lim),
    starting from random phases (seeded by ``generator``)."""
    phase = torch.rand(magnitude.shape, generator=generator, dtype=torch.float32) * 2 * math.pi
    angles = torch.polar(torch.ones_like(magnitude), phase.to(magnitude.device))
    previous = torch.zeros_like(angles)
    for _ in range(max(1, iters)):
        wave_ = istft(magnitude * angles, n_fft, hop, length)
        rebuilt = stft(wave_, n_fft, hop)
        angles = rebuilt - (momentum / (1 + momentum)) * previous
        angles = angles / angles.abs().clamp_min(1e-8)
        previous = rebuilt
    return istft(magnitude * angles, n_fft, hop, length)


def mel_to_magnitude(mel: Tensor, *, sample_rate: int, n_fft: int, iters: int = 50) -> Tensor:
    """Mel power ``[B, frames, n_mels]`` -> linear STFT magnitude ``[B, F, frames]``: the
    non-negative least-squares solution of ``filterbank @ power = mel``, started from the
    pseudo-inverse (negatives clipped) and refined by ``iters`` multiplicative updates
    (Lee & Seung), which keeps narrow harmonics far better than the pseudo-inverse alone."""
    fb = mel_filterbank(sample_rate, n_fft, mel.shape[-1]).to(mel.device)
    mel = mel.float().clamp_min(0.0)
    power = torch.einsum("fm,btm->bft", torch.linalg.pinv(fb), mel).clamp_min(0.0) + 1e-8
    target = torch.einsum("mf,btm->bft", fb, mel)
    for _ in range(iters):
        model = torch.einsum("mf,btm->bft", fb, torch.einsum("mf,bft->btm", fb, power))
        power = power * target / (model + 1e-12)
    return power.sqrt()


def resample(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Band-limited resampling of a 1-D signal by zero-padding/truncating its spectrum (exact
    for a periodic signal; clips that start and end in silence come out clean)."""
    x = np.asarray(x, dtype=np.float64)
    if rate_in == rate_out or len(x) == 0:
        return x.astype(np.float32)
    n = len(x)
    m = max(1, round(n * rate_out / rate_in))
    spec = np.fft.rfft(x)
    keep = min(len(spec), m // 2 + 1)
    out_spec = np.zeros(m // 2 + 1, dtype=complex)
    out_spec[:keep] = spec[:keep]
    return (np.fft.irfft(out_spec, m) * (m / n)).astype(np.float32)


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """A PCM WAV file -> mono float32 samples in ``[-1, 1]`` and its sample rate."""
    with wave.open(str(path), "rb") as f:
        rate, channels, width = f.getframerate(), f.getnchannels(), f.getsampwidth()
        data = f.readframes(f.getnframes())
    if width == 1:
        x = (np.frombuffer(data, dtype=np.uint8).astype(np.float32) - 128) / 128
    elif width == 2:
        x = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768
    elif width == 4:
        x = np.frombuffer(data, dtype="<i4").astype(np.float32) / 2**31
    else:
        raise ValueError(f"{path}: unsupported WAV sample width {width} bytes")
    return x.reshape(-1, channels).mean(axis=1), rate


def write_wav(path: str | Path, samples: np.ndarray | Tensor, sample_rate: int) -> Path:
    """Write mono samples (float in ``[-1, 1]``, clipped) as a 16-bit PCM WAV file."""
    x = torch.as_tensor(samples).detach().float().cpu().reshape(-1).clamp(-1, 1).numpy()
    pcm = np.round(x * 32767).astype("<i2")
    path = Path(path)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(int(sample_rate))
        f.writeframes(pcm.tobytes())
    return path
