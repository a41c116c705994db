"""Reading numbers and typed fields the way people write them (configs, job files, API dicts),
and the one-line errors that name the field. Used by the engine's option dataclasses, the job
configs and the service; plain Python, no torch."""

from __future__ import annotations

import math
import numbers
import types
import typing


def read_number(value, kind: type, what: str, finite: bool = True):
    """``value`` as the ``kind`` (int or float) a person meant by it; ValueError naming ``what``.

    PyYAML reads YAML 1.1, where ``1e-3`` (no dot) is a *string*: numeric strings are read as
    numbers. An int takes ``1_000`` and integral values (``1e3``, ``1000.0``). A bool is refused
    (YAML ``true`` is no learning rate), and so are nan and inf (inf too unless ``finite`` is False).
    """
    expected = "an integer" if kind is int else "a number"
    number = value
    if isinstance(value, str):
        number = None
        for parse in (int, float):  # int first: a long integer must not round through a float
            try:
                number = parse(value.strip())
                break
            except ValueError:
                pass
    if isinstance(number, bool) or not isinstance(number, numbers.Real):
        raise ValueError(f"{what}: expected {expected}, got {value!r}")
    if not isinstance(number, numbers.Integral) and (math.isnan(number) or (finite and math.isinf(number))):
        raise ValueError(f"{what}: expected a finite number, got {value!r}")
    if kind is int:
        if not isinstance(number, numbers.Integral) and not float(number).is_integer():
            raise ValueError(f"{what}: expected an integer, got {value!r}")
        return int(number)
    return number if isinstance(number, numbers.Integral) else float(number)


def coerce_fields(cls, d: dict, what: str = "") -> dict:
    """``d`` with each value checked against the declared type of ``cls``'s field of that name
    (int, float, bool, str, dict, a tuple of floats, each optionally ``| None``) and numbers read
    by `read_number`; a mismatch is one ValueError naming ``what.field``. Other fields (``str |
    list[str]``, ...) and unknown keys pass unchanged: ``cls`` or its caller checks them."""
    hints = typing.get_type_hints(cls)
    return {k: _coerce(hints[k], v, f"{what}.{k}" if what else k) if k in hints else v for k, v in d.items()}


def _coerce(tp, value, what: str):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(tp)):
            return None
        if len(args) != 1:
            return value
        tp = args[0]
    if tp in (int, float):
        return read_number(value, tp, what)
    expected = {bool: "true or false", str: "a string", dict: "a mapping"}.get(tp)
    if expected is not None and not isinstance(value, tp):
        raise ValueError(f"{what}: expected {expected}, got {value!r}")
    if typing.get_origin(tp) is tuple and set(typing.get_args(tp)) == {float}:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{what}: expected a list of numbers, got {value!r}")
        return tuple(read_number(v, float, f"{what}[{i}]") for i, v in enumerate(value))
    return value


def strict_from_dict(cls, d: dict, what: str):
    """``cls(**d)``, refusing keys that are not fields (a typo must not pass silently) and values
    of the wrong type (see `coerce_fields`)."""
    if not isinstance(d, dict):
        raise ValueError(f"{what}: expected a mapping, got {d!r}")
    unknown = set(d) - set(cls.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown {what} field(s): {sorted(unknown)}")
    return cls(**coerce_fields(cls, d, what))


def finite_field(obj, name: str, hint: str = "") -> None:
    v = getattr(obj, name)
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
        raise ValueError(f"{type(obj).__name__}.{name} must be a finite number, got {v!r}"
                         + (f" ({hint})" if hint else ""))


def int_field(obj, name: str, optional: bool = False) -> None:
    """An integer field; an integral float (``1e3``) is stored as the int."""
    v = getattr(obj, name)
    if v is None and optional:
        return
    if (isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v)
            or not float(v).is_integer()):
        raise ValueError(f"{type(obj).__name__}.{name} must be an integer, got {v!r}")
    setattr(obj, name, int(v))


def one_line(e: BaseException, limit: int = 400) -> str:
    """An exception as one line of at most ``limit`` characters (its type when it has no text),
    for the one-line errors the CLI and the service show."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
