"""Typed, validated configuration dataclasses.

Every config section is a frozen-free dataclass that validates itself in ``__post_init__`` and names
the bad field with its valid range. ``from_dict`` rejects unknown keys (a typo is an error, never a
silently ignored setting) and builds nested sections. Validation never rewrites values.

Sections live next to the code they configure (``ModelConfig`` in ``miles_lib.model.config`` ...);
this module holds the shared machinery and re-exports the sections.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, TypeVar

from miles_lib.errors import ConfigError

T = TypeVar("T", bound="ConfigBase")


def check(cond: bool, section: str, field: str, value: Any, valid: str) -> None:
    """Raise ConfigError('<section>.<field>=<value> is invalid: must be <valid>') unless ``cond``."""
    if not cond:
        raise ConfigError(f"{section}.{field}={value!r} is invalid: must be {valid}")


@dataclasses.dataclass
class ConfigBase:
    """Base for config sections: strict ``from_dict`` / ``to_dict``."""

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any] | None) -> T:
        data = dict(data or {})
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ConfigError(
                f"{cls.__name__}: unknown key(s) {unknown}; valid keys are {sorted(fields)}"
            )
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for name, value in data.items():
            hint = hints.get(name)
            if isinstance(hint, type) and issubclass(hint, ConfigBase) and isinstance(value, dict):
                value = hint.from_dict(value)
            kwargs[name] = value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
