"""selfflow-robotics: the robotics modality plugin for selfflow. Two kinds: ``robotics``, an
action-chunk policy conditioned on the robot's state, and ``robotics_world``, a world model that
generates future frames and the action chunk together from the current frame (paper App. E).
Demonstrations come from a scripted expert in gymnasium MuJoCo Reacher-v5, frames are drawn from
the simulator state with numpy, and both are evaluated in closed loop in the simulator."""

from selfflow_robotics.adapter import DemonstrationSource, Normalization, RoboticsModality
from selfflow_robotics.render import render_reacher
from selfflow_robotics.sim import (
    TASKS,
    Demonstrations,
    ReacherTask,
    RolloutResult,
    Task,
    collect,
    episode_seed,
    execute_chunks,
    expert_policy,
    make_task,
    random_policy,
    rollout,
)
from selfflow_robotics.world import RoboticsWorldModality, WorldSource

__all__ = [
    "TASKS", "DemonstrationSource", "Demonstrations", "Normalization", "ReacherTask",
    "RoboticsModality", "RoboticsWorldModality", "RolloutResult", "Task", "WorldSource",
    "collect", "episode_seed", "execute_chunks", "expert_policy", "make_task", "random_policy",
    "render_reacher", "rollout",
]
