"""Dataclasses read from plain data (as YAML or JSON give it), each value checked against and
converted to its field's annotation, with one-line :class:`~pivotseg.errors.ConfigError`\\ s.

One reader serves the run config (:mod:`pivotseg.config`), a checkpoint's ``segmenter.json``
(:meth:`pivotseg.segmenter.SegmenterConfig.from_dict`) and FAMix's mining config. Errors name
the dotted key and the fix; an unknown key gets the closest valid one. Numbers such as ``1e-4``,
which YAML 1.1 reads as strings, are accepted.

Only the standard library is imported here: the CLI reads configs before torch is needed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

from pivotseg.errors import ConfigError
from pivotseg.naming import hint

_PLAIN = (bool, int, float, str)


def read_dataclass(cls: type, data: Any, where: str = "", *, source: str | None = None) -> Any:
    """Build dataclass ``cls`` from ``data``, converting nested values to their annotations.

    Args:
        cls: the dataclass; a field holding a dataclass reads a mapping (or, where the class
            has ``from_string``, a string).
        data: a mapping of field names to values.
        where: the dotted key of ``data`` in the run config (``""`` at the top, ``"model"``);
            errors name keys under it: ``unknown config key model.hed; did you mean
            model.head?``.
        source: for data read on its own (a ``segmenter.json``, a mining config), the file or
            label that the reader's errors start with; keys are then quoted: ``{source}:
            unknown key 'hed'; did you mean 'head'?``.

    Raises:
        ConfigError: an unknown or missing key, or a value of the wrong type; a ConfigError
            that ``cls`` raises itself passes through unchanged, its TypeError or ValueError
            becomes one.
    """
    return _convert(cls, data, where, source)


def _error(source: str | None, text: str) -> ConfigError:
    return ConfigError(f"{source}: {text}" if source else text)


def _at(where: str, source: str | None, text: str) -> str:
    """``text`` after the dotted key it is about; the whole run config is ``config``."""
    if where or not source:
        return f"{where or 'config'}: {text}"
    return text


def _convert(tp: Any, value: Any, where: str, source: str | None) -> Any:
    """Check and convert ``value`` to the annotated type ``tp``; ``where`` is the dotted key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        # A value already of one of the plain types stays as it is (``str | int`` keeps 1 an int).
        if type(value) in _PLAIN and type(value) in options:
            return value
        last = None
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, where, source)
            except ConfigError as err:
                last = err
        raise last
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str) and hasattr(tp, "from_string"):
            return tp.from_string(value)
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise _error(source, _at(where, source, f"expected a mapping, got {value!r}"))
        return _convert_dataclass(tp, value, where, source)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise _error(source, f"{where}={value!r}: use one of {', '.join(map(str, allowed))}")
        return value
    if origin in (list, tuple):
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise _error(source, f"{where}={value!r}: expected a list")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise _error(source, f"{where}={value!r}: expected {len(args)} values")
            return tuple(
                _convert(a, v, f"{where}.{i}", source) for i, (a, v) in enumerate(zip(args, value))
            )
        item_type = args[0] if args else Any
        converted = [_convert(item_type, v, f"{where}.{i}", source) for i, v in enumerate(value)]
        return tuple(converted) if origin is tuple else converted
    if tp is dict or origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise _error(source, f"{where}={value!r}: expected a mapping")
        return dict(value)
    if tp is Any:
        return value
    return _scalar(tp, value, where, source)


def _scalar(tp: type, value: Any, where: str, source: str | None) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _error(source, f"{where}={value!r}: expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        number = _number(value)
        if number is not None and float(number).is_integer():
            return int(number)
        raise _error(source, f"{where}={value!r}: expected an integer")
    if tp is float:
        number = _number(value)
        if number is not None:
            return float(number)
        raise _error(source, f"{where}={value!r}: expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _error(source, f"{where}={value!r}: expected a string")
    raise _error(source, f"{where}: unsupported setting type {tp}")


def _number(value: Any) -> float | int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads 1e-4 as a string
        except ValueError:
            return None
    return None


def _convert_dataclass(cls: type, data: dict, where: str, source: str | None) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    prefix = f"{where}." if where else ""
    for key in data:
        if key not in names:
            if source:
                suggestion = hint(key, names, listing="valid", prefix=prefix, cutoff=0.5)
                raise _error(source, f"unknown key {prefix + str(key)!r}; {suggestion}")
            suggestion = hint(key, names, listing="valid", quote=False, prefix=prefix, cutoff=0.5)
            raise ConfigError(f"unknown config key {prefix}{key}; {suggestion}")
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    for name in required:
        if name not in data:
            raise _error(source, f"{prefix}{name} is required")
    kwargs = {k: _convert(hints[k], v, f"{prefix}{k}", source) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise _error(source, _at(where, source, str(err))) from None
