"""Strict configuration files: the one YAML loader every config file of kmd goes through.

A config file (a policy, the daemon settings) is YAML validated against frozen pydantic
models derived from `StrictModel`: unknown keys, bad values and duplicate keys are errors,
YAML aliases and deep nesting are refused before anything is built, and every error names
the file, the line and the key (pydantic error locations are mapped back onto the YAML
node marks). `load_yaml_model(path, Model)` / `parse_yaml_model(text, Model)` are the entry
points; `ConfigError.problems` lists every error found.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError
from pydantic_core import PydanticCustomError

__all__ = [
    "ConfigError",
    "ConfigProblem",
    "Duration",
    "MAX_CONFIG_BYTES",
    "StrictModel",
    "load_yaml_model",
    "located",
    "parse_yaml_model",
    "read_config_bytes",
]

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def _parse_duration(value: Any) -> float:
    """Seconds from a number or a string such as "30s", "15m", "1h", "1d"."""
    if isinstance(value, bool):  # bool is an int subclass; "true" is never a duration
        raise PydanticCustomError("duration", "expected a duration such as 30s, 15m or 1h")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION_RE.match(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise PydanticCustomError("duration", "expected a duration such as 30s, 15m or 1h")
    if seconds <= 0:
        raise PydanticCustomError("duration", "a duration must be positive")
    return seconds


Duration = Annotated[float, BeforeValidator(_parse_duration)]


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)





def located(loc: str | tuple[str | int, ...], message: str) -> PydanticCustomError:
    """An error raised from a model validator that still knows which key it is about."""
    loc = (loc,) if isinstance(loc, str) else loc
    return PydanticCustomError("policy_rule", "{message}", {"message": message, "at": loc})



@dataclass(frozen=True)
class ConfigProblem:
    file: str
    line: int | None  # 1-based
    key: str  # dotted path, e.g. sources[0].trust
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.key or '<top level>'}: {self.message}"


class ConfigError(ValueError):
    """A strict YAML config file (a policy, the settings) that cannot be used; `problems`
    lists every error found."""

    def __init__(self, problems: list[ConfigProblem], what: str = "policy"):
        self.problems = problems
        super().__init__(f"invalid {what}:\n  " + "\n  ".join(str(p) for p in problems))




M = TypeVar("M", bound=BaseModel)


def load_yaml_model(path: str | Path, model: type[M]) -> M:
    """Any strict YAML config file (policy, daemon settings) validated against `model`,
    with errors naming file, line and key (raises ConfigError)."""
    path = Path(path)
    return parse_yaml_model(read_config_bytes(path, "configuration"), model, name=str(path))


# A policy or settings file is a few kilobytes; these caps stop a hostile file from
# costing minutes of CPU or gigabytes of memory before it is even validated.
MAX_CONFIG_BYTES = 1_000_000
MAX_CONFIG_DEPTH = 64  # nested mappings and lists


def read_config_bytes(path: Path, what: str = "configuration") -> bytes:
    """A config file's bytes, refused (ConfigError) when unreadable or over the size cap."""
    try:
        with path.open("rb") as fh:  # read one byte past the cap to know it was exceeded
            data = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError([ConfigProblem(str(path), None, "", f"cannot read: {exc.strerror}")], what) from None
    _check_size(data, str(path), what)
    return data


def _check_size(raw: bytes, name: str, what: str) -> None:
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError([ConfigProblem(name, None, "", f"larger than the {MAX_CONFIG_BYTES}-byte cap for a {what} file")],
                          what)  # fmt: skip


def _check_events(source: str, name: str, what: str) -> None:
    """Refuse YAML aliases and deep nesting before anything is built from the text.

    An alias (`*name`) lets a few hundred bytes expand to billions of nodes (the "billion
    laughs"); a policy never needs one, so it is refused outright rather than capped.
    """
    depth = 0
    for event in yaml.parse(source, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent):
            line = event.start_mark.line + 1 if event.start_mark else None
            raise ConfigError([ConfigProblem(name, line, "", f"YAML aliases are not allowed (*{event.anchor}); "
                                             "write the value out in full")], what)  # fmt: skip
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_CONFIG_DEPTH:
                line = event.start_mark.line + 1 if event.start_mark else None
                raise ConfigError([ConfigProblem(name, line, "", f"nested deeper than {MAX_CONFIG_DEPTH} levels")], what)
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def parse_yaml_model(text: str | bytes, model: type[M], name: str = "<yaml>", what: str = "configuration") -> M:
    """Validate YAML text against a pydantic model; every problem is reported with its line."""
    raw = text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")
    _check_size(raw, name, what)
    try:
        source = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([ConfigProblem(name, None, "", f"not UTF-8: {exc}")], what) from None
    try:
        _check_events(source, name, what)
        root = yaml.compose(source, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([ConfigProblem(name, line, "", f"YAML syntax: {problem}")], what) from None
    if root is None:
        raise ConfigError([ConfigProblem(name, 1, "", "the file is empty")], what)
    duplicates = list(_duplicate_keys(root, ()))
    if duplicates:
        raise ConfigError([ConfigProblem(name, ln, _dotted(loc), "duplicate key") for loc, ln in duplicates], what)
    try:
        data = yaml.SafeLoader(source).get_single_data()
    except (yaml.YAMLError, ValueError, TypeError, OverflowError) as exc:  # e.g. a bad !!timestamp or an unhashable key
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([ConfigProblem(name, mark.line + 1 if mark else None, "", f"YAML value: {problem}")], what) from None
    if not isinstance(data, Mapping):
        raise ConfigError([ConfigProblem(name, 1, "", "the top level must be a mapping")], what)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = []
        errors = exc.errors(include_url=False)
        # A list whose only items failed also reports "too short": noise, the item errors say it.
        failing = [tuple(e["loc"]) for e in errors]
        errors = [
            e for e in errors
            if not (e["type"] == "too_short" and any(len(f) > len(e["loc"]) and f[: len(e["loc"])] == tuple(e["loc"]) for f in failing))
        ]  # fmt: skip
        for err in errors:
            loc = tuple(err["loc"]) + tuple((err.get("ctx") or {}).get("at", ()))
            line, known = _line_for(root, loc)
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                message = "unknown key"
            elif "input" in err and not isinstance(err["input"], dict | list) and err["type"] != "missing":
                message += f" (got {err['input']!r})"
            problems.append(ConfigProblem(name, line, _dotted(known), message))
        raise ConfigError(problems, what) from None


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _line_for(root: yaml.Node, loc: tuple[Any, ...]) -> tuple[int, tuple[Any, ...]]:
    """Walk the YAML node tree along a pydantic error location.

    Returns the line of the deepest node reached and the part of `loc` that was reached,
    after dropping pydantic's type tags (e.g. 'function-after[...]') that are not keys.
    """
    node, line, known = root, root.start_mark.line + 1, []
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if key_node.value == str(part):
                    node, line = value_node, key_node.start_mark.line + 1
                    known.append(part)
                    break
            else:
                if isinstance(part, str) and not _is_type_tag(part):
                    known.append(part)  # a missing or unknown key: name it, point at its parent
                    for key_node, _ in node.value:  # an unknown key: point at the key itself
                        if key_node.value == part:
                            line = key_node.start_mark.line + 1
                    break
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
            known.append(part)
        elif isinstance(part, str) and _is_type_tag(part):
            continue
        else:
            break
    return line, tuple(known)


def _is_type_tag(part: str) -> bool:
    return "[" in part or part in {"str", "int", "float", "bool", "list", "dict", "tuple"}


def _duplicate_keys(node: yaml.Node, loc: tuple[Any, ...]):
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue  # a list or mapping as a key: refused when the values are built
            key = key_node.value
            if key in seen:
                yield loc + (key,), key_node.start_mark.line + 1
            seen.add(key)
            yield from _duplicate_keys(value_node, loc + (key,))
    elif isinstance(node, yaml.SequenceNode):
        for i, child in enumerate(node.value):
            yield from _duplicate_keys(child, loc + (i,))
