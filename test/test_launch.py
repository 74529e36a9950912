"""The launch file and the config file name only parameters the node declares.

The launch file itself needs ROS 2's ``launch``, which a pip-only install lacks; its
structure (which arguments set which parameters) is read from the source instead, so that
check runs everywhere.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest
import yaml
from rcl_interfaces.msg import ParameterType

from mosaic_ros.nodes.stream_params import (
    STANDARD_PARAMETERS,
    parameters,
    readme_options,
    readme_table,
    stream_yaml,
)

ROOT = Path(__file__).resolve().parent.parent
LAUNCH_FILE = ROOT / "launch" / "stream.launch.py"
CONFIG_FILE = ROOT / "config" / "stream.yaml"
README = ROOT / "README.md"
PARAMETERS_BY_NAME = parameters()
PARAMETERS = tuple(PARAMETERS_BY_NAME.values())
DECLARED = set(PARAMETERS_BY_NAME) | set(STANDARD_PARAMETERS)

PYTHON_TYPES = {
    ParameterType.PARAMETER_BOOL: bool,
    ParameterType.PARAMETER_INTEGER: int,
    ParameterType.PARAMETER_DOUBLE: float,
    ParameterType.PARAMETER_STRING: str,
    ParameterType.PARAMETER_STRING_ARRAY: list,
}


def launch_source() -> ast.Module:
    return ast.parse(LAUNCH_FILE.read_text())


def literal_assignment(module: ast.Module, name: str):
    for node in module.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{LAUNCH_FILE.name} has no {name} = ...")


def declared_launch_arguments(module: ast.Module) -> list[str]:
    return [
        call.args[0].value
        for call in ast.walk(module)
        if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "DeclareLaunchArgument"
    ]


def config_parameters() -> dict:
    config = yaml.safe_load(CONFIG_FILE.read_text())
    assert list(config) == ["/**"]
    return config["/**"]["ros__parameters"]


def test_launch_arguments_set_only_declared_parameters():
    module = launch_source()
    mapping = literal_assignment(module, "PARAMETER_ARGUMENTS")
    assert set(mapping.values()) <= DECLARED, set(mapping.values()) - DECLARED
    arguments = declared_launch_arguments(module)
    assert set(mapping) <= set(arguments)
    assert {"params_file", "namespace", "camera_topic", "model", "policy", "use_sim_time"} <= set(arguments)
    for name in literal_assignment(module, "ARRAY_PARAMETERS"):
        assert PARAMETERS_BY_NAME[name].type == ParameterType.PARAMETER_STRING_ARRAY


def test_config_file_is_the_one_derived_from_the_configuration_tree():
    assert CONFIG_FILE.read_text() == stream_yaml(), (
        "config/stream.yaml is stale: python -m mosaic_ros.nodes.stream_params > config/stream.yaml"
    )


def test_config_file_sets_every_declared_parameter_with_its_type():
    params = config_parameters()
    assert set(params) <= DECLARED, set(params) - DECLARED
    unset = {spec.name for spec in PARAMETERS if spec.default is None and spec.entry.setting.example is None}
    assert set(params) == {spec.name for spec in PARAMETERS} - unset
    for name, value in params.items():
        spec = PARAMETERS_BY_NAME[name]
        assert type(value) is PYTHON_TYPES[spec.type], f"{name}: {value!r}"
        if spec.low is not None:
            assert spec.low <= value <= spec.high, f"{name}={value} outside {spec.constraints()}"


def test_config_defaults_match_the_declared_ones():
    params = config_parameters()
    differing = {
        name: (value, PARAMETERS_BY_NAME[name].default)
        for name, value in params.items()
        if PARAMETERS_BY_NAME[name].default is not None and value != PARAMETERS_BY_NAME[name].default
    }
    assert differing == {}


def test_readme_documents_every_parameter_as_the_tree_does():
    section = README.read_text().split("\n## ROS node\n", 1)[1]
    assert readme_table() in section, "README's parameter table differs from stream_params.readme_table()"
    assert readme_options() in section.replace("\n", " "), (
        "README's policy options differ from readme_options()"
    )


def test_launch_description_builds_where_ros2_launch_is_installed():
    try:
        from launch import LaunchContext, LaunchDescription
        from launch.actions import DeclareLaunchArgument
        from launch_ros.actions import Node  # noqa: F401  (the launch file needs it)
    except ImportError:
        pytest.skip("ROS 2 'launch' is not installed here: it ships with a ROS 2 install, not on PyPI")

    spec = importlib.util.spec_from_file_location("stream_launch", LAUNCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    description = module.generate_launch_description()
    assert isinstance(description, LaunchDescription)
    names = [a.name for a in description.entities if isinstance(a, DeclareLaunchArgument)]
    assert set(module.PARAMETER_ARGUMENTS) <= set(names)
    context = LaunchContext()
    context.launch_configurations.update(
        {
            "camera_topic": "/front/image_raw",
            "camera_id": "",
            "model": "m",
            "policy": "",
            "use_sim_time": "true",
        }
    )
    overrides = module._parameter_overrides(context)
    assert overrides == {"camera_topics": ["/front/image_raw"], "model": "m", "use_sim_time": True}
