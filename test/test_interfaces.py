"""The generated ROS interfaces: they import, have the agreed fields, and survive CDR."""

from __future__ import annotations

import typing

import pytest
from builtin_interfaces.msg import Time
from helpers import distinct_latency_stats
from mosaic_ros.action import AskVideo as AskVideoAction
from mosaic_ros.msg import LatencyStats, StreamStatus
from mosaic_ros.srv import AskVideo
from rclpy.serialization import deserialize_message, serialize_message
from std_msgs.msg import Header

from mosaic_ros.runtime import stats as runtime_stats

LATENCY_STATS_FIELDS = {
    "policy": "string",
    "queue_ms": "double",
    "vision_encode_ms": "double",
    "retrieval_ms": "double",
    "transfer_ms": "double",
    "copy_device_ms": "double",
    "prefill_ms": "double",
    "ttft_ms": "double",
    "decode_ms": "double",
    "total_ms": "double",
    "tokens_generated": "uint32",
    "frames_in_memory": "uint32",
    "tokens_in_memory": "uint64",
    "device_kv_bytes": "uint64",
    "host_kv_bytes": "uint64",
    "clusters_in_memory": "uint32",
    "tokens_retrieved": "uint64",
    "bytes_moved": "uint64",
    "copies": "uint32",
    "prefetch_hit_rate": "float",
    "tokens_evicted": "uint64",
    "disk_fetch_ms": "double",
    "disk_bytes_read": "uint64",
    "disk_kv_bytes": "uint64",
}

STREAM_STATUS_FIELDS = {
    "header": "std_msgs/Header",
    "stream_id": "string",
    "topic": "string",
    "frames_received": "uint64",
    "frames_sampled": "uint64",
    "frames_ingested": "uint64",
    "frames_dropped_busy": "uint64",
    "frames_dropped_invalid": "uint64",
    "faults": "uint64",
    "texts_ingested": "uint64",
    "texts_dropped": "uint64",
    "ingest_lag_ms": "double",
    "ingest_ms_mean": "double",
    "stream_seconds": "double",
    "tokens_in_memory": "uint64",
    "host_kv_bytes": "uint64",
    "device_kv_bytes": "uint64",
    "disk_kv_bytes": "uint64",
    "clusters_in_memory": "uint32",
    "tokens_evicted": "uint64",
    "policy": "string",
    "snapshot_age_s": "double",
    "snapshot_bytes": "uint64",
}

ASK_FIELDS = {
    "question": "string",
    "camera_id": "string",
    "window_seconds": "double",
    "window_start": "builtin_interfaces/Time",
    "window_end": "builtin_interfaces/Time",
    "max_new_tokens": "uint32",
}

ANSWER_FIELDS = {
    "success": "boolean",
    "answer": "string",
    "error": "string",
    "stats": "mosaic_ros/LatencyStats",
}

FEEDBACK_FIELDS = {
    "stage": "string",
    "partial_answer": "string",
    "tokens_generated": "uint32",
}

# Python type of a runtime dataclass field for each ROS field type it may map to.
ROS_TYPE_TO_PYTHON = {"string": str, "double": float, "float": float, "uint32": int, "uint64": int}


def fields_in_order(message_type) -> list[tuple[str, str]]:
    return list(message_type.get_fields_and_field_types().items())


@pytest.mark.parametrize(
    ("message_type", "expected"),
    [
        (LatencyStats, LATENCY_STATS_FIELDS),
        (StreamStatus, STREAM_STATUS_FIELDS),
        (AskVideo.Request, ASK_FIELDS),
        (AskVideo.Response, ANSWER_FIELDS),
        (AskVideoAction.Goal, ASK_FIELDS),
        (AskVideoAction.Result, ANSWER_FIELDS),
        (AskVideoAction.Feedback, FEEDBACK_FIELDS),
    ],
    ids=lambda value: getattr(value, "__qualname__", ""),
)
def test_interface_has_the_agreed_fields_in_order(message_type, expected):
    assert fields_in_order(message_type) == list(expected.items())


def test_latency_stats_msg_mirrors_the_runtime_dataclass_names_order_and_types():
    assert list(LatencyStats.get_fields_and_field_types()) == runtime_stats.LatencyStats.field_names()
    hints = typing.get_type_hints(runtime_stats.LatencyStats)
    for name, ros_type in LatencyStats.get_fields_and_field_types().items():
        assert hints[name] is ROS_TYPE_TO_PYTHON[ros_type], name


def test_runtime_stats_convert_to_the_msg_field_for_field():
    stats = distinct_latency_stats()
    message = LatencyStats(check_fields=True, **stats.as_dict())
    for name, value in stats.as_dict().items():
        assert getattr(message, name) == value, name


def test_defaults_are_empty_and_zero():
    assert LatencyStats() == LatencyStats(**runtime_stats.LatencyStats().as_dict())
    request = AskVideo.Request()
    assert (request.question, request.camera_id, request.window_seconds, request.max_new_tokens) == (
        "",
        "",
        0.0,
        0,
    )
    assert request.window_start == Time(sec=0, nanosec=0)
    assert request.window_end == Time(sec=0, nanosec=0)
    response = AskVideo.Response()
    assert (response.success, response.answer, response.error) == (False, "", "")
    assert response.stats == LatencyStats()
    status = StreamStatus()
    assert status.frames_received == 0 and status.stream_seconds == 0.0 and status.policy == ""
    feedback = AskVideoAction.Feedback()
    assert (feedback.stage, feedback.partial_answer, feedback.tokens_generated) == ("", "", 0)


@pytest.mark.parametrize(
    ("field", "too_large"),
    [("tokens_generated", 2**32), ("bytes_moved", 2**64), ("copies", -1)],
)
def test_integer_fields_reject_values_outside_their_width(field, too_large):
    message = LatencyStats(check_fields=True)
    with pytest.raises(AssertionError, match=field):
        setattr(message, field, too_large)


def ask_request() -> AskVideo.Request:
    return AskVideo.Request(
        question="Qu'a fait le robot près de la porte ? 门口发生了什么？",
        camera_id="front_left",
        window_seconds=42.5,
        window_start=Time(sec=1_700_000_000, nanosec=123_456_789),
        window_end=Time(sec=1_700_000_042, nanosec=999_999_999),
        max_new_tokens=2**32 - 1,
    )


def round_trip_cases() -> list:
    stats = LatencyStats(**distinct_latency_stats().as_dict())
    request = ask_request()
    return [
        stats,
        StreamStatus(
            header=Header(stamp=Time(sec=1_700_000_001, nanosec=5), frame_id="caméra_avant"),
            stream_id="front",
            topic="/camera/front/image_raw",
            frames_received=2**40 + 1,
            frames_sampled=2**33 + 2,
            frames_ingested=2**33 + 3,
            frames_dropped_busy=4,
            frames_dropped_invalid=5,
            ingest_lag_ms=6.5,
            ingest_ms_mean=7.25,
            stream_seconds=3600.125,
            tokens_in_memory=2**41 + 8,
            host_kv_bytes=2**42 + 9,
            device_kv_bytes=2**43 + 10,
            disk_kv_bytes=2**43 + 11,
            clusters_in_memory=2**32 - 1,
            tokens_evicted=2**44 + 12,
            policy="livevlm",
            snapshot_age_s=13.5,
            snapshot_bytes=2**45 + 14,
        ),
        request,
        AskVideo.Response(success=True, answer="Il a ouvert la porte ✓ 开门", error="", stats=stats),
        AskVideo.Response(success=False, answer="", error="unknown camera_id 'rear' ✗", stats=stats),
        AskVideoAction.Goal(**{name: getattr(request, name) for name in ASK_FIELDS}),
        AskVideoAction.Result(success=True, answer="à gauche → 左", error="", stats=stats),
        AskVideoAction.Feedback(stage="decoding", partial_answer="à gauche", tokens_generated=2),
    ]


@pytest.mark.parametrize("message", round_trip_cases(), ids=lambda message: type(message).__name__)
def test_message_survives_serialization_round_trip(message):
    data = serialize_message(message)
    assert isinstance(data, bytes) and len(data) > 0
    restored = deserialize_message(data, type(message))
    assert restored == message
    assert restored is not message


def test_round_trip_keeps_extreme_values():
    stats = LatencyStats(
        tokens_generated=2**32 - 1,
        bytes_moved=2**64 - 1,
        total_ms=1e300,
        prefetch_hit_rate=1.0,
        policy="p" * 10_000,
    )
    restored = deserialize_message(serialize_message(stats), LatencyStats)
    assert restored.tokens_generated == 2**32 - 1
    assert restored.bytes_moved == 2**64 - 1
    assert restored.total_ms == 1e300
    assert restored.prefetch_hit_rate == 1.0
    assert restored.policy == "p" * 10_000


def test_action_exposes_the_types_rclpy_needs():
    implementation = AskVideoAction.Impl
    send_goal = implementation.SendGoalService
    assert "goal" in send_goal.Request.get_fields_and_field_types()
    assert send_goal.Request.get_fields_and_field_types()["goal"] == "mosaic_ros/AskVideo_Goal"
    result_fields = implementation.GetResultService.Response.get_fields_and_field_types()
    assert result_fields["result"] == "mosaic_ros/AskVideo_Result"
    feedback_fields = implementation.FeedbackMessage.get_fields_and_field_types()
    assert feedback_fields["feedback"] == "mosaic_ros/AskVideo_Feedback"
