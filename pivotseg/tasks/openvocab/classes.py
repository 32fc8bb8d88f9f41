"""Class names of an open-vocabulary query: synonyms, underscores, classes files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pivotseg.errors import ConfigError, DataError


def parse_class_names(entries: Sequence[str], where: str = "classes") -> list[list[str]]:
    """Each class as a list of synonyms (``"person; pedestrian"``), underscores as spaces.

    Raises:
        ConfigError: no classes, an empty name, or a name given twice.
    """
    if not entries:
        raise ConfigError(f"{where}: no class names given; list at least one")
    classes, seen = [], {}
    for i, entry in enumerate(entries):
        names = [n.strip().replace("_", " ") for n in str(entry).split(";")]
        if not all(names):
            raise ConfigError(
                f"{where}: class {i + 1} ({entry!r}) has an empty name; remove stray commas or "
                "semicolons"
            )
        for name in names:
            key = name.lower()
            if key in seen:
                raise ConfigError(
                    f"{where}: {name!r} is given twice (classes {seen[key] + 1} and {i + 1}); "
                    "each name may appear once"
                )
            seen[key] = i
        classes.append(names)
    return classes


def read_classes_file(path: str | Path) -> list[str]:
    """Class entries of a text file: one class per line (synonyms separated by ``;``), ``#``
    comments and blank lines skipped.

    Raises:
        DataError: the file does not exist or cannot be read.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: classes file not found; give a text file with one class per line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read the classes file ({err})") from None
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
