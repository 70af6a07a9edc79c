"""Typed settings: dataclasses built from YAML / dotted overrides with one-line errors.

The machinery every settings block uses (the core ``model``/``data``/``train`` sections in
:mod:`latentlm.config` and each method's own section in ``methods/``): build a dataclass from
a mapping, coerce values to the annotated types, parse ``--section.key VALUE`` overrides and
YAML files, and the small range checks ``validate`` methods share. It imports nothing else of
latentlm, so any module can declare settings without an import cycle.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from latentlm.errors import LatentLMError


def positive(obj: Any, section: str, *names: str) -> None:
    """Each ``obj.<name>`` is a finite number > 0, else a one-line error naming ``section.name``."""
    for n in names:
        v = getattr(obj, n)
        if not (v > 0 and math.isfinite(v)):
            raise LatentLMError(f"{section}.{n}={v} must be positive and finite")


MAX_SEED = 2**63 - 1  # torch seeds are 64-bit; the trainer adds the rank to its seed


def check_seed(value: Any, name: str) -> None:
    """``value`` is an integer seed torch and numpy accept, else a one-line error naming ``name``."""
    if not (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_SEED):
        raise LatentLMError(f"{name}={short_repr(value)} must be an integer from 0 to 2**63 - 1 ({MAX_SEED})")


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 80


def short_repr(value: Any) -> str:
    """``repr(value)`` cut to a readable length (a value in an error line may be a huge structure)."""
    return _SHORT.repr(value)


def non_negative(obj: Any, section: str, *names: str) -> None:
    """Each ``obj.<name>`` is a finite number >= 0, else a one-line error naming ``section.name``."""
    for n in names:
        v = getattr(obj, n)
        if not (v >= 0 and math.isfinite(v)):
            raise LatentLMError(f"{section}.{n}={v} must be >= 0 and finite")


def setting(default: Any, doc: str) -> Any:
    """A settings field with its default and a one-line ``doc`` (what ``--help`` and ``latentlm config
    show`` print for the key): ``n_thoughts: int = setting(1, "K: latent thoughts per token")``.
    Defaults are scalars (a settings value is a YAML scalar), so no ``default_factory`` is needed."""
    if not (isinstance(doc, str) and doc.strip()) or "\n" in doc:
        raise TypeError(f"setting(doc=...) must be one non-empty line, got {doc!r}")
    return dataclasses.field(default=default, metadata={"doc": doc})


def field_doc(f: dataclasses.Field) -> str:
    """The one-line doc of a settings field declared with :func:`setting` ('' for a plain field)."""
    return f.metadata.get("doc", "")


def type_label(tp: Any) -> str:
    """A short spelling of a settings type for help text: ``INT``, ``FLOAT|null``, ``{gpt2,llama}``."""
    origin = get_origin(tp)
    if origin is Literal:
        return "{" + ",".join(str(a) for a in get_args(tp)) + "}"
    if origin in (typing.Union, types.UnionType):
        return "|".join(type_label(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    return {bool: "BOOL", int: "INT", float: "FLOAT", str: "STR"}.get(tp, getattr(tp, "__name__", str(tp)).upper())


def yaml_scalar(value: Any) -> str:
    """``value`` as it is written in YAML and on the command line (``null``, ``true``, ``3e-4``, ``''``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else "''"
    return repr(value) if isinstance(value, float) else str(value)


def describe_fields(cls: type) -> list[tuple[str, str, Any, str]]:
    """``(name, type label, default, doc)`` of every field of the settings dataclass ``cls``, in order."""
    hints = get_type_hints(cls)
    return [(f.name, type_label(hints[f.name]), f.default, field_doc(f)) for f in dataclasses.fields(cls)
            if f.init]


class Settings:
    """Base of a settings dataclass (one config section). ``validate`` checks that the fields named in
    :attr:`positive_fields` are > 0 and those in :attr:`non_negative_fields` >= 0 (finite, both); a
    subclass adds its own checks after ``super().validate()``. :attr:`section` names it in errors.
    (Class attributes, not dataclass fields: a non-dataclass base contributes no fields.)"""

    section: str = ""
    positive_fields: tuple[str, ...] = ()
    non_negative_fields: tuple[str, ...] = ()

    def validate(self) -> None:
        positive(self, self.section, *self.positive_fields)
        non_negative(self, self.section, *self.non_negative_fields)


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Return ``value`` as type ``tp`` or raise a one-line error naming ``key``."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arm in get_args(tp):
            try:
                return coerce(key, value, arm)
            except LatentLMError:
                pass
    elif origin is Literal:
        if value in get_args(tp):
            return value
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise LatentLMError(f"config key {key}={short_repr(value)} has the wrong type: expected {_type_name(tp)}")


def build(cls: type, data: Any, prefix: str) -> Any:
    """An instance of the dataclass ``cls`` from the mapping ``data`` (missing keys keep their
    defaults); ``prefix`` (``"model."``) names keys in errors."""
    if not isinstance(data, dict):
        raise LatentLMError(f"config section {prefix.rstrip('.') or 'root'} must be a mapping, got {short_repr(data)}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        if k not in names:
            raise LatentLMError(f"unknown config key '{prefix}{k}'; allowed keys: {', '.join(names)}")
        tp = hints[k]
        kwargs[k] = build(tp, v, f"{prefix}{k}.") if dataclasses.is_dataclass(tp) else coerce(f"{prefix}{k}", v, tp)
    return cls(**kwargs)


def merge(base: dict, over: dict) -> dict:
    """``base`` updated by ``over``, recursively for nested mappings (neither is modified)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """Turn ``["--model.n_layer", "4", "--train.lr=3e-4"]`` into a nested dict.

    Values are parsed as YAML scalars, so ``4`` is an int, ``3e-4`` a float, ``true`` a bool
    and ``null`` None.
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--") or "." not in a:
            raise LatentLMError(f"unexpected argument {a!r}; config overrides look like --section.key VALUE")
        if "=" in a:
            key, raw = a[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise LatentLMError(f"override {a} has no value; write {a} VALUE")
            key, raw = a[2:], args[i + 1]
            i += 2
        value = _parse_scalar(raw)
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise LatentLMError(f"override --{key} conflicts with another override of {p}")
        node[parts[-1]] = value
    return out


def _parse_scalar(raw: str) -> Any:
    try:
        v = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    # YAML 1.1 reads "1e-4" as a string; accept the usual float spellings.
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in the YAML file ``path`` (floats like ``1e-4`` read as floats)."""
    p = Path(path)
    if not p.is_file():
        raise LatentLMError(f"config file {p} does not exist")
    data = read_yaml(p, "config file") or {}
    if not isinstance(data, dict):
        raise LatentLMError(f"config file {p} must hold a mapping of sections (model:, data:, train:)")
    return data


class _StrictLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (YAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                if key.value in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key {key.value!r} is given twice in one "
                                                            "mapping; keep one", key.start_mark)
                seen.add(key.value)
        return super().construct_mapping(node, deep)


MAX_YAML_VALUES = 100_000  # once aliases are expanded; a config holds a few hundred


def read_yaml(path: Path, what: str, floats: bool = True) -> Any:
    """The YAML document in the file ``path`` (``what`` names it in errors: "config file"), with
    float-like strings in mappings read as floats unless ``floats`` is false. One-line errors for a
    file that is unreadable, not UTF-8 or not valid YAML, a key given twice, and aliases that contain
    themselves or expand to more than MAX_YAML_VALUES values (which would hang whatever walks them)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LatentLMError(f"{what} {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise LatentLMError(f"cannot read {what} {path} ({e.strerror or e})") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as e:
        mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None) or str(e).splitlines()[0]
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise LatentLMError(f"{what} {path} is not valid YAML: {problem}{where}") from None
    except RecursionError:
        raise LatentLMError(f"{what} {path} nests too deeply to be a config; flatten it") from None
    try:
        return _expand(data, [MAX_YAML_VALUES], set(), floats)
    except (ValueError, RecursionError) as e:
        problem = str(e) if isinstance(e, ValueError) else "nests too deeply"
        raise LatentLMError(f"{what} {path} {problem}; write the values out") from None


def _expand(d: Any, budget: list[int], active: set[int], floats: bool) -> Any:
    """``d`` with float-like strings of mappings as floats (lists are kept as they are); ValueError
    for an alias cycle or more values than ``budget`` once aliases are expanded."""
    budget[0] -= 1
    if budget[0] < 0:
        raise ValueError(f"holds more than {MAX_YAML_VALUES:,} values once its aliases are expanded")
    if isinstance(d, (dict, list)):
        if id(d) in active:
            raise ValueError("holds an alias that contains itself")
        active.add(id(d))
        try:
            if isinstance(d, dict):
                return {k: _expand(v, budget, active, floats) for k, v in d.items()}
            for v in d:
                _expand(v, budget, active, floats)
            return d
        finally:
            active.discard(id(d))
    if floats and isinstance(d, str) and _looks_like_float(d):
        return _parse_scalar(d)
    return d


def _looks_like_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return s.strip().lower() not in ("nan", "inf", "-inf", "infinity", "-infinity")
