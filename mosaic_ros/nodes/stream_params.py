"""The parameters of the ``mosaic_stream`` node: one table that the node declares from, the
config file and the launch file are checked against, and the README documents."""

from __future__ import annotations

from dataclasses import dataclass

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, ParameterType


@dataclass(frozen=True)
class ParamSpec:
    """One parameter. ``live`` ones apply while the node runs; the others are read-only
    (fixed at start). ``low``/``high`` bound numbers; ``default`` None means no default."""

    name: str
    type: int
    default: object
    description: str
    live: bool = False
    low: float | None = None
    high: float | None = None

    def descriptor(self) -> ParameterDescriptor:
        when = "Applies live." if self.live else "Read-only: fixed when the node starts."
        descriptor = ParameterDescriptor(
            name=self.name, type=self.type, description=f"{self.description} {when}", read_only=not self.live
        )
        if self.type == ParameterType.PARAMETER_DOUBLE and self.low is not None:
            descriptor.floating_point_range = [
                FloatingPointRange(from_value=float(self.low), to_value=float(self.high), step=0.0)
            ]
        elif self.type == ParameterType.PARAMETER_INTEGER and self.low is not None:
            descriptor.integer_range = [
                IntegerRange(from_value=int(self.low), to_value=int(self.high), step=1)
            ]
        return descriptor

    def constraints(self) -> str:
        """Human-readable bounds, '' when there are none."""
        if self.low is None:
            return ""
        if self.type == ParameterType.PARAMETER_INTEGER:
            return f"{int(self.low)} .. {int(self.high)}"
        return f"{self.low:g} .. {self.high:g}"


P = ParameterType
PARAMETERS: tuple[ParamSpec, ...] = (
    ParamSpec(
        "camera_topics",
        P.PARAMETER_STRING_ARRAY,
        ["/camera/image_raw"],
        "Image topics, one stream each. A topic ending in /compressed carries "
        "sensor_msgs/CompressedImage, any other sensor_msgs/Image.",
    ),
    ParamSpec(
        "camera_ids",
        P.PARAMETER_STRING_ARRAY,
        None,
        "Stream names (AskVideo camera_id), one per topic; unset: derived from the topics "
        "(/front/image_raw -> front). The first camera is the default stream.",
    ),
    ParamSpec(
        "text_topics",
        P.PARAMETER_STRING_ARRAY,
        None,
        "Text topics (std_msgs/String: a speech transcript, operator notes); each message joins "
        "the memory of every camera stream, stamped at receipt on the node's clock. Unset: none.",
    ),
    ParamSpec(
        "max_text_tokens",
        P.PARAMETER_INTEGER,
        512,
        "Longest text event accepted, tokens; longer messages are dropped with a warning.",
        live=True,
        low=1,
        high=100000,
    ),
    ParamSpec(
        "sample_fps",
        P.PARAMETER_DOUBLE,
        1.0,
        "Frames per second kept from each camera, by header stamp.",
        live=True,
        low=0.01,
        high=120.0,
    ),
    ParamSpec(
        "max_frame_side",
        P.PARAMETER_INTEGER,
        448,
        "Frames are shrunk so that their longest side is at most this many pixels.",
        low=16,
        high=8192,
    ),
    ParamSpec(
        "max_image_pixels",
        P.PARAMETER_INTEGER,
        1 << 24,
        "Largest image decoded, pixels (width x height; a compressed image's header is read "
        "first, so a decompression bomb is refused without decoding it).",
        low=1,
        high=1 << 30,
    ),
    ParamSpec(
        "model",
        P.PARAMETER_STRING,
        "tiny-random:qwen2.5-vl",
        "Vision-language model: a Hugging Face id, a local folder, or tiny-random:<family> "
        "(qwen2.5-vl, qwen3-vl, llava-ov; random weights, for trying the pipeline).",
    ),
    ParamSpec("device", P.PARAMETER_STRING, "auto", "Torch device: auto, cpu, cuda or cuda:N."),
    ParamSpec(
        "pair_frames",
        P.PARAMETER_BOOL,
        False,
        "Qwen-VL models: two consecutive frames per temporal patch, as the models' video path "
        "does (half the tokens and KV per second of video; a pair's first frame waits for its second).",
    ),
    ParamSpec("dtype", P.PARAMETER_STRING, "auto", "Model dtype: auto, float32, float16 or bfloat16."),
    ParamSpec(
        "policy",
        P.PARAMETER_STRING,
        "mosaic",
        "KV policy: mosaic, dense, window, token_topk, rekv or livevlm.",
    ),
    ParamSpec(
        "budget_tokens",
        P.PARAMETER_INTEGER,
        8192,
        "Tokens of KV a question may bring to the device.",
        low=1,
        high=1 << 24,
    ),
    ParamSpec(
        "window_tokens",
        P.PARAMETER_INTEGER,
        1024,
        "Recent tokens every step attends to while frames are ingested.",
        low=0,
        high=1 << 24,
    ),
    ParamSpec(
        "host_cap_mb",
        P.PARAMETER_DOUBLE,
        0.0,
        "Cap on host KV memory per stream, MiB (bounded-memory policies); 0 = no cap.",
        low=0.0,
        high=1e9,
    ),
    ParamSpec(
        "compression",
        P.PARAMETER_STRING,
        "vsb",
        "How memory stays under host_cap_mb: vsb (LiveVLM's vision sink bucketing: keeps the "
        "tokens the stream attends to, over the whole timeline) or drop_oldest.",
    ),
    ParamSpec(
        "maintain_budget_ms",
        P.PARAMETER_DOUBLE,
        5.0,
        "Time per frame for deferred KV maintenance (cluster splits and sealing), ms; work "
        "that does not fit is done later, or on the frame's path once it is overdue.",
        low=0.0,
        high=10000.0,
    ),
    ParamSpec(
        "prefetch", P.PARAMETER_BOOL, True, "Cross-layer prefetch of retrieved KV (policies that have it)."
    ),
    ParamSpec(
        "max_question_chars",
        P.PARAMETER_INTEGER,
        2000,
        "Longest question accepted, characters.",
        live=True,
        low=1,
        high=100000,
    ),
    ParamSpec(
        "max_question_tokens",
        P.PARAMETER_INTEGER,
        512,
        "Longest question accepted, tokens of the model's tokenizer (its prefill holds the model).",
        live=True,
        low=1,
        high=100000,
    ),
    ParamSpec(
        "max_new_tokens",
        P.PARAMETER_INTEGER,
        64,
        "Answer length when a request gives 0, tokens.",
        live=True,
        low=1,
        high=4096,
    ),
    ParamSpec(
        "max_pending_questions",
        P.PARAMETER_INTEGER,
        4,
        "Questions waiting or being answered at once; more are refused with a busy error.",
        low=1,
        high=1000,
    ),
    ParamSpec(
        "action_result_timeout_s",
        P.PARAMETER_INTEGER,
        300,
        "How long a finished action goal's result is kept for a client to fetch, seconds "
        "(rclpy's own default is 10).",
        low=1,
        high=86400,
    ),
    ParamSpec(
        "status_period_s",
        P.PARAMETER_DOUBLE,
        1.0,
        "Period of ~/status and /diagnostics, seconds.",
        live=True,
        low=0.05,
        high=3600.0,
    ),
    ParamSpec(
        "remember_dialogue",
        P.PARAMETER_BOOL,
        True,
        "Each question and its answer join the stream's memory, so later questions can refer to them.",
    ),
    ParamSpec("seed", P.PARAMETER_INTEGER, 0, "Seed of tiny-random model weights.", low=0, high=2**31 - 1),
    ParamSpec(
        "memory_dir",
        P.PARAMETER_STRING,
        "",
        "Directory of the streams' memory snapshots, one subdirectory per camera id; a compatible "
        "snapshot there is restored at start. '' = no snapshots.",
    ),
    ParamSpec(
        "snapshot_period_s",
        P.PARAMETER_DOUBLE,
        0.0,
        "Period of memory snapshots (only what is new since the last one), seconds; 0 = only at "
        "a clean shutdown and on ~/save.",
        low=0.0,
        high=86400.0,
    ),
)

PARAMETERS_BY_NAME = {spec.name: spec for spec in PARAMETERS}

# Parameters every rclpy node has; the node honours use_sim_time for its clock.
STANDARD_PARAMETERS = ("use_sim_time",)

# The selected policy's options (PolicyConfig.options) are parameters too, one per option under
# this prefix, typed by their defaults: derived from the policy, so a new option needs no change here.
POLICY_OPTION_PREFIX = "policy_options."
_OPTION_TYPES = {
    bool: P.PARAMETER_BOOL,
    int: P.PARAMETER_INTEGER,
    float: P.PARAMETER_DOUBLE,
    str: P.PARAMETER_STRING,
}


def policy_option_parameters(policy: str, options: dict) -> tuple[ParamSpec, ...]:
    """One read-only parameter per option of ``policy`` (``options``: key -> default, as the
    runtime's ``policy_options(policy)`` gives them), named ``policy_options.<key>``."""
    specs = []
    for key, default in sorted(options.items()):
        kind = _OPTION_TYPES.get(type(default))
        if kind is None:
            raise TypeError(
                f"option {key!r} of policy {policy!r} has a default of type {type(default).__name__}"
            )
        specs.append(
            ParamSpec(
                POLICY_OPTION_PREFIX + key,
                kind,
                default,
                f"Option {key!r} of the {policy} KV policy (default {default!r}; see the policy's docs).",
            )
        )
    return tuple(specs)
