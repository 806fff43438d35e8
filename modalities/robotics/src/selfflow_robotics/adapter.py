"""The robotics modality: an action chunk of ``H`` future steps generated from the robot's state.

A sample is one step of an expert demonstration: the proprioceptive ``state`` [S] and the chunk
of the expert's next ``H`` actions ``actions`` [H, A]. Tokens (one sequence per sample)::

    [state chunk 1 .. state chunk n_s] [action 1 .. action H]
     condition=True (held clean, no loss)   generated

- State tokens carry ``state_chunk`` consecutive state dims each (0: the whole state in one
  token); action tokens carry one step's ``A`` dims. Every token is padded with zeros to the
  common width ``C = max(state_chunk, A)``; ``channel_valid`` marks the real channels, so padded
  channels never count in the loss.
- State tokens have modality id 0 and action tokens id 1, with widths ``token_dims =
  (state_chunk, A)``: the backbone gives each its own input/output projection, which reads only
  the real channels of a token (the padding never reaches the network).
- Positions are 1-D time: the state at 0 (with several state chunks, at ``-(n_s-1) .. 0``), the
  actions at ``1 .. H``.

Normalisation (recorded in the store's schema by :meth:`RoboticsModality.normalization`): each
action dim is mapped linearly from its 1st..99th percentile over the training data to
``[-1, 1]`` (not clipped: the ~2 % beyond map slightly outside), each state dim is standardised
by its mean and standard deviation. The statistics are computed from the training
demonstrations, which are deterministic given the config, in :meth:`open_source` (a first pass
before encoding), and used by :meth:`encode`; a trained policy un-normalises with the store's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
from attrs import validators as v
from torch import Tensor

from selfflow_core import (
    DualTimestep,
    FieldSpec,
    ModalityAdapter,
    ModalityConfig,
    Source,
    TokenBatch,
    Uniform,
)
from selfflow_core.tokens import chunk, expand_batch, pack
from selfflow_robotics.sim import TASKS, Demonstrations, Task, collect, episode_seed, make_task

NORMALIZATION_VERSION = 1


@attrs.frozen(kw_only=True, eq=False)
class Normalization:
    """Per-dim statistics: actions ``[low, high]`` (the quantiles) -> ``[-1, 1]``; states
    ``(x - mean) / std``. Works on numpy arrays and torch tensors (last axis = dims)."""

    action_low: np.ndarray
    action_high: np.ndarray
    state_mean: np.ndarray
    state_std: np.ndarray
    low_quantile: float = 0.01
    high_quantile: float = 0.99

    @classmethod
    def from_data(cls, states: np.ndarray, actions: np.ndarray, *, low_quantile: float,
                  high_quantile: float) -> Normalization:
        """Statistics of ``states`` [N, S] and ``actions`` [..., A] (computed in float64)."""
        a = np.asarray(actions, np.float64).reshape(-1, actions.shape[-1])
        s = np.asarray(states, np.float64).reshape(-1, states.shape[-1])
        low, high = np.quantile(a, [low_quantile, high_quantile], axis=0)
        std = s.std(axis=0)
        return cls(action_low=low, action_high=high, state_mean=s.mean(axis=0),
                   state_std=np.where(std > 1e-6, std, 1.0),
                   low_quantile=low_quantile, high_quantile=high_quantile)

    @property
    def _center(self) -> np.ndarray:
        return (self.action_high + self.action_low) / 2

    @property
    def _half_range(self) -> np.ndarray:
        return np.maximum((self.action_high - self.action_low) / 2, 1e-6)

    @staticmethod
    def _like(stat: np.ndarray, x):
        """``stat`` as a tensor of ``x``'s dtype and device, or as float64 numpy."""
        if isinstance(x, Tensor):
            return torch.as_tensor(stat, dtype=x.dtype, device=x.device)
        return stat

    def normalize_actions(self, a):
        return (a - self._like(self._center, a)) / self._like(self._half_range, a)

    def denormalize_actions(self, a):
        return a * self._like(self._half_range, a) + self._like(self._center, a)

    def normalize_states(self, s):
        return (s - self._like(self.state_mean, s)) / self._like(self.state_std, s)

    def denormalize_states(self, s):
        return s * self._like(self.state_std, s) + self._like(self.state_mean, s)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (what the store's schema records under ``normalization``)."""
        def floats(x):
            return [float(y) for y in np.asarray(x, np.float64)]
        return {
            "version": NORMALIZATION_VERSION,
            "actions": {"method": "quantile", "range": [-1.0, 1.0],
                        "quantiles": [float(self.low_quantile), float(self.high_quantile)],
                        "low": floats(self.action_low), "high": floats(self.action_high)},
            "state": {"method": "standardize", "mean": floats(self.state_mean),
                      "std": floats(self.state_std)},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Normalization:
        if data.get("version") != NORMALIZATION_VERSION or "actions" not in data:
            raise ValueError(f"not a robotics normalization record (version "
                             f"{NORMALIZATION_VERSION}): {dict(data)}")
        a, s = data["actions"], data["state"]
        return cls(action_low=np.array(a["low"], np.float64),
                   action_high=np.array(a["high"], np.float64),
                   state_mean=np.array(s["mean"], np.float64),
                   state_std=np.array(s["std"], np.float64),
                   low_quantile=float(a["quantiles"][0]), high_quantile=float(a["quantiles"][1]))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Normalization) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]


class DemonstrationSource(Source):
    """Every step of a set of expert episodes as one raw sample (episode-major order):
    ``state`` [S] and ``actions`` [H, A] in simulator units, ``episode`` and ``timestep``."""

    def __init__(self, demos: Demonstrations, description: str) -> None:
        self.demos = demos
        self.data = demos.flat()
        self.description = description

    def __len__(self) -> int:
        return len(self.data["episode"])

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        return {k: np.array(a[start:stop]) for k, a in self.data.items()}


class RoboticsModality(ModalityAdapter):
    name = "robotics"
    latent_field = "actions"

    @attrs.frozen(kw_only=True)
    class Config(ModalityConfig):
        """``task``: simulated task (``reacher``: gymnasium Reacher-v5 with a scripted expert).
        ``episodes``: training demonstrations (each ``task.episode_steps`` samples).
        ``horizon``: actions per chunk (``H``). ``state_chunk``: state dims per state token (0:
        the whole state in one token). ``action_noise``: std of the Gaussian noise added to the
        executed expert actions while recording (labels stay clean). ``low_quantile`` /
        ``high_quantile``: the action quantiles mapped to -1 / 1. ``seed``: demonstration seed."""

        kind = "robotics"
        task: str = attrs.field(default="reacher", validator=v.in_(sorted(TASKS)))
        episodes: int = attrs.field(default=200, validator=v.ge(1))
        horizon: int = attrs.field(default=8, validator=v.ge(1))
        state_chunk: int = attrs.field(default=0, validator=v.ge(0))
        action_noise: float = attrs.field(default=0.05, validator=v.ge(0))
        low_quantile: float = attrs.field(default=0.01, validator=[v.ge(0), v.lt(0.5)])
        high_quantile: float = attrs.field(default=0.99, validator=[v.gt(0.5), v.le(1)])
        seed: int = 0

        def default_scheduler(self) -> DualTimestep.Config:
            """Uniform p(t), mask ratio 0.25: our choice. The paper's robotics model (App. E)
            generates video frames and actions at shared timesteps and gives no settings of its
            own; its video settings (0.1, shift 2.95) are for the redundancy of video latents,
            which a chunk of a few action tokens and clean state tokens does not have. The
            default preset reached 76 % success on Reacher with these."""
            return DualTimestep.Config(distribution=Uniform.Config(), mask_ratio=0.25)

        def build(self) -> RoboticsModality:
            return RoboticsModality(self)

    def __init__(self, config: Config) -> None:
        self.config = config
        self.task: Task = make_task(config.task)
        s = self.task.state_dim
        self.state_width = min(config.state_chunk or s, s)
        self.state_tokens = math.ceil(s / self.state_width)
        self.horizon = config.horizon
        self._norm: Normalization | None = None

    # ---- layout --------------------------------------------------------------------------------

    @property
    def token_dim(self) -> int:
        return max(self.state_width, self.task.action_dim)

    @property
    def token_dims(self) -> tuple[int, int]:
        """Widths of the two token kinds (modality ids 0: state, 1: action)."""
        return (self.state_width, self.task.action_dim)

    @property
    def num_tokens(self) -> int:
        return self.state_tokens + self.horizon

    def fields(self) -> dict[str, FieldSpec]:
        t = self.task
        return {"state": FieldSpec(shape=(t.state_dim,), dtype="float32"),
                "actions": FieldSpec(shape=(self.horizon, t.action_dim), dtype="float32"),
                "episode": FieldSpec(shape=(), dtype="int64"),
                "timestep": FieldSpec(shape=(), dtype="int64")}

    def encoder_info(self) -> dict[str, Any]:
        t = self.task
        return {"name": "robotics-normalize", "version": "1",
                "settings": {"env": t.env_id, "state_dim": t.state_dim,
                             "action_dim": t.action_dim, "episode_steps": t.episode_steps,
                             "expert": attrs.asdict(t) if attrs.has(type(t)) else {}}}

    # ---- normalisation -------------------------------------------------------------------------

    def training_demonstrations(self) -> Demonstrations:
        """The training split's expert episodes (deterministic given the config; cached)."""
        c = self.config
        return collect(c.task, c.episodes, seed=c.seed, split="train", horizon=c.horizon,
                       action_noise=c.action_noise)

    @property
    def stats(self) -> Normalization:
        """The normalisation in use: set by :meth:`open_source` or :meth:`set_normalization`,
        else computed from the training demonstrations on first use."""
        if self._norm is None:
            demos, c = self.training_demonstrations(), self.config
            # every labelled step once (chunks overlap, and would weight the first and last
            # steps of an episode less than the middle ones)
            self._norm = Normalization.from_data(demos.states, demos.labels,
                                                 low_quantile=c.low_quantile,
                                                 high_quantile=c.high_quantile)
        return self._norm

    def set_normalization(self, data: Mapping[str, Any] | Normalization) -> None:
        """Use recorded statistics (e.g. a store schema's ``normalization``), not recomputed
        ones."""
        norm = data if isinstance(data, Normalization) else Normalization.from_dict(data)
        t = self.task
        if norm.action_low.shape != (t.action_dim,) or norm.state_mean.shape != (t.state_dim,):
            raise ValueError(f"normalization for {norm.action_low.shape[0]}-D actions and "
                             f"{norm.state_mean.shape[0]}-D states does not fit {t.describe()}")
        self._norm = norm

    def normalization(self) -> dict[str, Any]:
        return self.stats.to_dict()

    # ---- offline -------------------------------------------------------------------------------

    def sources(self) -> tuple[str, ...]:
        return ("expert",)

    def open_source(self, source: str) -> DemonstrationSource:
        """``expert``: the scripted expert's demonstrations (``episodes`` episodes of the
        training split). Computes the normalisation from them (a first pass over the data)."""
        if source != "expert":
            raise ValueError(f"robotics modality: unknown source {source!r}; sources: expert")
        c = self.config
        demos = self.training_demonstrations()
        self._norm = None
        _ = self.stats
        desc = (f"{self.task.describe()} scripted expert: {c.episodes} episodes x "
                f"{demos.steps} steps, chunks of {c.horizon}, action noise {c.action_noise}, "
                f"seed {c.seed}; expert success {demos.success.mean():.0%}, mean return "
                f"{demos.returns.mean():.2f}")
        return DemonstrationSource(demos, desc)

    def encode(self, raw: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = self.stats
        state = n.normalize_states(np.asarray(raw["state"], np.float64))
        return {"state": state.astype(np.float32),
                "actions": n.normalize_actions(
                    np.asarray(raw["actions"], np.float64)).astype(np.float32),
                "episode": np.asarray(raw["episode"], np.int64),
                "timestep": np.asarray(raw["timestep"], np.int64)}

    # ---- online --------------------------------------------------------------------------------

    def _batch(self, state: Tensor, actions: Tensor) -> TokenBatch:
        b, dev = state.shape[0], state.device
        state_tokens, widths = chunk(state.float(), self.state_width)
        packed = pack([state_tokens, actions.float()], real_widths=[widths, None])
        # 1-D time: the state chunks at -(n_s - 1) .. 0, the actions at 1 .. H
        pos = torch.arange(1 - self.state_tokens, self.horizon + 1, dtype=torch.float32)
        return TokenBatch(tokens=packed.tokens, positions=expand_batch(pos[:, None], b, dev),
                          modality_ids=packed.modality_ids,
                          valid=torch.ones(b, self.num_tokens, dtype=torch.bool, device=dev),
                          condition=packed.modality_ids == 0,  # the state is conditioning
                          channel_valid=packed.channel_valid)

    def tokenize(self, fields: Mapping[str, Tensor]) -> TokenBatch:
        """``state`` [B, S] and ``actions`` [B, H, A] (normalised) -> [B, n_s + H, C] tokens."""
        return self._batch(fields["state"], fields["actions"])

    def detokenize(self, tokens: Tensor) -> Tensor:
        """Tokens [B, n_s + H, C] -> normalised actions [B, H, A]."""
        return tokens[:, self.state_tokens:, : self.task.action_dim]

    def prompt(self, n: int, fields: Mapping[str, Tensor] | None = None) -> TokenBatch:
        """Condition on ``fields["state"]`` (normalised, first ``n`` rows); without it, on the
        initial states of ``n`` held-out episodes."""
        if fields is not None and "state" in fields:
            state = torch.as_tensor(fields["state"])[:n].float()
            if state.shape[0] != n:
                raise ValueError(f"prompt({n}): fields['state'] holds {state.shape[0]} states")
        else:
            state = torch.from_numpy(self.stats.normalize_states(self.heldout_initial_states(n)))
            state = state.float()
        actions = torch.zeros(n, self.horizon, self.task.action_dim, device=state.device)
        return self._batch(state, actions)

    def prompt_from_states(self, states: np.ndarray | Tensor) -> TokenBatch:
        """A prompt conditioned on raw simulator states [n, S] (normalised here)."""
        s = torch.as_tensor(np.asarray(states, np.float64) if not isinstance(states, Tensor)
                            else states).double()
        return self.prompt(s.shape[0], {"state": self.stats.normalize_states(s).float()})

    def heldout_initial_states(self, n: int) -> np.ndarray:
        """Reset states [n, S] of the first ``n`` held-out episodes (float64)."""
        env = self.task.make_env()
        try:
            return np.stack([env.reset(seed=episode_seed(self.config.seed, "heldout", i))[0]
                             for i in range(n)]).astype(np.float64)
        finally:
            env.close()

    def actions_to_env(self, latents: Tensor | np.ndarray) -> np.ndarray:
        """Generated (normalised) actions [B, H, A] -> simulator units (not clipped)."""
        x = latents.detach().cpu().double().numpy() if isinstance(latents, Tensor) \
            else np.asarray(latents, np.float64)
        return self.stats.denormalize_actions(x)

    def save_samples(self, latents: Tensor, labels: Tensor | None, out_dir: Path) -> list[Path]:
        """``actions.npy`` [B, H, A] in simulator units and ``actions.csv`` (one row per
        sample and step: ``sample, step, a0, a1, ...``)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        actions = self.actions_to_env(latents)
        npy = out_dir / "actions.npy"
        np.save(npy, actions.astype(np.float32))
        csv = out_dir / "actions.csv"
        a = actions.shape[-1]
        rows = [",".join(["sample", "step", *(f"a{j}" for j in range(a))])]
        for i, planned in enumerate(actions):
            rows += [",".join([str(i), str(k), *(f"{x:.6f}" for x in step)])
                     for k, step in enumerate(planned)]
        csv.write_text("\n".join(rows) + "\n")
        return [npy, csv]
