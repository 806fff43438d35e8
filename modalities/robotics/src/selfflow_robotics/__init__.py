"""selfflow-robotics: the robotics modality plugin for selfflow. Three kinds: ``robotics``, an
action-chunk policy conditioned on the robot's state, ``robotics_world``, a world model that
generates future frames and the action chunk together from the current frame (paper App. E), and
``robotics_language``, that world model following an instruction naming its target among two.
Demonstrations come from a scripted expert in gymnasium MuJoCo Reacher-v5, frames are drawn from
the simulator state with numpy, and both are evaluated in closed loop in the simulator."""

from selfflow_robotics.adapter import DemonstrationSource, Normalization, RoboticsModality
from selfflow_robotics.instructions import instruction, named_marker, parse_instruction
from selfflow_robotics.language import RoboticsLanguageModality
from selfflow_robotics.render import render_reacher, render_scene
from selfflow_robotics.scene import Scene, make_scene, region_of
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
    "RoboticsLanguageModality", "RoboticsModality", "RoboticsWorldModality", "RolloutResult",
    "Scene", "Task", "WorldSource", "collect", "episode_seed", "execute_chunks",
    "expert_policy", "instruction", "make_scene", "make_task", "named_marker",
    "parse_instruction", "random_policy", "region_of", "render_reacher", "render_scene",
    "rollout",
]
