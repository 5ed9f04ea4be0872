"""The one error a setting out of range raises, everywhere in lowcomm."""

from typing import Any

__all__ = ["refuse"]


def refuse(name: str, value: Any, allowed: str) -> ValueError:
    """``name=value is not allowed: allowed`` — the setting, the value and what is allowed."""
    return ValueError(f"{name}={value!r} is not allowed: {allowed}")
