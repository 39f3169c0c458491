"""Dataclass fields that carry their own schema (group, help, choices, bounds), and the checks and conversions
that read it: one place from which validation, the command line's flags and the dashboard's choices are made.

Example::

    >>> from dataclasses import dataclass
    >>> from toolkit.schema import setting, check_fields, from_dict
    >>> @dataclass
    ... class Knobs:
    ...     mode: str = setting("fast", group="run", help="how to run", choices=("fast", "slow"))
    ...     steps: int = setting(10, group="run", help="how many steps", minimum=1)
    >>> check_fields(Knobs(mode="slow", steps=3))
    >>> from_dict(Knobs, {"mode": "fast", "colour": "red"})
    Traceback (most recent call last):
    ...
    ValueError: unknown field 'colour' for Knobs; known fields: mode, steps
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, Iterable

from toolkit.validation import check_int, check_number

UNKNOWN_POLICIES = ("error", "warn", "ignore")


def setting(default, *, group: str, help: str, choices: Iterable | Callable[[], Iterable] | None = None,
            minimum: float | None = None, maximum: float | None = None, strict: bool = False,
            below_maximum: bool = False, optional: bool = False, allow_inf: bool = False, default_factory=None):
    """A dataclass field with its schema in ``metadata``.

    ``choices`` is a sequence or a function returning one (for registries that grow); ``minimum`` / ``maximum``
    bound a number (``strict``: the minimum itself is refused; ``below_maximum``: the maximum too; ``allow_inf``: +inf is a value, as ε = inf means
    "no noise"); ``optional``: ``None`` is allowed (it means "the
    default of the method", see the field's help)."""
    metadata = dict(group=group, help=help, choices=choices, minimum=minimum, maximum=maximum, strict=strict,
                    below_maximum=below_maximum, optional=optional or default is None, allow_inf=allow_inf)
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def choices_of(field: dataclasses.Field) -> tuple | None:
    choices = field.metadata.get("choices")
    if choices is None:
        return None
    return tuple(choices() if callable(choices) else choices)


def check_field(field: dataclasses.Field, value) -> None:
    """``ValueError`` naming the field when ``value`` breaks its choices or bounds."""
    meta = field.metadata
    if value is None and meta.get("optional"):
        return
    if str(field.type) == "bool" and not isinstance(value, bool):  # "false" and 0 would pass as truthy / falsy
        raise ValueError(f"{field.name} must be True or False, got {value!r}")
    choices = choices_of(field)
    if choices is not None and value not in choices:
        raise ValueError(f"unknown {field.name} {value!r}; choose one of {choices}")
    low, high = meta.get("minimum"), meta.get("maximum")
    if low is None and high is None:
        return
    if str(field.type).startswith("int"):
        check_int(field.name, value, minimum=None if low is None else int(low) + bool(meta.get("strict")),
                  maximum=None if high is None else int(high))
        return
    if low is not None and high is not None:  # one message naming the whole interval
        below = meta.get("below_maximum")
        inside = isinstance(value, (int, float)) and not isinstance(value, bool) and (
            (low < value if meta.get("strict") else low <= value) and (value < high if below else value <= high))
        if not inside:
            raise ValueError(f"{field.name} must be in {'(' if meta.get('strict') else '['}{low:g}, {high:g}"
                             f"{')' if below else ']'}, got {value!r}")
        return
    check_number(field.name, value, minimum=low, strict=bool(meta.get("strict")), allow_inf=bool(meta.get("allow_inf")))
    if high is not None and value > high:
        raise ValueError(f"{field.name} must be <= {high:g}, got {value!r}")


def check_fields(obj) -> None:
    """Every schema'd field of a dataclass instance checked against its choices and bounds."""
    for field in dataclasses.fields(obj):
        if "group" in field.metadata:
            check_field(field, getattr(obj, field.name))


def from_dict(cls, data: dict, unknown: str = "error"):
    """``cls(**data)`` with the keys checked: an unknown key is an error (``unknown="error"``, the default), a
    warning naming it (``"warn"``) or dropped (``"ignore"``, for reading records written by a newer version)."""
    if unknown not in UNKNOWN_POLICIES:
        raise ValueError(f"unknown must be one of {UNKNOWN_POLICIES}, got {unknown!r}")
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__} needs a mapping of field values, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    extra = sorted(str(k) for k in data if k not in known)
    if extra and unknown == "error":
        raise ValueError(f"unknown field{'s' if len(extra) > 1 else ''} {', '.join(repr(k) for k in extra)} for "
                         f"{cls.__name__}; known fields: {', '.join(sorted(known))}")
    if extra and unknown == "warn":
        warnings.warn(f"{cls.__name__}: ignoring unknown field(s) {extra}", stacklevel=2)
    return cls(**{k: v for k, v in data.items() if k in known})


def groups(cls) -> dict[str, list[dataclasses.Field]]:
    """The fields of ``cls`` by group, in declaration order."""
    out: dict[str, list[dataclasses.Field]] = {}
    for field in dataclasses.fields(cls):
        out.setdefault(field.metadata.get("group", "other"), []).append(field)
    return out
