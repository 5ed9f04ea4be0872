"""This machine's addresses and ports, for rendezvous (the launchers, the coordinator, the
integrations' per-replica jobs)."""

from __future__ import annotations

import socket

from .._checks import refuse

__all__ = ["address_toward", "check_free_port", "check_local_address", "free_port"]


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


def check_local_address(name: str, host: str) -> None:
    """Refuse (ValueError naming the setting ``name``) a ``host`` this machine cannot listen on:
    an address of another machine, or a name that does not resolve."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((socket.gethostbyname(host), 0))
    except OSError as e:
        raise refuse(name, host, f"an address of this host ({e.strerror or e})") from None


def check_free_port(name: str, port: int, host: str = "127.0.0.1") -> None:
    """Refuse (ValueError naming the setting ``name``) a ``port`` on ``host`` that another socket
    holds: the rendezvous store listening there would fail."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the store binds (TIME_WAIT is free)
        try:
            s.bind((host, port))
        except OSError as e:
            allowed = f"a free TCP port, or 0 for one (on {host}: {e.strerror or e})"
            raise refuse(name, port, allowed) from None
