"""The parameters of the ``mosaic_stream`` node, derived from the configuration tree.

``NodeConfig`` is the node's level of the tree (``runtime.config``): its own settings, the
model's (``ModelConfig``) and the streams' (``SessionConfig``, which holds the policy's
``PolicyConfig``). Everything here is derived from it: the declared parameters with their
``ParameterDescriptor``\\ s (``parameters``), one read-only parameter per option of the selected
policy (``policy_option_parameters``), the YAML file (``stream_yaml``; ``config/stream.yaml`` is
its output, ``python -m mosaic_ros.nodes.stream_params > config/stream.yaml``) and the README's
parameter table (``readme_table``). A setting added to any level of the tree is a parameter,
a YAML key and a table row without a change here or in the node.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, ParameterType

from mosaic_ros.runtime.config import (
    Entry,
    ModelConfig,
    build,
    check,
    entries,
    nested,
    policy_option_entries,
    setting,
    strict,
)
from mosaic_ros.runtime.kv.policy import known_policies
from mosaic_ros.runtime.session import SessionConfig


@strict
@dataclass
class NodeConfig:
    """What the node runs: its cameras and service limits, the model, and every stream's session."""

    camera_topics: list[str] = setting(
        ["/camera/image_raw"],
        "Image topics, one stream each. A topic ending in /compressed carries "
        "sensor_msgs/CompressedImage, any other sensor_msgs/Image.",
    )
    camera_ids: list[str] | None = setting(
        None,
        "Stream names (AskVideo camera_id), one per topic; unset: derived from the topics "
        "(/front/image_raw -> front). The first camera is the default stream.",
        example=["camera"],
    )
    text_topics: list[str] | None = setting(
        None,
        "Text topics (std_msgs/String: a speech transcript, operator notes); each message joins "
        "the memory of every camera stream, stamped at receipt on the node's clock. Unset or "
        '[""] (ROS cannot type an empty YAML list): none.',
        example=[""],
    )
    sample_fps: float = setting(
        1.0,
        "Frames kept from each camera, by header stamp.",
        unit="frames/s",
        low=0.01,
        high=120.0,
        live=True,
    )
    max_frame_side: int = setting(
        448,
        "Frames are shrunk so that their longest side is at most this long.",
        unit="px",
        low=16,
        high=8192,
    )
    max_image_pixels: int = setting(
        1 << 24,
        "Largest image decoded, width x height (a compressed image's header is read first, so a "
        "decompression bomb is refused without decoding it).",
        unit="pixels",
        low=1,
        high=1 << 30,
    )
    vlm: ModelConfig = nested(ModelConfig)
    session: SessionConfig = nested(SessionConfig, policy="mosaic")
    max_pending_questions: int = setting(
        4,
        "Questions waiting or being answered at once; more are refused with a busy error.",
        low=1,
        high=1000,
    )
    action_result_timeout_s: int = setting(
        300,
        "How long a finished action goal's result is kept for a client to fetch (rclpy's own default is 10).",
        unit="s",
        low=1,
        high=86400,
    )
    status_period_s: float = setting(
        1.0, "Period of ~/status and /diagnostics.", unit="s", low=0.05, high=3600.0, live=True
    )
    memory_dir: str = setting(
        "",
        "Directory of the streams' memory snapshots, one subdirectory per camera id; a compatible "
        "snapshot there is restored at start. '' = no snapshots.",
    )
    snapshot_period_s: float = setting(
        0.0,
        "Period of memory snapshots (only what is new since the last one); 0 = only at a clean "
        "shutdown and on ~/save.",
        unit="s",
        low=0.0,
        high=86400.0,
    )

    def __post_init__(self) -> None:
        check(self)


P = ParameterType
_TYPES = {
    bool: P.PARAMETER_BOOL,
    int: P.PARAMETER_INTEGER,
    float: P.PARAMETER_DOUBLE,
    str: P.PARAMETER_STRING,
    list: P.PARAMETER_STRING_ARRAY,
}
_TYPE_NAMES = {
    P.PARAMETER_BOOL: "bool",
    P.PARAMETER_INTEGER: "int",
    P.PARAMETER_DOUBLE: "double",
    P.PARAMETER_STRING: "string",
    P.PARAMETER_STRING_ARRAY: "string[]",
}


@dataclass(frozen=True)
class ParamSpec:
    """One parameter. ``live`` ones apply while the node runs; the others are read-only
    (fixed at start). ``default`` None means no default (declared by type, unset)."""

    entry: Entry

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def type(self) -> int:
        return _TYPES[self.entry.kind]

    @property
    def default(self) -> object:
        return self.entry.default

    @property
    def live(self) -> bool:
        return self.entry.setting.live

    @property
    def low(self) -> float | None:
        return self.entry.setting.low

    @property
    def high(self) -> float | None:
        return self.entry.setting.high

    def constraints(self) -> str:
        """Human-readable bounds or choices, '' when there are none."""
        return self.entry.constraints

    def descriptor(self) -> ParameterDescriptor:
        when = "Applies live." if self.live else "Read-only: fixed when the node starts."
        descriptor = ParameterDescriptor(
            name=self.name, type=self.type, description=f"{self.entry.help()} {when}", read_only=not self.live
        )
        if self.type == P.PARAMETER_DOUBLE and self.low is not None:
            descriptor.floating_point_range = [
                FloatingPointRange(from_value=float(self.low), to_value=float(self.high), step=0.0)
            ]
        elif self.type == P.PARAMETER_INTEGER and self.low is not None:
            descriptor.integer_range = [
                IntegerRange(from_value=int(self.low), to_value=int(self.high), step=1)
            ]
        elif self.entry.setting.allowed():
            descriptor.additional_constraints = self.constraints()
        return descriptor


# The selected policy's options (PolicyConfig.options) are parameters too, one per option under
# this prefix, typed by their defaults: derived from the policy, so a new option needs no change here.
POLICY_OPTION_PREFIX = "policy_options."


def parameters() -> dict[str, ParamSpec]:
    """The node's parameters by name, in the tree's order, derived from ``NodeConfig`` when called
    (so a setting added to the tree, even by a test, is there)."""
    return {e.name: ParamSpec(e) for e in entries(NodeConfig) if e.kind is not dict}


# Parameters every rclpy node has; the node honours use_sim_time for its clock.
STANDARD_PARAMETERS = ("use_sim_time",)


def policy_option_parameters(policy: str) -> tuple[ParamSpec, ...]:
    """One read-only parameter per option of ``policy``, named ``policy_options.<key>``, typed and
    defaulted by the policy's own default, described and bounded by ``runtime.config.OPTION_HELP``.
    ``ValueError`` listing the known policies for an unknown one."""
    return tuple(
        ParamSpec(Entry(e.path, POLICY_OPTION_PREFIX + e.name, e.kind, False, e.default, e.setting))
        for e in policy_option_entries(policy)
    )


def node_config(values: dict[str, object]) -> NodeConfig:
    """The ``NodeConfig`` of parameter values by name (``policy_options``: the options' dict);
    parameters left out keep their defaults. ``ConfigError`` for an unknown name or a value
    out of its range."""
    return build(NodeConfig, values, what="parameter")


# ---------------------------------------------------------------------------------- YAML, README

_YAML_HEADER = """\
# Parameters of the mosaic_stream node (mosaic-ros-stream --params config/stream.yaml, or the
# launch file's params_file). Generated from the configuration tree by
# `python -m mosaic_ros.nodes.stream_params > config/stream.yaml`; a test keeps it so.
# Every key is described in `ros2 param describe` and the README.
/**:
  ros__parameters:
"""


def _comment(text: str) -> str:
    return "".join(f"    # {line}\n" for line in textwrap.wrap(text, 90))


def stream_yaml() -> str:
    """The node's YAML parameter file: every parameter at its default, each after its description."""
    out = [_YAML_HEADER]
    for spec in parameters().values():
        out.append(_comment(spec.entry.help()))
        value = spec.default if spec.default is not None else spec.entry.setting.example
        line = f"{spec.name}: {json.dumps(value)}"
        out.append(f"    {line}\n" if value is not None else f"    # {line.split(':')[0]}: (unset)\n")
        if spec.name == "policy":
            out.append(_comment(_options_note()))
    return "".join(out)


def _options_note() -> str:
    return (
        "The policy's options, e.g. (mosaic) policy_options: {run_penalty: 1.0, cpu_prefetch: false}; "
        "`ros2 param list /mosaic_stream` shows them all as policy_options.<key>."
    )


def readme_table() -> str:
    """The README's table of parameters (markdown), one row per parameter."""
    rows = [
        "| parameter | type | default | range | live | meaning |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for spec in parameters().values():
        default = "(unset)" if spec.default is None else f"`{json.dumps(spec.default)}`"
        live = "yes" if spec.live else "no"
        meaning = spec.entry.setting.description
        if spec.entry.setting.unit:
            meaning = f"{meaning.removesuffix('.')} ({spec.entry.setting.unit})."
        cells = (f"`{spec.name}`", _TYPE_NAMES[spec.type], default, spec.constraints(), live, meaning)
        rows.append(f"| {' | '.join(cells)} |")
    return "\n".join(rows) + "\n"


def readme_options() -> str:
    """The README's sentence listing every policy's options with their defaults."""
    per_policy = {name: {e.name: e.default for e in policy_option_entries(name)} for name in known_policies()}
    common = set.intersection(*(set(options) for options in per_policy.values()))
    first = next(iter(per_policy.values()))
    listed = ", ".join(f"`{key}` ({first[key]!r})" for key in sorted(common))
    own = []
    for name, options in per_policy.items():
        keys = sorted(set(options) - common)
        own.append(f"`{name}`: " + (", ".join(f"`{k}` ({options[k]!r})" for k in keys) or "none of its own"))
    return f"Every policy takes {listed}; besides, {'; '.join(own)}."


if __name__ == "__main__":  # the YAML file; with "readme": the README's table and options sentence
    import sys

    print(stream_yaml() if sys.argv[1:] != ["readme"] else f"{readme_table()}\n{readme_options()}", end="")
