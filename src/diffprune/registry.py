"""Named registries (importance criteria, timestep strategies, adapters, presets, datasets, metrics).

Registered names are API: once published, a name keeps its meaning.
"""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from .errors import DiffPruneError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise KeyError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise DiffPruneError(f"unknown {self.kind} {name!r}; choose from {sorted(self._items)}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))
