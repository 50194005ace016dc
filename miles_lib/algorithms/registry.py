"""A tiny name -> function registry, one per family (advantages, policy losses, KL, ...).

Every registry fixes ONE signature (the positional parameter names of its family), so callers never
special-case a name: ``REGISTRY.get(cfg.name)(*same_args)``. Registering a name twice is an error
(two functions silently fighting over a name is a bug), and asking for an unknown name raises a
``ConfigError`` that lists the valid names.

    ADVANTAGES = Registry("advantage estimator", params=("rewards_S", "group_ids_S", ...))

    @ADVANTAGES.register("grpo")
    def grpo(rewards_S, group_ids_S, ...): ...

    ADVANTAGES.get("grpo")   # -> grpo
    ADVANTAGES.get("gpro")   # ConfigError: unknown advantage estimator 'gpro'; valid: ['grpo', ...]
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Generic, TypeVar

from miles_lib.errors import ConfigError

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    """Functions of one family, by name.

    kind:   what the names are, for messages ("advantage estimator").
    params: the positional parameter names every registered function must have, in order
            (keyword-only extras after ``*`` are allowed); None = no check.
    """

    def __init__(self, kind: str, params: tuple[str, ...] | None = None) -> None:
        self.kind = kind
        self.params = params
        self._fns: dict[str, F] = {}

    def register(self, *names: str) -> Callable[[F], F]:
        """Decorator registering a function under one or more names (aliases)."""
        if not names:
            raise ValueError(f"register a {self.kind}: give at least one name")

        def deco(fn: F) -> F:
            self._check_signature(fn)
            for name in names:
                if name in self._fns:
                    prev = self._fns[name]
                    raise ValueError(
                        f"{self.kind} {name!r} is already registered (by "
                        f"{prev.__module__}.{prev.__qualname__}); choose another name")
            for name in names:
                self._fns[name] = fn
            return fn

        return deco

    def _check_signature(self, fn: Callable) -> None:
        if self.params is None:
            return
        positional = [p.name for p in inspect.signature(fn).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if tuple(positional) != self.params:
            raise TypeError(
                f"{self.kind} {fn.__qualname__} has positional parameters {positional}; every "
                f"{self.kind} must take exactly {list(self.params)} (extras keyword-only)")

    def get(self, name: str) -> F:
        try:
            return self._fns[name]
        except (KeyError, TypeError):
            raise ConfigError(f"unknown {self.kind} {name!r}; valid: {self.names()}") from None

    def names(self) -> list[str]:
        return sorted(self._fns)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._fns

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={self.names()})"
