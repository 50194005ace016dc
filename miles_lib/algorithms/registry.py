"""Name -> function registries (one signature per registry; duplicates are errors)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from miles_lib.errors import ConfigError

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._fns: dict[str, F] = {}

    def register(self, *names: str) -> Callable[[F], F]:
        def deco(fn: F) -> F:
            for name in names:
                if name in self._fns:
                    raise ValueError(f"{self.kind} {name!r} is already registered")
                self._fns[name] = fn
            return fn
        return deco

    def get(self, name: str) -> F:
        if name not in self._fns:
            raise ConfigError(f"unknown {self.kind} {name!r}; valid: {sorted(self._fns)}")
        return self._fns[name]

    def names(self) -> list[str]:
        return sorted(self._fns)

    def __contains__(self, name: str) -> bool:
        return name in self._fns
