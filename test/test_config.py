"""The configuration tree: documented settings, flat outside names, refusals that list the known names."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from mosaic_ros.runtime.bench.runner import BenchConfig
from mosaic_ros.runtime.config import (
    OPTION_HELP,
    ConfigError,
    ModelConfig,
    add_arguments,
    build,
    entries,
    from_arguments,
    parse_options,
    policy_option_entries,
)
from mosaic_ros.runtime.kv.policy import PolicyConfig, known_policies
from mosaic_ros.runtime.session import SessionConfig


@pytest.mark.parametrize("root", [SessionConfig, BenchConfig, ModelConfig])
def test_every_setting_of_the_tree_is_documented_and_its_default_in_range(root):
    for entry in entries(root):
        assert "not documented" not in entry.setting.description, entry.name
        if entry.default is not None and entry.kind is not dict:
            entry.check(entry.default)


def test_every_policy_option_is_documented_and_every_description_is_an_option():
    taken = set()
    for policy in known_policies():
        for entry in policy_option_entries(policy):
            assert entry.name in OPTION_HELP, f"{policy}.{entry.name} lacks a description in OPTION_HELP"
            entry.check(entry.default)
            taken.add(entry.name)
    assert set(OPTION_HELP) == taken


def test_nested_settings_have_flat_outside_names_and_a_rescaled_unit():
    names = [e.name for e in entries(SessionConfig)]
    assert names[:3] == ["policy", "budget_tokens", "sink_tokens"]
    assert "kv" not in names and "host_cap_bytes" not in names
    config = build(SessionConfig, {"policy": "window", "host_cap_mb": 1.5, "budget_tokens": 2048})
    assert (config.policy, config.kv.host_cap_bytes, config.kv.budget_tokens) == ("window", 1572864, 2048)
    (cap,) = [e for e in entries(config) if e.name == "host_cap_mb"]
    assert (cap.kind, cap.default, cap.path) == (float, 1.5, ("kv", "host_cap_bytes"))


def test_unknown_settings_are_refused_with_the_known_ones():
    with pytest.raises(ConfigError) as direct:
        SessionConfig(budget=16)
    assert str(direct.value).startswith("SessionConfig: unknown setting(s) budget; known: policy, kv, ")
    with pytest.raises(
        ConfigError, match=r"^PolicyConfig: unknown setting\(s\) sinks; known: budget_tokens, "
    ):
        PolicyConfig(sinks=4)
    with pytest.raises(ConfigError) as flat:
        build(SessionConfig, {"budget": 16, "polcy": "dense"})
    assert str(flat.value).startswith("unknown setting(s) budget, polcy; known: budget_tokens, compression, ")
    with pytest.raises(
        ConfigError, match=r"policy 'dense': unknown option\(s\) run_penalty; known: compress_to, "
    ):
        SessionConfig(policy="dense", kv=PolicyConfig(options={"run_penalty": 0.5}))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"compression": "lz4"}, "unknown compression 'lz4'; known: vsb, drop_oldest"),
        ({"policy": "nonsense"}, "unknown KV policy 'nonsense'; known: dense, livevlm, mosaic, "),
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1, got 0"),
        ({"max_new_tokens": 5000}, "max_new_tokens must be <= 4096, got 5000"),
        ({"host_cap_mb": -1.0}, "host_cap_mb must be >= 0, got -1.0"),
        (
            {"policy": "mosaic", "policy_options": {"prefetch_share": 2.0}},
            "prefetch_share must be <= 1, got 2.0",
        ),
    ],
)
def test_values_outside_their_setting_are_refused_clearly(settings, message):
    with pytest.raises(ConfigError) as refused:
        build(SessionConfig, settings)
    assert str(refused.value).startswith(message)


def test_flags_come_from_the_tree_with_their_old_spellings():
    parser = argparse.ArgumentParser()
    add_arguments(parser, BenchConfig())
    old = ["--budget", "96", "--sinks", "4", "--window", "16", "--maintain-ms", "50", "--no-prefetch"]
    cfg = from_arguments(BenchConfig(), parser.parse_args(old))
    assert (cfg.kv.budget_tokens, cfg.kv.sink_tokens, cfg.kv.window_tokens) == (96, 4, 16)
    assert (cfg.maintain_budget_ms, cfg.kv.prefetch) == (50.0, False)
    new = [
        "--budget-tokens",
        "96",
        "--sink-tokens",
        "4",
        "--window-tokens",
        "16",
        "--maintain-budget-ms",
        "50",
    ]
    assert from_arguments(BenchConfig(), parser.parse_args([*new, "--no-prefetch"])) == cfg
    assert from_arguments(BenchConfig(), parser.parse_args([])) == BenchConfig()
    with pytest.raises(ConfigError, match="dense_questions must be >= 1, got 0"):
        from_arguments(BenchConfig(), parser.parse_args(["--dense-questions", "0"]))


def test_command_line_options_are_typed_by_their_defaults_and_checked():
    assert parse_options("mosaic", ["run_penalty=0.5", "cpu_prefetch=true", "max_cluster_tokens=64"]) == {
        "run_penalty": 0.5,
        "cpu_prefetch": True,
        "max_cluster_tokens": 64,
    }
    with pytest.raises(ConfigError, match=r"policy 'window': unknown option bogus; known: compress_to, "):
        parse_options("window", ["bogus=1"])
    with pytest.raises(ConfigError, match="option page_rows takes a int, got 'many'"):
        parse_options("window", ["page_rows=many"])
    with pytest.raises(ConfigError, match="unknown aggregate 'mean'; known: sum, max"):
        parse_options("token_topk", ["aggregate=mean"])


def test_a_session_keeps_its_preamble_as_sinks_unless_told_otherwise():
    assert SessionConfig().kv.sink_tokens is None
    assert dataclasses.replace(SessionConfig().kv, sink_tokens=3).sink_tokens == 3
    assert BenchConfig().kv.sink_tokens == 32
