"""Who is calling: MUNGE credentials and Slurm JWTs in, an :class:`Identity` out.

The client side (:class:`ClientAuth`, an ``httpx.Auth``) attaches a fresh credential to every
request; the broker side (:class:`Authenticator`) checks it and maps it to a POSIX user.
"""

from __future__ import annotations

from colocate.auth.identity import AUTH_HEADER, Authenticator, ClientAuth, Identity, request_payload

__all__ = ["AUTH_HEADER", "Authenticator", "ClientAuth", "Identity", "request_payload"]
