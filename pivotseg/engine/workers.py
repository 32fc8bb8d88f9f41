"""One-line errors from DataLoader worker processes.

A :class:`~pivotseg.errors.PivotsegError` raised in a worker (``num_workers > 0``) reaches the
main process re-created by torch with the worker's whole traceback as its message ("Caught
DataError in DataLoader worker process 0. Original Traceback ..."), which the CLI would print
as some 25 lines. :func:`unwrap_worker_errors` gives back the worker's own one-line error.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from pivotseg.errors import PivotsegError

T = TypeVar("T")
_WORKER_MARK = "in DataLoader worker process"


def unwrap_worker_error(err: PivotsegError) -> PivotsegError:
    """The error as the worker raised it (``err`` itself when it did not come from a worker)."""
    text = str(err)
    if _WORKER_MARK not in text.split("\n", 1)[0]:
        return err
    name = type(err).__name__
    for line in reversed(text.splitlines()):
        head, sep, message = line.partition(": ")
        if sep and (head == name or head.endswith(f".{name}")):
            return type(err)(message)
    return err


def unwrap_worker_errors(batches: Iterable[T]) -> Iterator[T]:
    """``batches`` item by item, worker errors re-raised as :func:`unwrap_worker_error` gives."""
    iterator = iter(batches)
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except PivotsegError as err:
            raise unwrap_worker_error(err) from None
        yield item


def next_batch(iterator: Iterator[T]) -> T:
    """``next(iterator)`` with worker errors unwrapped."""
    try:
        return next(iterator)
    except PivotsegError as err:
        raise unwrap_worker_error(err) from None
