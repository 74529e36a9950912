"""One configuration tree, and what is derived from it.

The settings of a stream are dataclasses nested in one another (``SessionConfig`` holds the
policy's ``PolicyConfig``, whose ``options`` are the selected policy's own; the node's
``NodeConfig`` holds a ``ModelConfig`` and a ``SessionConfig``). Each field carries its
documentation as metadata: a ``Setting`` (description, unit, range or choices, whether it
applies live, its name outside the code). From the tree, without a list written anywhere else:

- the node's parameters and their ``ParameterDescriptor``\\ s (``nodes.stream_params``),
- the ``mosaic-ros-run`` and ``mosaic-ros-bench`` flags (``add_arguments``/``from_arguments``),
- the node's YAML file (``nodes.stream_params.stream_yaml``; a test keeps
  ``config/stream.yaml`` equal to it).

Outside the code a setting has one flat name (nested dataclasses contribute their fields to
their parent's names, so ``SessionConfig.kv.budget_tokens`` is ``budget_tokens``); ``Setting.name``
and ``Setting.scale`` rename and rescale a field (``host_cap_bytes`` is ``host_cap_mb`` in MiB).
A policy's options are named ``policy_options.<key>`` on the node and in YAML, and given as
``--option`` on the command lines. Unknown names are refused with the known ones
(``build``, ``strict``), and each config checks its values against its settings (``check``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A setting that is unknown or out of its range; the message says which and what is allowed."""


@dataclass(frozen=True)
class Setting:
    """What a field means. ``unit`` names its unit (ms, tokens, MiB...); ``low``/``high`` bound a
    number (outside units, inclusive); ``choices`` lists the allowed strings (or a function
    giving them), ``what`` naming them in the refusal ``unknown WHAT 'x'; known: ...``. ``live``:
    a running node applies a change at once (the others are fixed at start). ``name``: the name
    outside the code (default: the field's); the outside value times ``scale`` is the field's.
    ``flags``: more command-line spellings; ``metavar``: the value's name in ``--help``.
    ``example``: the YAML value of a setting that is unset (None) by default (None: the key is
    left out, as a comment)."""

    description: str
    unit: str = ""
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] | Callable[[], Sequence[str]] | None = None
    what: str = ""
    live: bool = False
    name: str = ""
    scale: float = 1
    flags: tuple[str, ...] = ()
    metavar: str | None = None
    example: Any = None

    def allowed(self) -> tuple[str, ...] | None:
        if self.choices is None:
            return None
        return tuple(self.choices() if callable(self.choices) else self.choices)


_SETTING = "mosaic_setting"
_NESTED = "mosaic_nested"
_OPTIONS = "mosaic_options"
_INTERNAL = "mosaic_internal"


def setting(default: Any, description: str, **kwargs: Any) -> Any:
    """A documented field (``kwargs``: the other ``Setting`` fields); a list default is copied
    per instance."""
    meta = {_SETTING: Setting(description, **kwargs)}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def nested(cls: type, *, exclude: tuple[str, ...] = (), **defaults: Any) -> Any:
    """A config inside a config: its fields are the parent's (outside names unchanged), built from
    ``cls(**defaults)``; fields in ``exclude`` are not exposed here (their owner sets them)."""
    return field(default_factory=lambda: cls(**defaults), metadata={_NESTED: tuple(exclude)})


def options(description: str) -> Any:
    """The selected policy's options (key -> value), checked against the policy's own keys."""
    return field(default_factory=dict, metadata={_OPTIONS: Setting(description, name="policy_options")})


def internal(default: Any = None, *, factory: Callable[[], Any] | None = None) -> Any:
    """A field only code sets (not a parameter, flag or YAML key), e.g. a torch dtype; ``factory``
    makes a mutable default per instance."""
    if factory is not None:
        return field(default_factory=factory, metadata={_INTERNAL: True})
    return field(default=default, metadata={_INTERNAL: True})


def strict(cls: type) -> type:
    """Class decorator for a config dataclass: unknown keyword arguments raise ``ConfigError``
    listing the known ones (instead of Python's bare ``TypeError``)."""
    init = cls.__init__
    known = [f.name for f in dataclasses.fields(cls) if f.init]

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - set(known))
        if unknown:
            raise ConfigError(
                f"{cls.__name__}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(known)}"
            )
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


# ---------------------------------------------------------------------------------- the tree


@dataclass(frozen=True)
class Entry:
    """One setting as the world outside the code sees it.

    ``path``: attribute names from the root config to the field; ``name``: its outside name;
    ``kind``: its outside type (bool, int, float, str, list of str, or dict for a policy's
    options); ``optional``: None (unset) is allowed; ``default``: the outside default (None: unset).
    """

    path: tuple[str, ...]
    name: str
    kind: type
    optional: bool
    default: Any
    setting: Setting

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def constraints(self) -> str:
        """'1 .. 4096', 'one of: a, b' or ''."""
        s = self.setting
        if s.low is not None:
            return f"{self._number(s.low)} .. {self._number(s.high)}"
        allowed = s.allowed()
        return f"one of: {', '.join(allowed)}" if allowed else ""

    def _number(self, x: float) -> str:
        return str(int(x)) if self.kind is int else f"{x:g}"

    def help(self) -> str:
        """Description with unit and bounds, for ``--help`` and YAML comments."""
        extra = "; ".join(x for x in (self.setting.unit, self.constraints) if x)
        text = self.setting.description
        return f"{text.removesuffix('.')} ({extra})." if extra else text

    def outside(self, value: Any) -> Any:
        if value is None or self.setting.scale == 1:
            return value
        return value / self.setting.scale

    def check(self, value: Any) -> None:
        """``ConfigError`` when an outside value is out of range or not one of the choices."""
        s = self.setting
        if value is None:
            if not self.optional:
                raise ConfigError(f"{self.name} must be set")
            return
        if s.low is not None and value < s.low:
            raise ConfigError(f"{self.name} must be >= {self._number(s.low)}, got {value}")
        if s.high is not None and value > s.high:
            raise ConfigError(f"{self.name} must be <= {self._number(s.high)}, got {value}")
        allowed = s.allowed()
        if allowed is not None and value not in allowed:
            raise ConfigError(f"unknown {s.what or self.name} {value!r}; known: {', '.join(allowed)}")


_KINDS = (bool, int, float, str)


def _kind_of(hint: Any) -> tuple[type, bool]:
    """(outside kind, optional) of a field's type hint; ``TypeError`` for a type no interface takes."""
    optional = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        if len(args) != 1:
            raise TypeError(f"a setting cannot be of type {hint}")
        hint = args[0]
    if hint in _KINDS:
        return hint, optional
    if typing.get_origin(hint) is list and typing.get_args(hint) == (str,):
        return list, optional
    if typing.get_origin(hint) is dict or hint is dict:
        return dict, optional
    raise TypeError(f"a setting cannot be of type {hint}: mark the field internal()")


def _hint(cls: type, f: dataclasses.Field) -> Any:
    """The type of a setting field, its annotation evaluated in the module of the class that
    declares it (only settings' annotations are evaluated: a nested config's may name a class
    local to a function)."""
    if not isinstance(f.type, str):
        return f.type
    owner = next(c for c in cls.__mro__ if f.name in vars(c).get("__annotations__", {}))
    return eval(f.type, vars(sys.modules[owner.__module__]))


def _entry(cls: type, f: dataclasses.Field, s: Setting, path: tuple[str, ...]) -> Entry:
    """The entry of field ``f`` of ``cls`` without its default; a rescaled number is a float outside."""
    kind, optional = _kind_of(_hint(cls, f))
    return Entry(path, s.name or f.name, float if s.scale != 1 else kind, optional, None, s)


def _default_setting(f: dataclasses.Field) -> Setting:
    return Setting(f"{f.name} (not documented yet)")


def entries(config: Any, _path: tuple[str, ...] = (), _exclude: tuple[str, ...] = ()) -> list[Entry]:
    """Every setting of ``config`` (a config dataclass or an instance, whose values are then the
    defaults), nested configs flattened, in field order. ``TypeError`` when two share a name."""
    instance = config() if isinstance(config, type) else config
    out: list[Entry] = []
    for f in dataclasses.fields(instance):
        if f.name in _exclude or f.metadata.get(_INTERNAL):
            continue
        value = getattr(instance, f.name)
        if _NESTED in f.metadata:
            out += entries(value, (*_path, f.name), f.metadata[_NESTED])
            continue
        s = f.metadata.get(_SETTING) or f.metadata.get(_OPTIONS) or _default_setting(f)
        entry = _entry(type(instance), f, s, (*_path, f.name))
        out.append(dataclasses.replace(entry, default=entry.outside(value)))
    names = [e.name for e in out]
    doubled = sorted({n for n in names if names.count(n) > 1})
    if doubled:
        raise TypeError(f"{type(instance).__name__}: settings {doubled} appear twice in the tree")
    return out


def check(config: Any) -> None:
    """``ConfigError`` unless every documented field of ``config`` (this level only: nested
    configs check themselves) is within its setting. Call it from ``__post_init__``."""
    for f in dataclasses.fields(config):
        s = f.metadata.get(_SETTING)
        if s is None:
            continue
        entry = _entry(type(config), f, s, (f.name,))
        entry.check(entry.outside(getattr(config, f.name)))


def build(cls: type, values: Mapping[str, Any], base: Any = None, what: str = "setting") -> Any:
    """A ``cls`` from outside values by outside name (missing ones from ``base``, default
    ``cls()``). Unknown names raise ``ConfigError``: ``unknown WHAT(s) a, b; known: ...``."""
    base = cls() if base is None else base
    known = {e.name for e in entries(base)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown {what}(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return _build(base, values, ())


def _build(base: Any, values: Mapping[str, Any], exclude: tuple[str, ...]) -> Any:
    changes = {}
    for f in dataclasses.fields(base):
        if f.name in exclude or f.metadata.get(_INTERNAL) or not f.init:
            continue
        if _NESTED in f.metadata:
            changes[f.name] = _build(getattr(base, f.name), values, f.metadata[_NESTED])
            continue
        s = f.metadata.get(_SETTING) or f.metadata.get(_OPTIONS) or _default_setting(f)
        name = s.name or f.name
        if name in values:
            value = values[name]
            changes[f.name] = dict(value) if f.metadata.get(_OPTIONS) else _scaled(s, value)
    return dataclasses.replace(base, **changes)


def _scaled(s: Setting, value: Any) -> Any:
    return value if value is None or s.scale == 1 else int(value * s.scale)


# ---------------------------------------------------------------------------------- the model


@strict
@dataclass
class ModelConfig:
    """Which model a stream runs on (``runtime.models.load_model``'s arguments)."""

    model: str = setting(
        "tiny-random:qwen2.5-vl",
        "Vision-language model: a Hugging Face id, a local folder, tiny-random:<family> "
        "(qwen2.5-vl, qwen3-vl, llava-ov; random weights, for trying the pipeline) or "
        "smollm2-llava:135m-instruct (a real language model with a random vision tower).",
    )
    device: str = setting("auto", "Torch device: auto, cpu, cuda or cuda:N.")
    dtype: str = setting(
        "auto",
        "Model dtype (auto: the model's own).",
        choices=("auto", "float32", "float16", "bfloat16"),
    )
    seed: int = setting(0, "Seed of tiny-random model weights.", low=0, high=2**31 - 1)
    pair_frames: bool = setting(
        False,
        "Qwen-VL models: two consecutive frames per temporal patch, as the models' video path "
        "does (half the tokens and KV per second of video; a pair's first frame waits for its second).",
    )

    def __post_init__(self) -> None:
        check(self)


# ---------------------------------------------------------------------------------- policy options

OPTION_HELP: dict[str, Setting] = {
    "page_rows": Setting("Store rows per host page.", "rows", 1, 1 << 24),
    "spare_pages": Setting(
        "Host pages faulted in ahead of need by a worker thread (0: none).", "pages", 0, 1 << 16
    ),
    "run_min_rows": Setting(
        "To another device: runs of at least this many rows are copied one by one, shorter ones gathered.",
        "rows",
        1,
        1 << 24,
    ),
    "compress_to": Setting(
        "At the host cap, live tokens are compressed to this share of the cap.", "", 1e-6, 1.0
    ),
    "vsb_buckets": Setting("VSB timeline buckets (each keeps its own top tokens).", "buckets", 1, 1 << 16),
    "vsb_probe": Setting("VSB probe tokens, taken from the most recent vision tokens.", "tokens", 1, 1 << 16),
    "reserve_tokens": Setting(
        "Initial device arena per layer (it doubles when full); 0: grow from empty.", "tokens", 0, 1 << 30
    ),
    "page_tokens": Setting("Tokens per retrieval page.", "tokens", 1, 1 << 20),
    "vsb_ratio": Setting(
        "Continuous VSB: each token block leaving the local window keeps this share of itself "
        "(0: compress only at the host cap).",
        "",
        0.0,
        0.999999,
    ),
    "aggregate": Setting("How a token's score combines its query heads' attention.", choices=("sum", "max")),
    "blocks_below": Setting(
        "A layer whose clusters average fewer tokens than this many mean frame blocks retrieves "
        "whole frame blocks, chosen per KV head from its clusters' estimates (0: never).",
        "blocks",
        0.0,
        1e6,
    ),
    "block_parts": Setting(
        "In a block layer, a frame block longer than a KV head's free budget divided by this is "
        "cut into equal consecutive parts no longer than that (0: blocks stay whole).",
        "",
        0,
        1 << 20,
    ),
    "cpu_prefetch": Setting("Cross-layer prefetch on a CPU device too (a worker thread)."),
    "hold_windows": Setting(
        "A cluster idle this many local windows beyond the local window is sealed.", "windows", 0.0, 1e6
    ),
    "layer_carry": Setting(
        "In a block layer, each frame block's score gains this times the block scores the earlier "
        "block layers of the question carried (each layer's own, plus this times what it was given; "
        "0: every layer chooses alone).",
        "",
        0.0,
        1e6,
    ),
    "maintain_clock": Setting(
        "What the maintenance budget is measured in: wall time, or fixed costs per unit of work "
        "(reproducible runs).",
        choices=("wall", "work"),
    ),
    "max_cluster_tokens": Setting("Clusters above this size are split.", "tokens", 1, 1 << 20),
    "sketch_dims": Setting(
        "Cluster a count sketch of each KV head's key in this many dimensions: cheaper assignment "
        "(0, or a head dim at or below it: every dimension).",
        "dims",
        0,
        1 << 16,
    ),
    "prefetch_predictor": Setting(
        "What predicts the next layer's clusters: the tokens this layer retrieved, or its query.",
        choices=("tokens", "query"),
    ),
    "prefetch_share": Setting("Share of the retrievable budget a prefetch prediction fills.", "", 1e-6, 1.0),
    "ring_windows": Setting(
        "Nursery ring size, in local windows (at least the window + 4 chunks).", "windows", 1.000001, 1e6
    ),
    "run_penalty": Setting(
        "Copy penalty, in shares of the marginal cluster (0: plain greedy).", "", 0.0, 1e6
    ),
}


def policy_option_entries(policy: str) -> list[Entry]:
    """One entry per option of ``policy`` (name: the key; kind and default: the policy's default;
    setting: ``OPTION_HELP``, or a generic one for an option not described there).
    ``ValueError`` listing the known policies for an unknown name."""
    from mosaic_ros.runtime.kv.policy import policy_options

    out = []
    for key, default in sorted(policy_options(policy).items()):
        kind = type(default)
        if kind not in _KINDS:
            raise TypeError(f"option {key!r} of policy {policy!r} has a default of type {kind.__name__}")
        s = OPTION_HELP.get(key) or Setting(f"Option {key!r} of the {policy} KV policy (see its docs).")
        out.append(Entry(("kv", "options", key), key, kind, False, default, s))
    return out


def parse_option(entry: Entry, raw: str) -> Any:
    """A command-line option value in its option's type (``ConfigError`` when it is not one)."""
    if entry.kind is bool:
        lowered = raw.lower()
        if lowered not in ("true", "false", "1", "0"):
            raise ConfigError(f"option {entry.name} takes true or false, got {raw!r}")
        value: Any = lowered in ("true", "1")
    else:
        try:
            value = entry.kind(raw)
        except ValueError:
            raise ConfigError(f"option {entry.name} takes a {entry.kind.__name__}, got {raw!r}") from None
    entry.check(value)
    return value


def parse_options(policy: str, items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` items as ``policy``'s options, typed by their defaults; an unknown key raises
    ``ConfigError`` listing the policy's keys."""
    known = {e.name: e for e in policy_option_entries(policy)}
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"an option must look like KEY=VALUE, got {item!r}")
        if key not in known:
            raise ConfigError(f"policy {policy!r}: unknown option {key}; known: {', '.join(sorted(known))}")
        out[key] = parse_option(known[key], raw)
    return out


def check_options(policy: str, given: Mapping[str, Any]) -> None:
    """``ConfigError`` for an option ``policy`` does not take (listing those it takes) or out of range."""
    known = {e.name: e for e in policy_option_entries(policy)}
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ConfigError(
            f"policy {policy!r}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    for key, value in given.items():
        known[key].check(value)


# ---------------------------------------------------------------------------------- command lines


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, config: Any) -> None:
    """One flag per setting of ``config`` (an instance: its values are the defaults): ``--name``
    (underscores as dashes) and its ``Setting.flags``; booleans as ``--x/--no-x``. A policy's
    options are not flags here (the command line takes them as ``--option``)."""
    for e in entries(config):
        if e.kind is dict:
            continue
        flags = [e.flag, *e.setting.flags]
        if e.kind is bool:  # argparse adds the default to the help
            action = argparse.BooleanOptionalAction
            parser.add_argument(*flags, dest=e.name, action=action, default=e.default, help=e.help())
            continue
        kind = {"nargs": "*"} if e.kind is list else {"type": e.kind}
        parser.add_argument(
            *flags,
            dest=e.name,
            default=e.default,
            metavar=e.setting.metavar,
            help=e.help() if e.default in ("", None, []) else f"{e.help()} Default: %(default)s.",
            **kind,
        )


def from_arguments(config: Any, args: argparse.Namespace, **values: Any) -> Any:
    """The config ``add_arguments(parser, config)`` described, with the parsed ``args`` (and
    ``values`` by outside name, e.g. ``policy_options``); ``ConfigError`` for a value out of range."""
    given = {e.name: getattr(args, e.name) for e in entries(config) if e.kind is not dict}
    return build(type(config), {**given, **values}, base=config)
