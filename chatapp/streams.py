"""Helpers for reply streams: generators that yield text as it grows and return (as
``StopIteration.value``) what they produced, like :meth:`chatapp.engine.ChatEngine.stream`."""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import TypeVar

T, U, R = TypeVar("T"), TypeVar("U"), TypeVar("R")


def map_stream(gen: Generator[T, None, R], fn: Callable[[T], U]) -> Generator[U, None, R]:
    """Yield ``fn(item)`` for every item ``gen`` yields and return ``gen``'s return value
    (``StopIteration.value``); closing this generator closes ``gen`` (which ends its replies)."""
    try:
        while True:
            try:
                item = next(gen)
            except StopIteration as done:
                return done.value
            yield fn(item)
    finally:
        gen.close()


def drain(gen: Generator[object, None, R]) -> R:
    """Run a stream to its end, discarding what it yields; its return value (``StopIteration.value``)."""
    while True:
        try:
            next(gen)
        except StopIteration as done:
            return done.value
