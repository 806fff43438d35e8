"""The robotics world model (paper App. E): future frames and the action chunk generated together,
conditioned on the current frame.

A sample is one step ``t`` of an expert demonstration. Its sequence (one per sample)::

    [current frame: n_p patches] [future frame 1 .. F: F * n_p patches] [action 0 .. H-1]
     condition=True               generated                              generated
     modality id 0                modality id 0                          modality id 1
     (0, row, col)                (k * H / F, row, col)                  (j, -1, -1)

- **Frames** are the simulator's state drawn as a small top-down image
  (:mod:`selfflow_robotics.render`: ``frame_size`` pixels a side, one channel, ``[-1, 1]``, the
  pixels themselves as latents), cut into ``patch x patch`` tokens (row-major). Future frame
  ``k = 1 .. F`` shows the state reached after executing the chunk's first ``k * H / F``
  actions, so the last one shows the state after the whole chunk.
- **Actions** are the ``H`` actions *executed* from step ``t`` (with the recording's
  ``action_noise``), so the future frames are exactly their consequences; each action dim is
  quantile-normalised as the policy's (1..99 % -> ``[-1, 1]``, not clipped).
- **One time axis.** Positions have three axes ``(t, row, col)``: a frame at its step index
  (the current frame at 0), its patches at their grid cell; action ``j`` (executed at step
  ``j``, taken in the state shown at time ``j``) at ``(j, -1, -1)``, as ``selfflow_audio_video``
  places audio, so tokens of the same moment share ``t``.
- **Widths.** Frame patches carry ``patch²`` channels and actions ``A``; :func:`selfflow_core.
  tokens.pack` pads them to the widest with ``channel_valid`` marking the real channels. All
  frame tokens, the conditioning one included, share modality id 0 (one input/output
  projection, as a video's first frame shares its clip's), actions have id 1: ``token_dims =
  (patch², A)``.
- **Shared timesteps.** The ordinary dual-timestep plan gives every generated token of a sample
  its ``t`` or ``s``, frames and actions alike (the paper: "actions and video share the same
  noise timesteps"); no per-kind scheduler.
- **Noise augmentation.** The current frame's tokens are conditioning: :meth:`Config.
  default_scheduler` sets ``condition_noise = 0.2``, so in training they are fed at one
  ``t ~ U[0, 0.2]`` per sample (student and teacher alike) and count in no loss, as the paper
  augments its first frame; sampling holds them at ``SamplingConfig.condition_t``.

``detokenize`` returns the packed tokens themselves; :meth:`RoboticsWorldModality.split` turns
them into ``(frames [B, 1 + F, size, size], actions [B, H, A])``.

Why a kind of its own (``robotics_world``) and not a ``mode`` of ``robotics``: the two share the
simulator, the expert and the action normalisation (reused from :mod:`selfflow_robotics.adapter`
and :mod:`selfflow_robotics.sim`), but not one stored field's layout, token layout, position
axis count, generated field, default scheduler or sample files; a mode would leave half of
either config's fields meaningless and every method branching, while the policy must keep
working byte for byte as it did.
"""

from __future__ import annotations

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
    LogitNormal,
    ModalityAdapter,
    ModalityConfig,
    Source,
    TokenBatch,
    tile_images,
    to_uint8,
    upscale,
)
from selfflow_core.tokens import (
    Packed,
    expand_batch,
    grid_positions,
    pack,
    patchify,
    split,
    unpatchify,
)
from selfflow_robotics.adapter import Normalization
from selfflow_robotics.render import render_settings
from selfflow_robotics.sim import TASKS, Demonstrations, Task, collect, episode_seed, make_task

#: the paper's video mask ratio (App. A.3), used for the world model's joint sequence
WORLD_MASK_RATIO = 0.1
#: the paper's noise augmentation of the conditioning frame: t ~ U[0, 0.2] (App. E)
CONDITION_NOISE = 0.2


class WorldSource(Source):
    """Every step of a set of expert episodes as one raw sample (episode-major order):
    ``frames`` [1 + F, size, size] (the current frame, then the frames ``k * H / F`` steps
    later, ``k = 1 .. F``), ``actions`` [H, A] (the executed actions, simulator units),
    ``state`` [S] (the current state, raw), ``episode`` and ``timestep``."""

    def __init__(self, demos: Demonstrations, future_frames: int, description: str) -> None:
        if demos.frames is None or demos.executed is None:
            raise ValueError("WorldSource needs demonstrations collected with frames")
        self.demos, self.future_frames, self.description = demos, future_frames, description
        self.stride = demos.horizon // future_frames
        e, t = np.divmod(np.arange(demos.episodes * demos.steps), demos.steps)
        self.episode, self.timestep = e.astype(np.int64), t.astype(np.int64)

    def __len__(self) -> int:
        return len(self.episode)

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        e, t = self.episode[start:stop], self.timestep[start:stop]
        d, h = self.demos, self.demos.horizon
        frame_steps = t[:, None] + self.stride * np.arange(self.future_frames + 1)[None]
        action_steps = t[:, None] + np.arange(h)[None]
        return {"frames": np.array(d.frames[e[:, None], frame_steps]),
                "actions": np.array(d.executed[e[:, None], action_steps]),
                "state": np.array(d.trajectory[e, t]),
                "episode": e.copy(), "timestep": t.copy()}


class RoboticsWorldModality(ModalityAdapter):
    name = "robotics_world"
    latent_field = "frames"  # frames and actions are both generated; see `split`

    @attrs.frozen(kw_only=True)
    class Config(ModalityConfig):
        """``task``: simulated task (``reacher``). ``episodes``: training demonstrations (each
        ``task.episode_steps`` samples). ``horizon``: actions per chunk (``H``).
        ``future_frames``: generated frames (``F``, dividing ``H``: frame ``k`` is ``k * H / F``
        steps ahead). ``frame_size``: frame side in pixels; ``patch``: patch side (dividing
        ``frame_size``). ``action_noise``: std of the Gaussian noise added to the executed expert
        actions while recording (the executed actions are the targets). ``low_quantile`` /
        ``high_quantile``: the action quantiles mapped to -1 / 1. ``seed``: demonstration
        seed."""

        kind = "robotics_world"
        task: str = attrs.field(default="reacher", validator=v.in_(sorted(TASKS)))
        episodes: int = attrs.field(default=200, validator=v.ge(1))
        horizon: int = attrs.field(default=8, validator=v.ge(1))
        future_frames: int = attrs.field(default=2, validator=v.ge(1))
        frame_size: int = attrs.field(default=16, validator=v.ge(2))
        patch: int = attrs.field(default=4, validator=v.ge(1))
        action_noise: float = attrs.field(default=0.05, validator=v.ge(0))
        low_quantile: float = attrs.field(default=0.01, validator=[v.ge(0), v.lt(0.5)])
        high_quantile: float = attrs.field(default=0.99, validator=[v.gt(0.5), v.le(1)])
        seed: int = 0

        def __attrs_post_init__(self) -> None:
            if self.horizon % self.future_frames:
                raise ValueError(f"'future_frames' ({self.future_frames}) must divide 'horizon' "
                                 f"({self.horizon}): frames sit every horizon / future_frames "
                                 f"steps")
            if self.frame_size % self.patch:
                raise ValueError(f"'patch' ({self.patch}) must divide 'frame_size' "
                                 f"({self.frame_size})")

        def default_scheduler(self) -> DualTimestep.Config:
            """Video-like, as the paper's world model is a video model fine-tuned with actions
            (initialised from its video-weighted mixed run): the video's logit-normal p(t) with
            shift 2.95 and 5 % of draws from U[0.95, 1], its mask ratio 0.1 (frame patches are
            most of the sequence and as redundant as video latents; the paper gives no robotics
            ratio), and the conditioning frame noise-augmented with ``t ~ U[0, 0.2]`` (App. E)."""
            return DualTimestep.Config(
                distribution=LogitNormal.Config(shift=2.95, tail_fraction=0.05),
                mask_ratio=WORLD_MASK_RATIO, condition_noise=CONDITION_NOISE)

        def build(self) -> RoboticsWorldModality:
            return RoboticsWorldModality(self)

    def __init__(self, config: Config) -> None:
        self.config = config
        self.task: Task = make_task(config.task)
        self.horizon = config.horizon
        self.future_frames = config.future_frames
        self.stride = config.horizon // config.future_frames
        self.size = config.frame_size
        self.grid = config.frame_size // config.patch
        self.patch_tokens = self.grid * self.grid
        self._norm: Normalization | None = None
        self._prompt_frames: dict[int, np.ndarray] = {}

    # ---- layout --------------------------------------------------------------------------------

    @property
    def token_dims(self) -> tuple[int, int]:
        """``(patch², A)``: frame patches (modality id 0) and actions (id 1)."""
        return (self.config.patch ** 2, self.task.action_dim)

    @property
    def token_dim(self) -> int:
        return max(self.token_dims)

    @property
    def frame_tokens(self) -> int:
        """Tokens of all frames, the conditioning one included: ``(1 + F) * n_p``."""
        return (1 + self.future_frames) * self.patch_tokens

    @property
    def num_tokens(self) -> int:
        return self.frame_tokens + self.horizon

    @property
    def layout(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """``(tokens, channels)`` of the frame part and of the action part, in sequence order."""
        cf, ca = self.token_dims
        return ((self.frame_tokens, cf), (self.horizon, ca))

    @property
    def frame_steps(self) -> list[int]:
        """The step index of each frame: ``0, H/F, 2H/F, ..., H``."""
        return [k * self.stride for k in range(self.future_frames + 1)]

    def fields(self) -> dict[str, FieldSpec]:
        n = self.size
        return {"frames": FieldSpec(shape=(1 + self.future_frames, n, n), dtype="float32"),
                "actions": FieldSpec(shape=(self.horizon, self.task.action_dim), dtype="float32"),
                "episode": FieldSpec(shape=(), dtype="int64"),
                "timestep": FieldSpec(shape=(), dtype="int64")}

    def encoder_info(self) -> dict[str, Any]:
        t = self.task
        return {"name": "robotics-world", "version": "1",
                "settings": {"env": t.env_id, "state_dim": t.state_dim,
                             "action_dim": t.action_dim, "episode_steps": t.episode_steps,
                             "expert": attrs.asdict(t) if attrs.has(type(t)) else {},
                             "render": render_settings(self.size)}}

    # ---- normalisation -------------------------------------------------------------------------

    def training_demonstrations(self) -> Demonstrations:
        """The training split's expert episodes with frames (deterministic; cached)."""
        c = self.config
        return collect(c.task, c.episodes, seed=c.seed, split="train", horizon=c.horizon,
                       action_noise=c.action_noise, frame_size=c.frame_size)

    def heldout_demonstrations(self, episodes: int) -> Demonstrations:
        """``episodes`` expert episodes of the ``heldout`` split, recorded like the training
        ones."""
        c = self.config
        return collect(c.task, episodes, seed=c.seed, split="heldout", horizon=c.horizon,
                       action_noise=c.action_noise, frame_size=c.frame_size)

    @property
    def stats(self) -> Normalization:
        """The action normalisation (quantiles of every executed action of the training
        demonstrations once; the state statistics are recorded but no state is tokenized)."""
        if self._norm is None:
            demos, c = self.training_demonstrations(), self.config
            self._norm = Normalization.from_data(demos.states, demos.executed,
                                                 low_quantile=c.low_quantile,
                                                 high_quantile=c.high_quantile)
        return self._norm

    def set_normalization(self, data: Mapping[str, Any] | Normalization) -> None:
        """Use recorded statistics (a store schema's ``normalization``)."""
        norm = data if isinstance(data, Normalization) else Normalization.from_dict(data)
        t = self.task
        if norm.action_low.shape != (t.action_dim,) or norm.state_mean.shape != (t.state_dim,):
            raise ValueError(f"normalization for {norm.action_low.shape[0]}-D actions and "
                             f"{norm.state_mean.shape[0]}-D states does not fit {t.describe()}")
        self._norm = norm

    def normalization(self) -> dict[str, Any]:
        """The policy's record (actions: quantiles; state: mean/std) plus ``frames``: the
        rendered pixels as they are (``[-1, 1]``, no scale or shift)."""
        return {**self.stats.to_dict(),
                "frames": {"method": "identity", "range": [-1.0, 1.0]}}

    # ---- offline -------------------------------------------------------------------------------

    def sources(self) -> tuple[str, ...]:
        return ("expert",)

    def open_source(self, source: str) -> WorldSource:
        """``expert``: the scripted expert's demonstrations with frames (``episodes`` episodes
        of the training split). Computes the action normalisation from them."""
        if source != "expert":
            raise ValueError(f"robotics_world modality: unknown source {source!r}; sources: "
                             f"expert")
        c = self.config
        demos = self.training_demonstrations()
        self._norm = None
        _ = self.stats
        desc = (f"{self.task.describe()} scripted expert with {c.frame_size}x{c.frame_size} "
                f"frames: {c.episodes} episodes x {demos.steps} steps, chunks of {c.horizon} "
                f"executed actions, frames at steps {self.frame_steps}, action noise "
                f"{c.action_noise}, seed {c.seed}; expert success {demos.success.mean():.0%}")
        return WorldSource(demos, c.future_frames, desc)

    def encode(self, raw: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"frames": np.asarray(raw["frames"], np.float32),
                "actions": self.stats.normalize_actions(
                    np.asarray(raw["actions"], np.float64)).astype(np.float32),
                "episode": np.asarray(raw["episode"], np.int64),
                "timestep": np.asarray(raw["timestep"], np.int64)}

    # ---- online --------------------------------------------------------------------------------

    def positions(self, n: int, device: torch.device | str | None = None) -> Tensor:
        """``[n, N, 3]``: frame patches at ``(step, row, col)``, actions at ``(j, -1, -1)``."""
        cells = grid_positions(self.grid, self.grid)
        frames = torch.cat([torch.cat([torch.full((self.patch_tokens, 1), float(step)), cells], 1)
                            for step in self.frame_steps])
        j = torch.arange(self.horizon, dtype=torch.float32)[:, None]
        actions = torch.cat([j, torch.full((self.horizon, 2), -1.0)], 1)
        return expand_batch(torch.cat([frames, actions]), n, device)

    def condition_mask(self, n: int, device: torch.device | str | None = None) -> Tensor:
        """``[n, N]`` bool: the current frame's patch tokens, exactly."""
        mask = torch.zeros(self.num_tokens, dtype=torch.bool)
        mask[: self.patch_tokens] = True
        return expand_batch(mask, n, device)

    def pack(self, frames: Tensor, actions: Tensor) -> Packed:
        """Frames [B, 1 + F, size, size] and actions [B, H, A] -> the packed sequence."""
        p = self.config.patch
        return pack([patchify(frames.float(), (1, p, p)), actions.float()])

    def split(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Packed tokens [B, N, C] -> ``(frames [B, 1 + F, size, size], actions [B, H, A])``
        (normalised actions); padded channels are dropped."""
        f_tok, a_tok = split(tokens, self.layout)
        p, n = self.config.patch, self.size
        return unpatchify(f_tok, (1, p, p), (1 + self.future_frames, n, n)), a_tok

    def _batch(self, packed: Packed) -> TokenBatch:
        b, dev = packed.tokens.shape[0], packed.tokens.device
        return TokenBatch(tokens=packed.tokens, positions=self.positions(b, dev),
                          modality_ids=packed.modality_ids,
                          valid=torch.ones(b, self.num_tokens, dtype=torch.bool, device=dev),
                          condition=self.condition_mask(b, dev),
                          channel_valid=packed.channel_valid)

    def tokenize(self, fields: Mapping[str, Tensor]) -> TokenBatch:
        """``frames`` [B, 1 + F, size, size] and (normalised) ``actions`` [B, H, A] ->
        [B, (1 + F) * n_p + H, C] tokens."""
        return self._batch(self.pack(fields["frames"], fields["actions"]))

    def detokenize(self, tokens: Tensor) -> Tensor:
        """The packed tokens themselves (:meth:`split` and :meth:`save_samples` unpack them)."""
        return tokens

    def prompt(self, n: int, fields: Mapping[str, Tensor] | None = None) -> TokenBatch:
        """Condition on ``fields["frames"][:, 0]`` or ``fields["frame"]`` ([n, size, size]); with
        neither, on the frames of the reset states of ``n`` held-out episodes. Future frames and
        actions are zeros (the sampler replaces them by noise)."""
        if fields is not None and fields.get("frames") is not None:
            current = torch.as_tensor(fields["frames"])[:n, 0]
        elif fields is not None and fields.get("frame") is not None:
            current = torch.as_tensor(fields["frame"])[:n]
        else:
            current = torch.from_numpy(self.heldout_initial_frames(n))
        current = current.float()
        if tuple(current.shape) != (n, self.size, self.size):
            raise ValueError(f"prompt({n}): conditioning frames have shape "
                             f"{tuple(current.shape)}, expected ({n}, {self.size}, {self.size})")
        frames = torch.zeros(n, 1 + self.future_frames, self.size, self.size,
                             device=current.device)
        frames[:, 0] = current
        actions = torch.zeros(n, self.horizon, self.task.action_dim, device=current.device)
        return self._batch(self.pack(frames, actions))

    def prompt_from_states(self, states: np.ndarray) -> TokenBatch:
        """A prompt conditioned on the frames of raw simulator states [n, S]."""
        frames = self.task.render(np.asarray(states, np.float64), self.size)
        return self.prompt(len(frames), {"frame": torch.from_numpy(frames)})

    def heldout_initial_frames(self, n: int) -> np.ndarray:
        """Frames [n, size, size] of the reset states of the first ``n`` held-out episodes."""
        if n not in self._prompt_frames:
            env = self.task.make_env()
            try:
                states = np.stack([env.reset(seed=episode_seed(self.config.seed, "heldout", i))[0]
                                   for i in range(n)]).astype(np.float64)
            finally:
                env.close()
            self._prompt_frames[n] = self.task.render(states, self.size)
        return self._prompt_frames[n]

    def actions_to_env(self, actions: Tensor | np.ndarray) -> np.ndarray:
        """Normalised actions [B, H, A] -> simulator units (not clipped)."""
        x = actions.detach().cpu().double().numpy() if isinstance(actions, Tensor) \
            else np.asarray(actions, np.float64)
        return self.stats.denormalize_actions(x)

    # ---- samples -------------------------------------------------------------------------------

    def save_samples(self, latents: Tensor, labels: Tensor | None, out_dir: Path) -> list[Path]:
        """``frames.png`` (one row per sample: the conditioning frame, then the generated ones),
        ``frames.npy`` [B, 1 + F, size, size] (``[-1, 1]``), ``actions.npy`` [B, H, A] in
        simulator units and ``actions.csv`` (``sample, step, a0, a1, ...``)."""
        from PIL import Image

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        frames, actions = self.split(latents.detach().float().cpu())
        actions = self.actions_to_env(actions)
        paths = [out_dir / "frames.npy", out_dir / "frames.png", out_dir / "actions.npy",
                 out_dir / "actions.csv"]
        np.save(paths[0], frames.numpy().astype(np.float32))
        b, k = frames.shape[:2]
        cells = upscale(to_uint8(frames.reshape(b * k, 1, self.size, self.size)), 64)
        Image.fromarray(tile_images(cells, k)[..., 0], "L").save(paths[1])
        np.save(paths[2], actions.astype(np.float32))
        rows = [",".join(["sample", "step", *(f"a{j}" for j in range(actions.shape[-1]))])]
        for i, planned in enumerate(actions):
            rows += [",".join([str(i), str(s), *(f"{x:.6f}" for x in step)])
                     for s, step in enumerate(planned)]
        paths[3].write_text("\n".join(rows) + "\n")
        return paths
