"""Typed configuration from YAML and KEY=VALUE overrides, independent of pretune's own fields.

`from_dict` builds a dataclass from nested data and collects every problem at once: unknown keys
(with a "did you mean" hint or the known keys), wrong types, each naming its dotted key.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import types
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from pretune.errors import ConfigError

NULL_TEXT = ("null", "Null", "NULL", "~", "None")
"""Override text meaning None: YAML's null words, and Python's None as a synonym."""


def parse_overrides(items: list[str], cls: type | None = None) -> dict:
    """Turn ["a.b=1", "c=x"] into a nested dict.

    With `cls` (the config class the overrides are for) a value is read by the type of the field it
    sets: a str field keeps the text as written (prompt=no stays 'no', 12:30 stays '12:30'), list
    items stay text ([no,yes] -> ['no', 'yes']), bool/int/float text is parsed strictly by from_dict,
    null or None is None (an error for a field that cannot be None), and a mapping field (or a key of
    no known type) takes a YAML value. Without `cls`, values are parsed as YAML scalars/lists."""
    out: dict = {}
    for item in items:
        key, eq, raw = item.partition("=")
        key = key.strip()
        if key.startswith("-"):  # --temperature or --temperature=0: a flag where a key is meant
            name = key.lstrip("-").replace("-", "_")
            raise ConfigError(f"{item}: options are KEY=VALUE, without dashes: write {name}={raw if eq else 'VALUE'}")
        if not eq:
            raise ConfigError(f"argument {item!r} is not KEY=VALUE (for example {example_override(cls)})")
        parts = key.split(".")
        tp = _field_type(cls, parts) if cls is not None else None
        value = _yaml_value(raw) if tp is None else _from_text(raw, tp, key)
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {part} is given both as a value and as a section")
        node[parts[-1]] = value
    return out


def example_override(cls: type | None) -> str:
    """A KEY=VALUE that `cls` takes, for messages: train.max_steps=200, else its first numeric key."""
    if cls is None or "train.max_steps" in dotted_keys(cls):
        return "train.max_steps=200"
    for f in fields(cls):
        if isinstance(f.default, (int, float)) and not isinstance(f.default, bool):
            return f"{f.name}={f.default}"
    return f"{dotted_keys(cls)[0]}=VALUE"


def _yaml_value(raw: str) -> Any:
    """An override's text as a YAML scalar or list (a mapping-looking text such as "a: b" stays text)."""
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return raw if isinstance(value, dict) else value


def _field_type(cls: type, parts: list[str]) -> Any:
    """The annotated type of the field `parts` names in dataclass `cls` (model.rope_scaling ->
    dict | None); None for an unknown key, a section, or an entry inside a mapping field."""
    tp: Any = cls
    for part in parts:
        if not is_dataclass(tp):
            return None
        hints = typing.get_type_hints(tp)
        if part not in {f.name for f in fields(tp)}:
            return None
        tp = hints[part]
    return None if is_dataclass(tp) else tp


def _from_text(raw: str, tp: Any, key: str) -> Any:
    """An override's text as a value for a field of type `tp`; from_dict then checks it (so a
    malformed number is reported with the other problems)."""
    text = raw.strip()
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if text in NULL_TEXT or not text:
            return None
        return _from_text(raw, args[0], key) if len(args) == 1 else _yaml_value(raw)
    if text in NULL_TEXT and (origin is list or tp is list):
        raise ConfigError(f"{key}={raw}: null is not allowed: this key is a list; give {key}=[] for an empty one")
    if text in NULL_TEXT:
        return None  # from_dict: this key cannot be null
    if origin is list or tp is list:
        item_tp = (typing.get_args(tp) or (Any,))[0]
        if not text:
            return []
        if not text.startswith("["):
            return [raw if item_tp is str else _from_text(raw, item_tp, key)]
        try:  # BaseLoader: flow syntax and quotes, every item kept as the text written
            items = yaml.load(text, Loader=yaml.BaseLoader)
        except yaml.YAMLError:
            items = None
        if not isinstance(items, list):
            raise ConfigError(f"{key}={raw} is not a list; write {key}=[a,b] (items separated by commas) "
                              f"or {key}=a for one item")
        return [v if item_tp is str or not isinstance(v, str) else _from_text(v, item_tp, key) for v in items]
    if tp is str:
        return raw
    if tp in (bool, int, float):
        return text
    if tp is dict or origin is dict:
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            return raw
        return value
    return _yaml_value(raw)


def deep_merge(base: dict, extra: dict) -> dict:
    """Merge `extra` into a copy of `base`, recursing into dicts."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def flat_keys(d: dict, prefix: str = "") -> dict:
    """A nested mapping as {dotted.key: value}, as overrides name keys; a value that is itself a
    mapping of the model (rope_scaling) stays whole."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and k not in ("rope_scaling",):
            out.update(flat_keys(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, with errors that name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a mapping of keys, not {type(data).__name__}")
    return data


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """Check/convert `value` to the annotated type `tp`; append a problem on failure."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own message, and how to unset it
            trial: list[str] = []
            out = _coerce(value, options[0], key, trial)
            problems += [f"{t} (or null to leave it unset)" for t in trial]
            return out
        for arg in options:
            trial = []
            out = _coerce(value, arg, key, trial)
            if not trial:
                return out
        problems.append(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return value
    if value is None and tp in (bool, int, float, str, dict):
        problems.append(f"{key}: null is not allowed: this key has no unset value; give one, or leave the key "
                        "out for its default")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if value is None:
            return []
        items = value if isinstance(value, (list, tuple)) else [value]
        return [_coerce(v, item_tp, f"{key}[{i}]", problems) for i, v in enumerate(items)]
    if tp is Any or tp is dict:
        if tp is dict and value is not None and not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {value!r}; give one as {key}={{name: value, ...}} "
                            f"(in a YAML file, nested keys), or set one entry with {key}.NAME=VALUE")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        problems.append(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        problems.append(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:  # Python's forms (1e-3, nan, inf), then YAML's (.inf, -.inf, .nan)
                return float(value.lower().replace(".inf", "inf").replace(".nan", "nan"))
            except ValueError:
                pass
        problems.append(f"{key}: expected a number, got {value!r}")
        return value
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (bool, int, float, datetime.date)):
            # A YAML file's unquoted no, 12:30 or 010 is already false, 750 or 8: the text written is
            # gone, so it is refused rather than kept as a text the user did not write.
            kind = "true/false" if isinstance(value, bool) else (
                "a date" if isinstance(value, datetime.date) else "a number")
            problems.append(f"{key}: expected text, but YAML read the unquoted value as {kind} ({value!r}); "
                            "quote the text in the file, for example 'no' or '12:30' (unquoted, YAML turns "
                            "no/yes into false/true, 12:30 into 750 and 010 into 8)")
            return value
        problems.append(f"{key}: expected a string, got {value!r}")
        return value
    return value


def dotted_keys(cls: type, prefix: str = "") -> list[str]:
    """Every key of dataclass `cls`, nested sections as dotted paths (train.max_steps, ...)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        tp = hints[f.name]
        out += dotted_keys(tp, f"{prefix}{f.name}.") if is_dataclass(tp) else [f"{prefix}{f.name}"]
    return out


def from_dict(cls: type, data: dict, prefix: str = "", problems: list[str] | None = None, root: type | None = None,
              what: str | None = None):
    """Build dataclass `cls` from a nested dict, collecting every unknown key and type error.

    An unknown key is answered with the closest key of its section, else a key of the same name in
    another section (dist.world_size -> world_size), else the section's known keys. A section `cls`
    does not have (train.device for `pretune generate`) is answered key by key: `what` (the verb) has
    no such key, and the key of the same last name it has (device=cpu), else its keys."""
    top = problems is None
    problems = [] if problems is None else problems
    root = root or cls
    hints = typing.get_type_hints(cls)
    allowed = {f.name for f in fields(cls)}
    kwargs = {}
    if not isinstance(data, dict):
        problems.append(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
        data = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in allowed and isinstance(value, dict) and value:
            problems += _unknown_section(full, value, cls, root, what)
            continue
        if key not in allowed:
            hint = [prefix + h for h in difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)]
            hint = hint or [k for k in dotted_keys(root) if k.rsplit(".", 1)[-1] == str(key)][:1]
            known = ", ".join(sorted(f"{prefix}{a}" for a in allowed))
            problems.append(f"unknown key {full}" + (f"; did you mean {hint[0]}?" if hint
                                                      else f"; known keys here: {known}"))
            continue
        tp = hints[key]
        if is_dataclass(tp):
            kwargs[key] = from_dict(tp, value or {}, f"{full}.", problems, root, what)
        else:
            kwargs[key] = _coerce(value, tp, full, problems)
    out = cls(**kwargs) if not (top and problems) else None
    if top and problems:
        raise ConfigError(problems)
    return out


def _unknown_section(full: str, value: dict, cls: type, root: type, what: str | None) -> list[str]:
    """One problem per key given under `full`, a section `cls` does not have: `what` has no such key;
    did you mean the key of the same last name (train.device=cpu -> device=cpu), or the section of a
    close name (dta.val -> data.val)? Else the keys `what` has."""
    keys = dotted_keys(root)
    sections = [f.name for f in fields(cls) if is_dataclass(typing.get_type_hints(cls)[f.name])]
    close = difflib.get_close_matches(full.rsplit(".", 1)[-1], sections, n=1, cutoff=0.6)
    shown = sorted({k.split(".", 1)[0] + (".*" if "." in k else "") for k in keys})
    owner = f"{what} has no key" if what else "unknown key"
    out = []
    for sub, v in flat_keys(value).items():
        name = f"{full}.{sub}"
        same = [k for k in keys if k.rsplit(".", 1)[-1] == name.rsplit(".", 1)[-1]]
        text = str(v).lower() if isinstance(v, bool) else (v if isinstance(v, (str, int, float)) else None)
        if same:
            hint = f"; did you mean {same[0]}" + (f"={text}?" if text is not None else "?")
        elif close:
            hint = f"; did you mean {close[0]}.{sub}?"
        else:
            hint = (f"; its keys: {', '.join(shown)} (`{what} --help` says what each does)" if what
                    else f"; known keys: {', '.join(shown)}")
        out.append(f"{owner} {name}" + (f" (it has no {full} section)" if what else "") + hint)
    return out


def to_dict(cfg) -> dict:
    """The config as plain data (for config.yaml and summaries)."""
    return dataclasses.asdict(cfg)


def save_config(cfg, path: str | Path) -> None:
    from pretune.files import atomic_write_bytes  # never a half-written config.yaml

    atomic_write_bytes(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False).encode("utf-8"))
