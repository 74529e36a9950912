"""ROS image fields to RGB frames, without rclpy or cv_bridge.

``decode_image`` takes the fields of a ``sensor_msgs/Image`` (any object with them, or the
fields themselves) and returns an (H, W, 3) uint8 RGB array; ``decode_compressed`` does the
same for a ``sensor_msgs/CompressedImage``'s bytes. Malformed, unsupported or too large input
raises ``ImageDecodeError`` with the reason; a compressed image's size is read from its header
before anything is decoded, so a small file that declares a huge image costs nothing.
``fit_longest_side`` shrinks a frame to a size limit.
"""

from __future__ import annotations

import io
import warnings

import cv2
import numpy as np
from PIL import Image as PilImage

# Largest image decoded by default, pixels (a 16 MP camera; 48 MiB as RGB).
DEFAULT_MAX_PIXELS = 1 << 24

# encoding -> (channels, bytes per channel). Names are those of sensor_msgs/image_encodings.
ENCODINGS: dict[str, tuple[int, int]] = {
    "rgb8": (3, 1),
    "bgr8": (3, 1),
    "rgba8": (4, 1),
    "bgra8": (4, 1),
    "mono8": (1, 1),
    "mono16": (1, 2),
    "16UC1": (1, 2),
}


class ImageDecodeError(ValueError):
    """An image that cannot be turned into a frame; the message says why."""


def _check_size(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageDecodeError(f"image of {width}x{height} pixels is above max_image_pixels ({max_pixels})")


def decode_image(
    encoding: str,
    height: int,
    width: int,
    step: int,
    is_bigendian: bool | int,
    data,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """The frame held by a ``sensor_msgs/Image``'s fields, as (height, width, 3) uint8 RGB.

    ``step`` is the row length in bytes (rows may be padded beyond ``width`` pixels).
    Grey images become three equal channels; 16-bit ones keep their high byte (value / 256),
    read in the byte order ``is_bigendian`` gives. Alpha is dropped. Images of more than
    ``max_pixels`` pixels are refused.
    """
    if encoding not in ENCODINGS:
        raise ImageDecodeError(f"unsupported encoding {encoding!r}; supported: {', '.join(ENCODINGS)}")
    channels, depth = ENCODINGS[encoding]
    if height <= 0 or width <= 0:
        raise ImageDecodeError(f"empty image: {width}x{height} pixels")
    _check_size(width, height, max_pixels)
    row_bytes = width * channels * depth
    if step < row_bytes:
        raise ImageDecodeError(
            f"step {step} B is shorter than a row of {width} px {encoding} ({row_bytes} B)"
        )
    buffer = memoryview(data).cast("B")
    if buffer.nbytes < step * height:
        raise ImageDecodeError(f"data has {buffer.nbytes} B; step x height needs {step * height} B")
    byte_order = ">" if is_bigendian else "<"
    dtype = np.dtype(np.uint8) if depth == 1 else np.dtype(f"{byte_order}u2")
    pixels = np.ndarray(
        shape=(height, width, channels),
        dtype=dtype,
        buffer=buffer,
        strides=(step, channels * depth, depth),
    )
    if depth == 2:
        pixels = (pixels >> 8).astype(np.uint8)
    if channels == 1:
        return np.repeat(pixels, 3, axis=2)
    # np.array copies: the frame must not alias the message's buffer.
    if encoding.startswith("bgr"):
        return np.array(pixels[:, :, 2::-1], order="C")
    return np.array(pixels[:, :, :3], order="C")


def decode_image_msg(msg, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """``decode_image`` over a ``sensor_msgs/Image`` message (rclpy or rosbags)."""
    return decode_image(msg.encoding, msg.height, msg.width, msg.step, msg.is_bigendian, msg.data, max_pixels)


def compressed_size(data, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) a compressed image's header declares, read without decoding its pixels.

    ``ImageDecodeError`` when the bytes are no image format this node reads, or when the
    image has more than ``max_pixels`` pixels."""
    buffer = memoryview(data).cast("B")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PilImage.DecompressionBombWarning)
            with PilImage.open(io.BytesIO(buffer)) as image:
                width, height = image.size
    except PilImage.DecompressionBombError:  # Pillow's own limit, far above any camera's
        raise ImageDecodeError(
            f"compressed image of {buffer.nbytes} B declares more than {2 * PilImage.MAX_IMAGE_PIXELS} "
            f"pixels; max_image_pixels is {max_pixels}"
        ) from None
    except Exception:  # Pillow raises several types for bytes that are no image it knows
        raise ImageDecodeError(f"compressed image of {buffer.nbytes} B could not be decoded") from None
    _check_size(width, height, max_pixels)
    return width, height


def decode_compressed(data, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The frame in a ``sensor_msgs/CompressedImage``'s bytes (JPEG, PNG, ...), as RGB uint8.

    The header's size is checked against ``max_pixels`` before decoding (a decompression bomb
    is refused without allocating its pixels)."""
    encoded = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
    if encoded.size == 0:
        raise ImageDecodeError("compressed image has no data")
    compressed_size(encoded, max_pixels)
    try:
        bgr = cv2.imdecode(encoded, cv2.IMREAD_COLOR)
    except cv2.error as error:
        raise ImageDecodeError(
            f"compressed image of {encoded.size} B could not be decoded: {error.msg}"
        ) from None
    if bgr is None:
        raise ImageDecodeError(f"compressed image of {encoded.size} B could not be decoded")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def fit_longest_side(frame: np.ndarray, max_side: int) -> np.ndarray:
    """``frame`` shrunk (area interpolation, aspect kept) so its longest side is at most
    ``max_side`` pixels; unchanged when it already fits or ``max_side`` is 0."""
    height, width = frame.shape[:2]
    longest = max(height, width)
    if max_side <= 0 or longest <= max_side:
        return frame
    scale = max_side / longest
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
