"""Start the mosaic_stream node with the package's parameters (needs ROS 2's launch).

    ros2 launch mosaic_ros stream.launch.py camera_topic:=/front/image_raw policy:=mosaic

Without ROS 2's launch (a pip-only install) the same node starts with the same file:
``mosaic-ros-stream --params config/stream.yaml --ros-args -p policy:=mosaic``.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

# Launch argument -> the node parameter it sets when it is not empty.
PARAMETER_ARGUMENTS = {
    "camera_topic": "camera_topics",
    "camera_id": "camera_ids",
    "model": "model",
    "policy": "policy",
    "use_sim_time": "use_sim_time",
}
ARRAY_PARAMETERS = ("camera_topics", "camera_ids")
BOOL_PARAMETERS = ("use_sim_time",)


def _parameter_overrides(context) -> dict:
    overrides = {}
    for argument, parameter in PARAMETER_ARGUMENTS.items():
        value = LaunchConfiguration(argument).perform(context)
        if not value:
            continue
        if parameter in ARRAY_PARAMETERS:
            overrides[parameter] = [value]
        elif parameter in BOOL_PARAMETERS:
            overrides[parameter] = value.lower() in ("true", "1", "yes")
        else:
            overrides[parameter] = value
    return overrides


def _stream_node(context) -> list:
    return [
        Node(
            package="mosaic_ros",
            executable="mosaic_stream",
            name="mosaic_stream",
            namespace=LaunchConfiguration("namespace"),
            output="screen",
            parameters=[LaunchConfiguration("params_file"), _parameter_overrides(context)],
        )
    ]


def generate_launch_description() -> LaunchDescription:
    default_params = os.path.join(get_package_share_directory("mosaic_ros"), "config", "stream.yaml")
    return LaunchDescription(
        [
            DeclareLaunchArgument(
                "params_file", default_value=default_params, description="YAML parameters of the node"
            ),
            DeclareLaunchArgument("namespace", default_value="", description="Namespace of the node"),
            DeclareLaunchArgument(
                "camera_topic", default_value="", description="One camera topic instead of params_file's list"
            ),
            DeclareLaunchArgument(
                "camera_id", default_value="", description="Name of that camera (AskVideo camera_id)"
            ),
            DeclareLaunchArgument("model", default_value="", description="Model spec, over params_file"),
            DeclareLaunchArgument("policy", default_value="", description="KV policy, over params_file"),
            DeclareLaunchArgument(
                "use_sim_time",
                default_value="",
                description="true: follow /clock (e.g. a bag); empty: as params_file says (default false)",
            ),
            OpaqueFunction(function=_stream_node),
        ]
    )
