"""selfflow-robotics: the robotics modality plugin for selfflow (action chunks generated from the
robot's state; demonstrations from a scripted expert in gymnasium MuJoCo Reacher-v5; closed-loop
evaluation in the simulator)."""

from selfflow_robotics.adapter import DemonstrationSource, Normalization, RoboticsModality
from selfflow_robotics.sim import (
    TASKS,
    Demonstrations,
    ReacherTask,
    RolloutResult,
    Task,
    collect,
    episode_seed,
    expert_policy,
    make_task,
    random_policy,
    rollout,
)

__all__ = [
    "TASKS", "DemonstrationSource", "Demonstrations", "Normalization", "ReacherTask",
    "RoboticsModality", "RolloutResult", "Task", "collect", "episode_seed", "expert_policy",
    "make_task", "random_policy", "rollout",
]
