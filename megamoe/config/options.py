"""`option(default, help)`: a config field that carries its own documentation, which --help-config prints."""
from __future__ import annotations

from dataclasses import field
from typing import Any, Callable, Optional


def option(default: Any = None, help: str = "", factory: Optional[Callable] = None):
    """A dataclass field with `help` in its metadata; `factory` for mutable defaults (lists)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


def is_number(s: Any) -> bool:
    try:
        float(s)
        return True
    except (TypeError, ValueError):
        return False
