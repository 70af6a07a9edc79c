"""The method registry: names -> :class:`~latentlm.methods.base.Method` classes.

Built-in methods register in ``latentlm/methods/__init__.py``; a user's own module adds one with
:func:`register_method` (also usable as a class decorator), or from an installed package through
the ``latentlm.methods`` entry-point group (``[project.entry-points."latentlm.methods"]
mymethod = "mypkg.mymodule:MyMethod"``), loaded on the first lookup. docs/WRITING_A_METHOD.md.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import keyword

from latentlm.errors import LatentLMError
from latentlm.methods.base import Method

ENTRY_POINT_GROUP = "latentlm.methods"
CORE_SECTIONS = ("model", "data", "train")  # owned by the run config, never by a method

_METHODS: dict[str, type[Method]] = {}
_SECTIONS: dict[str, type] = {}  # section name -> settings dataclass, shared by every method declaring it
_entry_points_loaded = False


def register_method(cls: type[Method], *, replace: bool = False) -> type[Method]:
    """Make ``cls`` available as ``train.method: <cls.name>``; returns ``cls`` (a class decorator).

    Checks what the rest of latentlm relies on: a new identifier-like name (``replace`` re-registers
    one, e.g. a reloaded notebook cell), settings sections that are dataclasses, and a section name
    never bound to two different settings classes (methods sharing a block share its class).
    """
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise LatentLMError(f"register_method needs a subclass of latentlm.methods.base.Method, got {cls!r}")
    name = cls.name
    if not (isinstance(name, str) and name.isidentifier() and not keyword.iskeyword(name)) or name == Method.name:
        raise LatentLMError(f"method class {cls.__qualname__} needs a `name` that is a Python identifier "
                            f"(got {name!r})")
    if name in _METHODS and _METHODS[name] is not cls and not replace:
        raise LatentLMError(f"a method named {name!r} is already registered ({_METHODS[name].__module__}."
                            f"{_METHODS[name].__qualname__}); choose another name")
    for section, settings in cls.sections.items():
        if section in CORE_SECTIONS or not section.isidentifier():
            raise LatentLMError(f"method {name!r} declares config section {section!r}; a method section needs an "
                                f"identifier other than {', '.join(CORE_SECTIONS)}")
        if not dataclasses.is_dataclass(settings):
            raise LatentLMError(f"method {name!r}: the settings of section {section!r} must be a dataclass")
        known = _SECTIONS.get(section)
        if known is not None and known is not settings and not replace:
            raise LatentLMError(f"method {name!r} declares section {section!r} as {settings.__qualname__}, but it "
                                f"already means {known.__qualname__}; reuse that class or name another section")
    _METHODS[name] = cls
    _SECTIONS.update(cls.sections)
    return cls


def _load_entry_points() -> None:
    """Register the methods that installed packages declare in the entry-point group (once)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
        except Exception as e:  # a broken plugin must say which one, not crash with its traceback
            raise LatentLMError(f"cannot load method plugin {ep.name!r} ({ep.value}): {type(e).__name__}: {e}") from None
        if _METHODS.get(getattr(cls, "name", None)) is not cls:
            register_method(cls)


def methods() -> dict[str, type[Method]]:
    """Every registered method by name (built-ins first, in registration order)."""
    _load_entry_points()
    return dict(_METHODS)


def method_class(name: str) -> type[Method]:
    """The class registered as ``name``, or a one-line error listing the registered names."""
    known = methods()
    if name not in known:
        raise LatentLMError(f"unknown method {name!r}; choose from {', '.join(known)}")
    return known[name]


def section_types() -> dict[str, type]:
    """Every method section and its settings dataclass."""
    _load_entry_points()
    return dict(_SECTIONS)


def unregister_method(name: str) -> None:
    """Remove the method ``name`` (and the sections no other registered method declares), e.g. a
    method a test or notebook defined for a while."""
    cls = _METHODS.pop(name, None)
    if cls is None:
        raise LatentLMError(f"no method named {name!r} is registered")
    still = {s for other in _METHODS.values() for s in other.sections}
    for section in cls.sections:
        if section not in still:
            _SECTIONS.pop(section, None)
