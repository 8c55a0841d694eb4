"""Per-model profiles: where things are in the network and per-backend hyperparameters.

A profile is a YAML file (see `editors/profiles/*.yaml`) matched against the model's
config values (model_type, depth, width), never against its name. Models without a
profile of their own get a generic one for their architecture family, and every backend
then derives its layer choices from depth fractions.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml

PROFILE_DIR = resources.files("kmd.editors") / "profiles"

T = TypeVar("T")


class ProfileError(ValueError):
    """A profile or layout file is malformed, or no layout fits the model."""


@dataclass(frozen=True)
class Layout:
    """Module-path templates; `{}` is replaced by a layer index."""

    layers: str
    layer: str
    mlp: str
    mlp_down: str
    embed: str
    final_norm: str
    lm_head: str
    # The attention block and its projections (names inside it), for the prefix injection
    # (editors/prefix.py): Llama-style q/k/v/o.
    attention: str = "model.layers.{}.self_attn"
    q_proj: str = "q_proj"
    k_proj: str = "k_proj"
    v_proj: str = "v_proj"
    o_proj: str = "o_proj"

    def path(self, part: str, layer: int | None = None) -> str:
        template = getattr(self, part)
        return template.format(layer) if "{}" in template else template


@dataclass(frozen=True)
class Profile:
    name: str
    layout: Layout
    backends: dict[str, dict[str, Any]] = field(default_factory=dict)

    def backend_options(self, backend: str) -> dict[str, Any]:
        return dict(self.backends.get(backend, {}))


def _read_yaml(source: Any) -> dict[str, Any]:
    text = source.read_text() if hasattr(source, "read_text") else Path(source).read_text()
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ProfileError(f"{source}: expected a mapping at the top level")
    return data


def _layouts() -> dict[str, tuple[list[str], Layout]]:
    out = {}
    for name, entry in _read_yaml(PROFILE_DIR / "layouts.yaml").items():
        entry = dict(entry)
        types = entry.pop("model_types", [])
        try:
            out[name] = (types, Layout(**entry))
        except TypeError as exc:
            raise ProfileError(f"layouts.yaml: layout {name!r}: {exc}") from exc
    return out


def _profile_from(data: dict[str, Any], origin: str) -> tuple[Profile, dict[str, Any]]:
    unknown = set(data) - {"name", "match", "layout", "backends"}
    if unknown:
        raise ProfileError(f"{origin}: unknown keys {sorted(unknown)}")
    layouts = _layouts()
    layout_name = data.get("layout", "decoder")
    if layout_name not in layouts:
        raise ProfileError(f"{origin}: unknown layout {layout_name!r} (known: {sorted(layouts)})")
    profile = Profile(
        name=data.get("name", Path(origin).stem),
        layout=layouts[layout_name][1],
        backends={k: dict(v or {}) for k, v in (data.get("backends") or {}).items()},
    )
    return profile, dict(data.get("match") or {})


def resolve_profile(config: Any, override: str | None = None) -> Profile:
    """The profile for a model config: an explicit name/path, else the first match, else generic."""
    if override:
        path = Path(override)
        source = path if path.suffix in (".yaml", ".yml") else PROFILE_DIR / f"{override}.yaml"
        if not source.is_file():
            raise ProfileError(f"profile {override!r} not found (looked for {source})")
        return _profile_from(_read_yaml(source), str(source))[0]
    for source in sorted(PROFILE_DIR.iterdir(), key=lambda p: p.name):
        if not source.name.endswith(".yaml") or source.name == "layouts.yaml":
            continue
        profile, match = _profile_from(_read_yaml(source), source.name)
        if all(getattr(config, key, None) == value for key, value in match.items()):
            if getattr(config, "model_type", None) in _layout_types(profile.layout):
                return profile
    for name, (types, layout) in _layouts().items():
        if config.model_type in types:
            return Profile(name=f"generic-{name}", layout=layout)
    raise ProfileError(
        f"no layout for model_type {config.model_type!r}; add it to editors/profiles/layouts.yaml "
        "or pass a profile file"
    )


def _layout_types(layout: Layout) -> list[str]:
    return next(types for types, candidate in _layouts().values() if candidate == layout)


def coerce_options(cls: type, options: dict[str, Any], origin: str, base: Any = None) -> dict[str, Any]:
    """Check option names against a hyperparameter dataclass and convert values to its field
    types (YAML reads `1.0e9` as a string; CLI values arrive as text).

    A field that is itself a frozen dataclass (a backend's `answer` policy) takes a mapping
    of its own options, or its options' flat names (the class's FLAT_KEYS, e.g. `answer_boost`);
    either changes only the options named, of `base`'s value (else the field's default)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    flat = {key: (name, sub) for name, f in fields.items() for key, sub in _flat_keys(f).items()}
    unknown = sorted(set(options) - set(fields) - set(flat))
    if unknown:
        raise ProfileError(f"{origin}: unknown option(s) {unknown} for {cls.__name__} (known: {sorted([*fields, *flat])})")
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for name, value in options.items():
        if name in flat:
            field_name, sub = flat[name]
            kind = hints[field_name]
            nested.setdefault(field_name, {})[sub] = _convert(value, typing.get_type_hints(kind)[sub], f"{origin}: {name}")
        elif dataclasses.is_dataclass(hints[name]):
            if not isinstance(value, dict):
                raise ProfileError(f"{origin}: {name}: expected a mapping of {sorted(f.name for f in dataclasses.fields(hints[name]))}")
            nested.setdefault(name, {}).update(coerce_options(hints[name], value, f"{origin}: {name}"))
        else:
            out[name] = _convert(value, hints[name], f"{origin}: {name}")
    for name, changes in nested.items():
        current = getattr(base, name) if base is not None else fields[name].default
        try:
            out[name] = dataclasses.replace(current, **changes)
        except ValueError as exc:  # the policy's own checks (__post_init__)
            raise ProfileError(f"{origin}: {exc}") from exc
    return out


def _flat_keys(f: dataclasses.Field) -> dict[str, str]:
    """A nested options field's flat option names -> its own (none for other fields)."""
    return dict(getattr(type(f.default), "FLAT_KEYS", {})) if dataclasses.is_dataclass(f.default) else {}


def _convert(value: Any, hint: Any, where: str) -> Any:
    if typing.get_origin(hint) is typing.Literal:
        if value in typing.get_args(hint):
            return value
        raise ProfileError(f"{where}: {value!r} is not one of {', '.join(map(repr, typing.get_args(hint)))}")
    kinds = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    if value is None and type(None) in typing.get_args(hint):
        return None
    for kind in kinds:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
        elif kind in (int, float) and not isinstance(value, bool):
            try:
                converted = kind(value)
            except (TypeError, ValueError):
                continue
            if kind is int and isinstance(value, float) and not value.is_integer():
                continue
            return converted
        elif isinstance(kind, type) and isinstance(value, kind):
            return value
    raise ProfileError(f"{where}: {value!r} is not a valid {hint}")


def build_config(cls: type[T], options: dict[str, Any], origin: str) -> T:
    """Instantiate a frozen hyperparameter dataclass, rejecting unknown keys by name."""
    return cls(**coerce_options(cls, options, origin))
