"""Endpoint settings of the control plane (the machine's addresses and ports: lowcomm.comm.net)."""

from __future__ import annotations

import ipaddress
import re

from .._checks import refuse

__all__ = ["check_endpoint", "valid_host", "valid_name"]

_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def valid_name(v: str, limit: int = 128) -> bool:
    """Printable ASCII without spaces, 1..limit characters (a job's or a worker's name)."""
    return 0 < len(v) <= limit and all("!" <= c <= "~" for c in v)


def _ip_address(v: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``v`` as an IP address (IPv6 with or without brackets), or None if it is none."""
    try:
        return ipaddress.ip_address(v[1:-1] if v.startswith("[") and v.endswith("]") else v)
    except ValueError:
        return None


def valid_host(v: str) -> bool:
    """An IP address (IPv6 with or without brackets) or a host name: dot-separated labels of
    letters, digits, '-' (not first or last) and '_' (outside RFC 1123, but /etc/hosts and
    container runtimes have them)."""
    if _ip_address(v) is not None:
        return True
    name = v[:-1] if v.endswith(".") else v
    return 0 < len(name) <= 253 and all(_LABEL.fullmatch(label) for label in name.split("."))


def check_endpoint(value, name: str, example: str, *, bind: bool = False) -> str:
    """``value`` if it is a ZeroMQ TCP endpoint ``tcp://HOST:PORT`` (PORT 1-65535; binding, also 0:
    a free port), else ValueError naming the setting, the value and what is allowed."""
    text = value[6:] if isinstance(value, str) and value.startswith("tcp://") else ""
    host, sep, port = text.rpartition(":")
    ip = _ip_address(host)
    if ip is not None and ip.version == 6:  # a worker's socket connected and never reached it
        raise refuse(name, value, "an IPv4 address or a host name: the control plane is IPv4 only")
    ok_port = port.isascii() and port.isdigit() and 1 <= int(port) <= 65535
    # binding, ZeroMQ also takes '*' and an interface's name; connecting, a host
    ok_host = valid_name(host, 255) if bind else valid_host(host)
    if not (sep and ok_host and (ok_port or (bind and port == "0"))):
        ports = "1-65535 or 0" if bind else "1-65535"
        raise refuse(name, value, f"an endpoint like {example!r} (tcp://HOST:PORT, PORT {ports})")
    return value
