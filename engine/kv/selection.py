"""Which KV transports a process uses: the default lists and the TLS rule, owned here for router and workers.

    usable_transports("shm,tcp,grpc", tls=True)  ->  ("shm", "grpc")

The router asks prefill workers for `PREFERENCE` (every built-in transport,
best first); a prefill worker offers `WORKER_DEFAULT` and picks the first of the router's list it
serves (engine.kv.exporter). With TLS between services `tcp` is never used:
its data socket is plaintext, so KV moves over the TLS gRPC stream, or shared
memory on one host. Pure; imports only the transport registry.
"""

from __future__ import annotations

from collections.abc import Iterable

from engine.kv.transport import transport_names

# Best first: shm maps the producer's pages (one host only), tcp is a raw socket, grpc works everywhere.
PREFERENCE = ("shm", "tcp", "grpc")
# tcp is opt-in on workers: its data socket listens on an ephemeral port that a firewall
# naming the worker's ports (docs/deploy.md) would block. grpc is always served anyway.
WORKER_DEFAULT = ("grpc", "shm")
PLAINTEXT = frozenset({"tcp"})


def usable_transports(names: str | Iterable[str], *, tls: bool) -> tuple[str, ...]:
    """`names` (a list or "a,b,c"), blanks and repeats dropped, in order; under `tls`, no plaintext transport."""
    items = names.split(",") if isinstance(names, str) else names
    wanted = dict.fromkeys(t.strip() for t in items if t.strip())
    return tuple(t for t in wanted if not (tls and t in PLAINTEXT))


def known_transports() -> list[str]:
    """The registered transport names (what a setting may list)."""
    return transport_names()
