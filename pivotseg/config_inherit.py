"""``_base_`` inheritance of YAML configs, as mmsegmentation users know it.

A config may start from other files: ``_base_: other.yaml`` or ``_base_: [a.yaml, b.yaml]``,
paths relative to the including file. The bases are read (with their own bases) and
deep-merged in order, then the including file on top: mappings merge key by key, lists and
scalars replace. A mapping with ``_delete_: true`` replaces the inherited one instead of merging
into it. The result is flat plain data; which file set each key is kept for error messages.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import yaml

from pivotseg.errors import ConfigError

BASE_KEY = "_base_"
DELETE_KEY = "_delete_"


def read_config_file(path: Path) -> tuple[dict, dict[str, Path]]:
    """The merged data of ``path`` and its bases, and the file that last set each dotted key."""
    origins: dict[str, Path] = {}
    data = _read(Path(path), (), origins)
    return data, origins


def with_origin(
    err: ConfigError, origins: dict[str, Path], path: Path, overrides: Sequence[str]
) -> ConfigError:
    """``err``, naming the base file that set the key when it is an unknown key from a base."""
    found = re.match(r"unknown config key (\S+);", str(err))
    if not found:
        return err
    key = found.group(1)
    for item in overrides:
        given = item.partition("=")[0]
        if key == given or key.startswith(f"{given}.") or given.startswith(f"{key}."):
            return err  # set on the command line
    parts = key.split(".")
    # A list is set as a whole: a key inside one of its items comes from the list's file.
    for end in range(len(parts), 0, -1):
        origin = origins.get(".".join(parts[:end]))
        if origin is not None:
            break
    if origin is None or origin == path:
        return err
    return type(err)(str(err).replace(key, f"{key} (set in {origin})", 1))


def _read(path: Path, chain: tuple[Path, ...], origins: dict[str, Path]) -> dict:
    data = _read_yaml(path)
    bases = data.pop(BASE_KEY, None)
    if bases is None:
        bases = []
    elif isinstance(bases, str):
        bases = [bases]
    elif not (isinstance(bases, list) and all(isinstance(b, str) for b in bases)):
        raise ConfigError(
            f"{path}: {BASE_KEY}={bases!r}; give a file name or a list of them, "
            "relative to this file (e.g. _base_: _base_/cpu_tinyvit_camvid.yaml)"
        )
    merged: dict = {}
    here = chain + (path.resolve(),)
    for text in bases:
        base = _base_path(path, text)
        if base.resolve() in here:
            names = " -> ".join(str(p) for p in (*here, base.resolve()))
            raise ConfigError(
                f"{path}: {BASE_KEY} cycle {names}; remove one of these {BASE_KEY} entries"
            )
        merged = merge(merged, _read(base, here, origins), "", base, origins=None)
    return merge(merged, data, "", path, origins)


def _base_path(including: Path, text: str) -> Path:
    base = Path(os.path.expanduser(os.path.expandvars(text)))
    if not base.is_absolute():
        base = including.parent / base
    if not base.is_file():
        raise ConfigError(
            f"{including}: {BASE_KEY} {text!r} not found (looked for {base}); "
            "base paths are relative to the file that names them"
        )
    return base


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", None) or err
        raise ConfigError(f"{path}{where}: not valid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping (model:, data:, train:, ...)")
    return data


def merge(
    base: dict, top: dict, prefix: str, source: Path, origins: dict[str, Path] | None
) -> dict:
    """``top`` deep-merged over ``base`` (new dicts; inputs untouched). Keys set by ``top`` are
    recorded in ``origins`` as coming from ``source`` (a base's own keys were recorded when it
    was read, so a base merged in passes ``origins=None``)."""
    out = dict(base)
    for key, value in top.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            value = dict(value)
            replace = value.pop(DELETE_KEY, False)
            if not isinstance(replace, bool):
                raise ConfigError(
                    f"{source}: {dotted}.{DELETE_KEY}={replace!r}; write {DELETE_KEY}: true to "
                    "replace the inherited mapping, or drop it to merge into it"
                )
            inherited = out.get(key)
            if isinstance(inherited, dict) and not replace:
                value = merge(inherited, value, f"{dotted}.", source, origins)
            else:
                value = merge({}, value, f"{dotted}.", source, origins)
        if origins is not None:
            origins[dotted] = source
        out[key] = value
    return out


__all__ = ["BASE_KEY", "DELETE_KEY", "merge", "read_config_file", "with_origin"]
