"""Small network helpers shared by the launchers."""

from __future__ import annotations

import socket

from .._checks import refuse

__all__ = ["address_toward", "free_port", "check_endpoint"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago (for a rendezvous or a coordinator)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def address_toward(host: str) -> str:
    """The address of this machine on its route to ``host`` (127.0.0.1 for a local one): the one
    its peers there can reach it at."""
    if host in ("127.0.0.1", "localhost", "::1"):
        return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((socket.gethostbyname(host), 9))  # no packet is sent
            return s.getsockname()[0]
    except OSError:
        return socket.gethostbyname(socket.gethostname())


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
