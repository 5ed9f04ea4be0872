"""Endpoint settings of the control plane (the machine's addresses and ports: lowcomm.comm.net)."""

from __future__ import annotations

from .._checks import refuse

__all__ = ["check_endpoint"]


def check_endpoint(value, name: str, example: str, *, bind: bool = False) -> str:
    """``value`` if it is a ZeroMQ TCP endpoint ``tcp://HOST:PORT`` (PORT 1-65535; binding, also 0:
    a free port), else ValueError naming the setting, the value and what is allowed."""
    text = value[6:] if isinstance(value, str) and value.startswith("tcp://") else ""
    host, sep, port = text.rpartition(":")
    ok_port = port.isascii() and port.isdigit() and 1 <= int(port) <= 65535
    if not (sep and host and (ok_port or (bind and port == "0"))):
        ports = "1-65535 or 0" if bind else "1-65535"
        raise refuse(name, value, f"an endpoint like {example!r} (tcp://HOST:PORT, PORT {ports})")
    return value
