"""Simulated demonstrations and closed-loop rollouts (gymnasium MuJoCo, headless, no rendering).

A :class:`Task` wraps one simulator environment with a scripted expert. :func:`collect` runs the
expert for a number of episodes, each seeded by its index (so any episode can be regenerated
alone and an interrupted encode resumes to the same data), and returns the states, the
expert's action labels, the actions actually executed, the whole trajectory and (with
``frame_size``) a small frame of every state, drawn by :mod:`selfflow_robotics.render`.
:func:`rollout` runs any policy (a function from a batch of states to a batch of action chunks)
in closed loop with receding-horizon execution and reports success, return and final distance
per episode; :func:`execute_chunks` executes whole action chunks from given states (the
simulator's answer to a world model's imagined future).

Seeds: episode ``i`` of split ``s`` resets its environment with
``SeedSequence([seed, s, i])``; the splits (``train`` 0, ``heldout`` 1, ``rollout`` 2) never
share an episode.
"""

from __future__ import annotations

import abc
import functools
import warnings
from collections.abc import Callable
from typing import ClassVar

import attrs
import numpy as np

SPLITS = {"train": 0, "heldout": 1, "rollout": 2}

#: a policy: states [n, state_dim] (raw, as the simulator gives them) -> actions [n, k, action_dim]
Policy = Callable[[np.ndarray], np.ndarray]


def episode_seed(seed: int, split: str, episode: int) -> int:
    """The environment reset seed of ``episode`` of ``split`` (a 31-bit int)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits: {sorted(SPLITS)}")
    state = np.random.SeedSequence([int(seed), SPLITS[split], int(episode)]).generate_state(1)
    return int(state[0] >> 1)


def _import_gymnasium():
    try:
        import gymnasium
    except ImportError as exc:  # pragma: no cover - a dependency of the distribution
        raise ImportError("selfflow-robotics needs gymnasium with MuJoCo: pip install "
                          "'gymnasium[mujoco]'") from exc
    return gymnasium


class Task(abc.ABC):
    """One simulated control task: its environment, a scripted expert and a success test."""

    name: ClassVar[str]
    env_id: ClassVar[str]
    state_dim: ClassVar[int]
    action_dim: ClassVar[int]
    #: steps per episode (the environment's own time limit)
    episode_steps: ClassVar[int]

    def make_env(self):
        """A fresh environment (the unwrapped one: no time limit or checker wrappers; episodes
        are cut at :attr:`episode_steps` by the callers)."""
        gym = _import_gymnasium()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return gym.make(self.env_id).unwrapped

    @property
    def action_low(self) -> np.ndarray:
        return -np.ones(self.action_dim)

    @property
    def action_high(self) -> np.ndarray:
        return np.ones(self.action_dim)

    @abc.abstractmethod
    def expert(self, states: np.ndarray) -> np.ndarray:
        """The scripted expert: states [n, state_dim] -> actions [n, action_dim] (in bounds)."""

    @abc.abstractmethod
    def distance(self, states: np.ndarray) -> np.ndarray:
        """Distance to the goal of each state [n, state_dim] -> [n]."""

    @abc.abstractmethod
    def success(self, final_states: np.ndarray) -> np.ndarray:
        """Whether each episode that ended in ``final_states`` [n, state_dim] succeeded -> [n]
        bool."""

    def near(self, final_states: np.ndarray) -> np.ndarray:
        """A looser success test (reported next to :meth:`success`); default: the same."""
        return self.success(final_states)

    def describe(self) -> str:
        return f"{self.env_id} ({self.state_dim}-D state, {self.action_dim}-D action)"

    def render(self, states: np.ndarray, size: int) -> np.ndarray:
        """Frames [..., size, size] float32 in ``[-1, 1]`` of states [..., state_dim]."""
        raise NotImplementedError(f"task {self.name!r} draws no frames")

    def restore(self, env, state: np.ndarray) -> None:
        """Put ``env`` (from :meth:`make_env`, reset once) into the simulator state that gave
        the observation ``state``."""
        raise NotImplementedError(f"task {self.name!r} cannot restore a state")


@attrs.frozen(kw_only=True)
class ReacherTask(Task):
    """gymnasium ``Reacher-v5``: a 2-link planar arm (links 0.1 and 0.11 m, motors of gear 200,
    actions in ``[-1, 1]^2``) brings its fingertip to a random target within 0.2 m in 50 steps of
    0.02 s. Reward ``-|tip - target| - |a|^2`` per step.

    State (10-D, the observation): ``cos q1, cos q2, sin q1, sin q2, target x, y, dq1, dq2,
    (tip - target) x, y``. Success: final fingertip distance below ``success_distance`` (0.02 m:
    the 0.01 m fingertip touches the 0.009 m target).

    Expert: inverse kinematics to the target (of the two elbow solutions, the one nearer the
    current joint angles), then a joint-space PD law ``a = kp (q* - q) - kd dq`` clipped to the
    action bounds. With the default gains it succeeds in every episode with a mean return of
    about -4.2 (a random policy: about -43).
    """

    name: ClassVar[str] = "reacher"
    env_id: ClassVar[str] = "Reacher-v5"
    state_dim: ClassVar[int] = 10
    action_dim: ClassVar[int] = 2
    episode_steps: ClassVar[int] = 50
    links: ClassVar[tuple[float, float]] = (0.1, 0.11)

    kp: float = 0.5
    kd: float = 0.1
    success_distance: float = 0.02
    #: a looser threshold reported next to success (the 0.05 m of DM Control's easy reacher)
    near_distance: float = 0.05

    def expert(self, states: np.ndarray) -> np.ndarray:
        s = np.atleast_2d(np.asarray(states, dtype=np.float64))
        l1, l2 = self.links
        q = np.arctan2(s[:, 2:4], s[:, 0:2])
        dq, target = s[:, 6:8], s[:, 4:6]
        c2 = np.clip(((target ** 2).sum(-1) - l1 ** 2 - l2 ** 2) / (2 * l1 * l2), -1.0, 1.0)
        elbow = np.minimum(np.arccos(c2), 2.9)  # the joint's range is [-3, 3]
        best, best_cost = None, None
        for sign in (1.0, -1.0):
            q2 = sign * elbow
            q1 = (np.arctan2(target[:, 1], target[:, 0])
                  - np.arctan2(l2 * np.sin(q2), l1 + l2 * np.cos(q2)))
            d1 = np.angle(np.exp(1j * (q1 - q[:, 0])))  # joint 1 turns freely: shortest way
            err = np.stack([d1, q2 - q[:, 1]], axis=-1)
            cost = np.abs(err).sum(-1)
            if best is None:
                best, best_cost = err, cost
            else:
                take = cost < best_cost
                best = np.where(take[:, None], err, best)
        return np.clip(self.kp * best - self.kd * dq, -1.0, 1.0)

    def distance(self, states: np.ndarray) -> np.ndarray:
        return np.linalg.norm(np.atleast_2d(states)[:, 8:10], axis=-1)

    def success(self, final_states: np.ndarray) -> np.ndarray:
        return self.distance(final_states) < self.success_distance

    def near(self, final_states: np.ndarray) -> np.ndarray:
        return self.distance(final_states) < self.near_distance

    def render(self, states: np.ndarray, size: int) -> np.ndarray:
        """Top-down frames of the arm and the target (:func:`selfflow_robotics.render.
        render_reacher`)."""
        from selfflow_robotics.render import render_reacher
        return render_reacher(states, size)

    def restore(self, env, state: np.ndarray) -> None:
        """The observation determines the MuJoCo state: ``qpos = (q1, q2, target x, y)`` with
        ``q = atan2(sin q, cos q)``, ``qvel = (dq1, dq2, 0, 0)``."""
        s = np.asarray(state, np.float64)
        q = np.arctan2(s[2:4], s[0:2])
        env.set_state(np.concatenate([q, s[4:6]]), np.concatenate([s[6:8], [0.0, 0.0]]))


TASKS: dict[str, Callable[[], Task]] = {"reacher": ReacherTask}


def make_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown robotics task {name!r}; tasks: {sorted(TASKS)}")
    return TASKS[name]()


# ---- demonstrations ------------------------------------------------------------------------

@attrs.frozen(kw_only=True)
class Demonstrations:
    """Expert episodes, each ``steps`` long.

    - ``states`` [E, T, S] float32: the state at each step (before acting).
    - ``labels`` [E, T + H - 1, A] float32: the expert's action at each step; the last
      ``H - 1`` continue the episode past its end so every step has a full chunk of ``H``.
    - ``executed`` [E, T + H - 1, A] float64: the actions actually executed (the labels plus
      the recording noise, clipped to the bounds; equal to the labels without noise).
    - ``trajectory`` [E, T + H, S] float64: every state reached, from the reset state to the
      one after the last executed action (``states`` is its first ``T`` steps, as float32).
    - ``frames`` [E, T + H, size, size] float32 in ``[-1, 1]``: a frame of every state of
      ``trajectory`` (:meth:`Task.render`), or ``None`` when collected without ``frame_size``.
    - ``returns`` [E]: summed reward of the executed actions over the ``T`` steps.
    - ``final_distance`` [E], ``success`` [E] bool: after the ``T``-th step.
    - ``seeds`` [E]: the reset seed of each episode.
    """

    states: np.ndarray
    labels: np.ndarray
    returns: np.ndarray
    final_distance: np.ndarray
    success: np.ndarray
    seeds: np.ndarray
    horizon: int
    executed: np.ndarray | None = None
    trajectory: np.ndarray | None = None
    frames: np.ndarray | None = None

    @property
    def episodes(self) -> int:
        return self.states.shape[0]

    @property
    def steps(self) -> int:
        return self.states.shape[1]

    def chunks(self, episode: np.ndarray, timestep: np.ndarray) -> np.ndarray:
        """Action chunks [n, H, A] starting at ``(episode, timestep)`` pairs."""
        offsets = np.asarray(timestep)[:, None] + np.arange(self.horizon)[None, :]
        return self.labels[np.asarray(episode)[:, None], offsets]

    def flat(self) -> dict[str, np.ndarray]:
        """Every step as one sample: ``state`` [N, S], ``actions`` [N, H, A], ``episode``,
        ``timestep`` (episode-major order)."""
        e, t = np.divmod(np.arange(self.episodes * self.steps), self.steps)
        return {"state": self.states.reshape(-1, self.states.shape[-1]),
                "actions": self.chunks(e, t), "episode": e.astype(np.int64),
                "timestep": t.astype(np.int64)}


def run_expert_episode(task: Task, env, seed: int, *, steps: int, horizon: int,
                       action_noise: float) -> dict[str, np.ndarray | float]:
    """One expert episode from reset seed ``seed``. The executed action is the expert's plus
    Gaussian noise of std ``action_noise`` (clipped to the bounds); the *label* is always the
    expert's clean action in the state actually reached (DART-style noise injection, so the
    data covers the states a slightly wrong policy visits). Runs ``horizon - 1`` steps past the
    episode's end to label full chunks."""
    obs, _ = env.reset(seed=int(seed))
    noise_rng = np.random.default_rng([int(seed), 7])
    states = np.empty((steps, task.state_dim), np.float64)
    labels = np.empty((steps + horizon - 1, task.action_dim), np.float64)
    executed = np.empty_like(labels)
    trajectory = np.empty((steps + horizon, task.state_dim), np.float64)
    total = 0.0
    final = None
    for t in range(steps + horizon - 1):
        trajectory[t] = obs
        if t < steps:
            states[t] = obs
        a = task.expert(obs)[0]
        labels[t] = a
        executed[t] = np.clip(a + action_noise * noise_rng.standard_normal(a.shape),
                              task.action_low, task.action_high)
        obs, reward, *_ = env.step(executed[t])
        if t < steps:
            total += float(reward)
        if t == steps - 1:
            final = obs.copy()
    trajectory[-1] = obs
    return {"states": states, "labels": labels, "executed": executed, "trajectory": trajectory,
            "return": total, "final": final}


@functools.lru_cache(maxsize=8)
def collect(task_name: str, episodes: int, *, seed: int, split: str = "train", horizon: int = 1,
            action_noise: float = 0.0, steps: int | None = None,
            frame_size: int = 0) -> Demonstrations:
    """Run the expert of ``task_name`` for ``episodes`` episodes of ``split`` (cached; the arrays
    are read-only). Episode ``i`` depends only on ``(seed, split, i)`` and the settings.
    ``frame_size`` > 0 also draws a ``frame_size``-pixel frame of every state reached."""
    task = make_task(task_name)
    steps = steps or task.episode_steps
    env = task.make_env()
    try:
        seeds = np.array([episode_seed(seed, split, i) for i in range(episodes)], np.int64)
        runs = [run_expert_episode(task, env, s, steps=steps, horizon=horizon,
                                   action_noise=action_noise) for s in seeds]
    finally:
        env.close()
    final = np.stack([r["final"] for r in runs])
    trajectory = np.stack([r["trajectory"] for r in runs])
    demos = Demonstrations(
        states=np.stack([r["states"] for r in runs]).astype(np.float32),
        labels=np.stack([r["labels"] for r in runs]).astype(np.float32),
        returns=np.array([r["return"] for r in runs]), final_distance=task.distance(final),
        success=task.success(final), seeds=seeds, horizon=horizon,
        executed=np.stack([r["executed"] for r in runs]),
        trajectory=trajectory,
        frames=task.render(trajectory, frame_size) if frame_size > 0 else None)
    for arr in (demos.states, demos.labels, demos.returns, demos.final_distance, demos.success,
                demos.seeds, demos.executed, demos.trajectory, demos.frames):
        if arr is not None:
            arr.flags.writeable = False
    return demos


# ---- closed loop ---------------------------------------------------------------------------

@attrs.frozen(kw_only=True)
class RolloutResult:
    """Per-episode outcomes of :func:`rollout`: ``returns``, ``final_distance``, ``success``
    and ``near`` (the task's looser test), and the ``final_states`` [n, S] they come from."""

    returns: np.ndarray
    final_distance: np.ndarray
    success: np.ndarray
    near: np.ndarray
    final_states: np.ndarray | None = None

    def summary(self) -> dict[str, float]:
        return {"success_rate": float(self.success.mean()),
                "near_rate": float(self.near.mean()),
                "mean_return": float(self.returns.mean()),
                "std_return": float(self.returns.std()),
                "mean_final_distance": float(self.final_distance.mean())}


def rollout(task: Task, policy: Policy, seeds, *, execute: int = 1,
            steps: int | None = None) -> RolloutResult:
    """Run ``policy`` in one environment per seed, all in lockstep: every ``execute`` steps the
    policy gets the batch of current states and returns action chunks [n, k, A] (k >= execute);
    their first ``execute`` actions are executed (clipped to the bounds), then it re-plans
    (receding horizon)."""
    if execute < 1:
        raise ValueError(f"execute must be >= 1, got {execute}")
    steps = steps or task.episode_steps
    envs = [task.make_env() for _ in seeds]
    try:
        obs = np.stack([env.reset(seed=int(s))[0] for env, s in zip(envs, seeds)])
        returns = np.zeros(len(envs))
        chunk = None
        for t in range(steps):
            k = t % execute
            if k == 0:
                chunk = np.asarray(policy(obs.copy()), dtype=np.float64)
                if chunk.ndim != 3 or chunk.shape[0] != len(envs) or chunk.shape[1] < execute:
                    raise ValueError(f"policy returned actions of shape {chunk.shape}; expected "
                                     f"[{len(envs)}, >= {execute}, {task.action_dim}]")
            actions = np.clip(chunk[:, k], task.action_low, task.action_high)
            for i, env in enumerate(envs):
                o, r, *_ = env.step(actions[i])
                obs[i] = o
                returns[i] += float(r)
    finally:
        for env in envs:
            env.close()
    return RolloutResult(returns=returns, final_distance=task.distance(obs),
                         success=task.success(obs), near=task.near(obs), final_states=obs)


def execute_chunks(task: Task, states: np.ndarray, chunks: np.ndarray) -> np.ndarray:
    """Execute each action chunk [n, k, A] (clipped to the bounds) in the simulator from its
    state [n, S] (restored with :meth:`Task.restore`): the states reached [n, k + 1, S], the
    given state first."""
    states = np.asarray(states, np.float64)
    chunks = np.asarray(chunks, np.float64)
    if chunks.ndim != 3 or chunks.shape[0] != states.shape[0]:
        raise ValueError(f"execute_chunks: chunks of shape {chunks.shape} for "
                         f"{states.shape[0]} states; expected [n, k, {task.action_dim}]")
    out = np.empty((states.shape[0], chunks.shape[1] + 1, states.shape[1]), np.float64)
    env = task.make_env()
    try:
        env.reset(seed=0)
        for i, (state, chunk) in enumerate(zip(states, chunks)):
            task.restore(env, state)
            out[i, 0] = state
            for k, a in enumerate(np.clip(chunk, task.action_low, task.action_high), start=1):
                out[i, k] = env.step(a)[0]
    finally:
        env.close()
    return out


def expert_policy(task: Task) -> Policy:
    """The scripted expert as a policy (chunks of one action: use ``execute=1``)."""
    return lambda states: task.expert(states)[:, None, :]


def random_policy(task: Task, seed: int = 0, horizon: int = 1) -> Policy:
    """Uniform random actions within the bounds."""
    rng = np.random.default_rng([seed, 11])

    def policy(states: np.ndarray) -> np.ndarray:
        return rng.uniform(task.action_low, task.action_high,
                           size=(len(states), horizon, task.action_dim))
    return policy

