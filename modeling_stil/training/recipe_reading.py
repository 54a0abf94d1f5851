"""Reading a recipe and a command line: recipe YAML files (with ``extends``), ``--key value`` overrides,
each value converted to the annotated type of its dataclass field, and the lines ``--help`` shows for a
field. What the arguments are (the dataclasses, their validation, the help text) lives in arguments.py."""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml


class ArgumentError(ValueError):
    """A recipe or command-line problem; the message says which key and what is accepted."""


class HelpRequested(Exception):
    """``--help`` / ``-h``: ``text`` is the help (train.py prints it to stdout and exits 0)."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text


def unwrap_optional(tp) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        if len(args) == 1:
            return args[0], optional
        return typing.Union[tuple(args)], optional
    return tp, False


def convert_value(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, or raise an ArgumentError naming the key."""
    base, optional = unwrap_optional(tp)
    is_list = typing.get_origin(base) in (list, Sequence, tuple) or base in (list, tuple)
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null") and base is not str and not is_list):
        if optional:
            return None
        raise ArgumentError(f"--{key}: a value is required (type {type_name(tp)})")
    if isinstance(value, str) and optional and base is str and value.strip().lower() in ("none", "null"):
        return None
    origin = typing.get_origin(base)
    if origin is Literal:
        choices = typing.get_args(base)
        if value not in choices:
            text = str(value)
            if text not in choices:
                raise ArgumentError(f"--{key}: {value!r} is not one of {list(choices)}")
            value = text
        return value
    if base is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "yes", "1", "on"):
            return True
        if text in ("false", "no", "0", "off"):
            return False
        raise ArgumentError(f"--{key}: expected a boolean (true/false), got {value!r}")
    if base is int:
        if isinstance(value, bool):
            raise ArgumentError(f"--{key}: expected an integer, got {value!r}")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value).strip())
        except ValueError:
            raise ArgumentError(f"--{key}: expected an integer, got {value!r}") from None
    if base is float:
        if isinstance(value, bool):
            raise ArgumentError(f"--{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ArgumentError(f"--{key}: expected a number, got {value!r}") from None
    if base is str:
        if isinstance(value, (dict, list)):
            raise ArgumentError(f"--{key}: expected a string, got {value!r}")
        return str(value)
    if origin in (list, Sequence, tuple) or base in (list, tuple):
        (item_type,) = typing.get_args(base)[:1] or (str,)
        if isinstance(value, str):
            parsed = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v.strip()]
            value = parsed
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [convert_value(v.strip() if isinstance(v, str) else v, item_type, key) for v in value]
    if base is dict or origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ArgumentError(f"--{key}: expected a mapping such as '{{a: 1}}', got {value!r}")
        return value
    if typing.get_origin(base) in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(base):
            try:
                return convert_value(value, option, key)
            except ArgumentError as error:
                errors.append(str(error))
        raise ArgumentError(f"--{key}: {value!r} fits none of {type_name(tp)}")
    return value


def type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def typed_fields(cls) -> dict[str, dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        f.type = hints.get(f.name, f.type)
        out[f.name] = f
    return out


def parse_cli_overrides(argv: Sequence[str]) -> tuple[str | None, dict[str, Any]]:
    """``[RECIPE.yaml] --key value --key=value --flag`` -> (recipe, {key: raw string or True}).

    A bare ``--flag`` (followed by another ``--key`` or nothing) means True. Dashes in keys are
    accepted as underscores."""
    recipe = None
    overrides: dict[str, Any] = {}
    i = 0
    argv = list(argv)
    while i < len(argv):
        token = argv[i]
        if token.startswith("--"):
            key = token[2:]
            if "=" in key:
                key, value = key.split("=", 1)
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value = argv[i + 1]
                i += 1
            else:
                value = True
            key = key.replace("-", "_")
            if key in overrides:
                raise ArgumentError(f"--{key} is given twice on the command line")
            overrides[key] = value
        elif recipe is None and (token.endswith((".yaml", ".yml")) or Path(token).is_file()):
            recipe = token
        else:
            raise ArgumentError(f"unexpected argument {token!r}: give at most one recipe file, then --key value pairs")
        i += 1
    return recipe, overrides


def load_recipe(path: str | os.PathLike, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe as flat ``key: value`` pairs.

    ``extends: other.yaml`` (a path relative to this recipe, or a list of them, applied in order)
    starts from that recipe's values and lets this one override them, so a family of recipes
    (one method on six datasets) states each shared value once.
    """
    path = Path(path)
    if not path.is_file():
        raise ArgumentError(f"recipe {path} does not exist")
    if path.resolve() in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, path.resolve()))
        raise ArgumentError(f"recipe {path} extends itself through {cycle}: remove one of the extends keys")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ArgumentError(f"recipe {path} must be a mapping of key: value")
    flat: dict[str, Any] = {}
    parents = data.pop("extends", None) or []
    for parent in [parents] if isinstance(parents, str) else parents:
        parent_path = path.parent / parent
        if not parent_path.is_file():
            raise ArgumentError(f"recipe {path}: extends {parent!r}, but {parent_path} does not exist (paths are relative to the recipe)")
        flat.update(load_recipe(parent_path, (*_chain, path.resolve())))
    for key, value in data.items():
        # Groups are optional: `training: {learning_rate: ...}` and flat `learning_rate: ...` both work.
        if key in ("data", "model_args", "training", "method_args") and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def unknown_keys_message(valid: Sequence[str], bad: Sequence[str]) -> str:
    lines = []
    for key in bad:
        close = difflib.get_close_matches(key, valid, n=3)
        lines.append(f"  {key}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    return "unknown argument(s):\n" + "\n".join(lines) + "\nvalid keys: " + ", ".join(sorted(valid))


def field_choices(tp) -> tuple | None:
    base, _ = unwrap_optional(tp)
    if typing.get_origin(base) is Literal:
        return typing.get_args(base)
    return None


def describe_fields(cls) -> list[str]:
    lines = []
    for name, f in typed_fields(cls).items():
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "required"
        choices = field_choices(f.type)
        kind = "{" + ",".join(str(c) for c in choices) + "}" if choices else type_name(unwrap_optional(f.type)[0])
        if unwrap_optional(f.type)[1]:
            kind += " or None"
        lines.append(f"  --{name} {kind}  (default: {default!r})")
        text = f.metadata.get("help", "") if f.metadata else ""
        if text:
            lines.append(f"      {text}")
    return lines
