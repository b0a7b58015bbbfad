"""Postgres wire-protocol router: stable URLs per route, wake on connect, repoint.

See ``server.py`` for how routes are read from the startup packet, TLS (SSLRequest
is answered 'N') and end-to-end authentication.
"""

from .server import Proxy, ProxyThread, Resolver, RouteError, Target, new_event_loop

__all__ = ["Proxy", "ProxyThread", "Resolver", "RouteError", "Target", "new_event_loop"]
