"""Names users type: the closest known name for a typo, and keyword settings checked against
the constructor that takes them (one wording for every registry: heads, methods, formats)."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable

from pivotseg.errors import ConfigError


def closest(name: object, known: Iterable[str], cutoff: float = 0.6) -> str | None:
    """The entry of ``known`` closest to ``name`` (difflib's ratio at least ``cutoff``), or
    ``None`` when nothing is that close."""
    matches = difflib.get_close_matches(str(name), list(known), n=1, cutoff=cutoff)
    return matches[0] if matches else None


def hint(
    name: object,
    known: Iterable[str],
    *,
    listing: str = "known",
    quote: bool = True,
    prefix: str = "",
    cutoff: float = 0.6,
) -> str:
    """``"did you mean 'x'?"`` for the closest known name, else ``"{listing}: a, b, c"``.

    ``prefix`` goes before the suggested name (``prefix="train."`` gives ``train.lr``);
    ``quote=False`` leaves the suggestion unquoted.
    """
    known = list(known)
    match = closest(name, known, cutoff)
    if match is None:
        return f"{listing}: {', '.join(known)}"
    suggestion = f"{prefix}{match}"
    return f"did you mean {suggestion!r}?" if quote else f"did you mean {suggestion}?"


def accepted_kwargs(target: Callable, skip: Iterable[str] = ()) -> list[str]:
    """The keyword settings ``target`` takes (a class: its ``__init__``), in signature order,
    without ``self``, ``*args``/``**kwargs`` and the names in ``skip`` (arguments the caller
    passes itself)."""
    function = target.__init__ if inspect.isclass(target) else target
    skipped = {"self", *skip}
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return [
        name
        for name, param in inspect.signature(function).parameters.items()
        if name not in skipped and param.kind not in variadic
    ]


def check_kwargs(
    given: Iterable[str], target: Callable, *, where: str, owner: str, skip: Iterable[str] = ()
) -> None:
    """Refuse the first key of ``given`` that ``target`` does not take.

    Args:
        given: the setting names the user wrote.
        target: the class or function they go to.
        where: the config section that holds them (``"model.head_args"``).
        owner: what takes them, for the message (``"head 'fpn'"``).
        skip: arguments the caller passes itself (not settable by the user).

    Raises:
        ConfigError: ``"{where}: {owner} has no setting 'x'; did you mean 'y'? settings: ..."``.
    """
    names = accepted_kwargs(target, skip)
    for key in given:
        if key not in names:
            match = closest(key, names)
            suggestion = f"did you mean {match!r}? " if match else ""
            raise ConfigError(
                f"{where}: {owner} has no setting {key!r}; {suggestion}"
                f"settings: {', '.join(names) or 'none'}"
            )
