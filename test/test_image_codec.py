"""ROS image fields to RGB frames: every encoding, padded rows, byte order, malformed input."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from helpers import assert_documented, png_declaring

from mosaic_ros.nodes.image_codec import (
    ENCODINGS,
    ImageDecodeError,
    compressed_size,
    decode_compressed,
    decode_image,
    fit_longest_side,
)

H, W = 5, 7


def rgb_frame(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def padded(rows: np.ndarray, pad: int) -> tuple[bytes, int]:
    """Row bytes of ``rows`` (H, row_bytes) followed by ``pad`` junk bytes per row; (data, step)."""
    junk = np.full((rows.shape[0], pad), 0xAB, np.uint8)
    data = np.concatenate([rows, junk], axis=1)
    return data.tobytes(), data.shape[1]


@pytest.mark.parametrize("pad", [0, 3])
@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8"])
def test_colour_encodings_give_rgb(encoding, pad):
    rgb = rgb_frame()
    alpha = np.full((H, W, 1), 77, np.uint8)
    pixels = {
        "rgb8": rgb,
        "bgr8": rgb[:, :, ::-1],
        "rgba8": np.concatenate([rgb, alpha], axis=2),
        "bgra8": np.concatenate([rgb[:, :, ::-1], alpha], axis=2),
    }[encoding]
    data, step = padded(pixels.reshape(H, -1), pad)
    out = decode_image(encoding, H, W, step, False, data)
    assert out.shape == (H, W, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, rgb)


@pytest.mark.parametrize("pad", [0, 1])
def test_mono8_becomes_three_equal_channels(pad):
    grey = rgb_frame()[:, :, 0]
    data, step = padded(grey, pad)
    out = decode_image("mono8", H, W, step, False, data)
    for channel in range(3):
        np.testing.assert_array_equal(out[:, :, channel], grey)


@pytest.mark.parametrize("encoding", ["mono16", "16UC1"])
@pytest.mark.parametrize("bigendian", [False, True])
@pytest.mark.parametrize("pad", [0, 2])
def test_16_bit_grey_keeps_the_high_byte_in_the_stated_byte_order(encoding, bigendian, pad):
    values = np.random.default_rng(1).integers(0, 65536, (H, W), dtype=np.uint16)
    stored = values.astype(">u2" if bigendian else "<u2")
    data, step = padded(stored.view(np.uint8).reshape(H, W * 2), pad)
    out = decode_image(encoding, H, W, step, bigendian, data)
    expected = (values >> 8).astype(np.uint8)
    for channel in range(3):
        np.testing.assert_array_equal(out[:, :, channel], expected)


def test_16_bit_with_the_wrong_byte_order_reads_different_pixels():
    values = np.array([[0x0102, 0xFF00]], dtype="<u2")
    data = values.tobytes()
    assert decode_image("mono16", 1, 2, 4, False, data)[0, :, 0].tolist() == [0x01, 0xFF]
    assert decode_image("mono16", 1, 2, 4, True, data)[0, :, 0].tolist() == [0x02, 0x00]


def test_accepts_the_buffer_types_messages_carry():
    import array

    rgb = rgb_frame()
    raw = rgb.tobytes()
    for data in (raw, bytearray(raw), array.array("B", raw), np.frombuffer(raw, np.uint8)):
        np.testing.assert_array_equal(decode_image("rgb8", H, W, W * 3, False, data), rgb)


def test_output_does_not_alias_the_message_buffer():
    raw = bytearray(rgb_frame().tobytes())
    out = decode_image("rgb8", H, W, W * 3, False, raw)
    before = out.copy()
    raw[:] = bytes(len(raw))
    np.testing.assert_array_equal(out, before)


@pytest.mark.parametrize(
    ("encoding", "height", "width", "step", "size", "reason"),
    [
        ("yuv422", H, W, W * 2, H * W * 2, "unsupported encoding 'yuv422'"),
        ("8UC3", H, W, W * 3, H * W * 3, "unsupported encoding '8UC3'"),
        ("rgb8", H, W, W * 3, H * W * 3 - 1, "data has"),
        ("rgb8", H, W, W * 3 - 1, H * W * 3, "step"),
        ("mono16", H, W, W, H * W * 2, "step"),
        ("rgb8", 0, W, W * 3, 0, "empty image"),
        ("rgb8", H, 0, 0, 0, "empty image"),
    ],
)
def test_malformed_images_are_rejected_with_the_reason(encoding, height, width, step, size, reason):
    with pytest.raises(ImageDecodeError, match=reason) as refused:
        decode_image(encoding, height, width, step, False, bytes(size))
    assert_documented(str(refused.value))


def test_every_listed_encoding_decodes():
    for encoding, (channels, depth) in ENCODINGS.items():
        data = bytes(H * W * channels * depth)
        assert decode_image(encoding, H, W, W * channels * depth, False, data).shape == (H, W, 3)


def test_compressed_png_round_trips_to_rgb():
    rgb = rgb_frame()
    ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    np.testing.assert_array_equal(decode_compressed(png.tobytes()), rgb)


def test_compressed_jpeg_decodes_close_to_the_original():
    rgb = np.zeros((32, 48, 3), np.uint8)
    rgb[:, :24] = (200, 30, 30)
    rgb[:, 24:] = (20, 40, 220)
    _, jpeg = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    out = decode_compressed(jpeg.tobytes())
    assert out.shape == rgb.shape
    assert np.abs(out.astype(int) - rgb).mean() < 4


@pytest.mark.parametrize(
    ("data", "reason"), [(b"", "no data"), (b"\xff\xd8 not really a jpeg", "could not be")]
)
def test_corrupt_compressed_images_are_rejected(data, reason):
    with pytest.raises(ImageDecodeError, match=reason) as refused:
        decode_compressed(data)
    assert_documented(str(refused.value))


@pytest.mark.parametrize(
    ("width", "height", "reason"),
    [
        # over OpenCV's own limit: cv2.imdecode raises cv2.error, which once escaped the callback
        (100_000, 100_000, r"declares more than \d+ pixels; max_image_pixels is 16777216"),
        # under OpenCV's limit: it would allocate 432 MB of zeros
        (12_000, 12_000, r"image of 12000x12000 pixels is above max_image_pixels \(16777216\)"),
    ],
)
def test_compressed_images_larger_than_the_limit_are_refused_from_their_header(width, height, reason):
    bomb = png_declaring(width, height)
    assert len(bomb) < 100
    with pytest.raises(ImageDecodeError, match=reason) as refused:
        decode_compressed(bomb)
    assert_documented(str(refused.value))


def test_the_pixel_limit_is_the_callers_and_real_sizes_are_read_from_the_header():
    _, png = cv2.imencode(".png", rgb_frame())
    assert compressed_size(png.tobytes()) == (W, H)
    assert decode_compressed(png.tobytes(), max_pixels=W * H).shape == (H, W, 3)
    with pytest.raises(ImageDecodeError, match=f"image of {W}x{H} pixels is above max_image_pixels \\(34\\)"):
        decode_compressed(png.tobytes(), max_pixels=W * H - 1)


def test_raw_images_larger_than_the_limit_are_refused_before_any_copy():
    with pytest.raises(ImageDecodeError, match="image of 7x5 pixels is above max_image_pixels"):
        decode_image("rgb8", H, W, W * 3, False, rgb_frame().tobytes(), max_pixels=W * H - 1)
    # a header that declares a huge image over a tiny buffer is refused for its size first
    with pytest.raises(ImageDecodeError, match="image of 100000x100000 pixels"):
        decode_image("rgb8", 100_000, 100_000, 300_000, False, bytes(10))


def test_a_truncated_png_is_refused_not_raised_from_opencv():
    _, png = cv2.imencode(".png", rgb_frame())
    with pytest.raises(ImageDecodeError, match="could not be decoded") as refused:
        decode_compressed(png.tobytes()[:40])
    assert_documented(str(refused.value))


@pytest.mark.parametrize(
    ("shape", "max_side", "expected"),
    [
        ((480, 640), 320, (240, 320)),
        ((640, 480), 320, (320, 240)),
        ((100, 50), 320, (100, 50)),
        ((100, 50), 0, (100, 50)),
    ],
)
def test_fit_longest_side_keeps_the_aspect_ratio(shape, max_side, expected):
    frame = np.zeros((*shape, 3), np.uint8)
    assert fit_longest_side(frame, max_side).shape == (*expected, 3)
