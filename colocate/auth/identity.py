"""Identities on the broker's API, as Slurm establishes them.

A request carries ``Authorization: MUNGE <credential>`` (made by the cluster's munged for the
calling uid; its payload names the request's method and path, so a credential seen on the wire
cannot be replayed, nor moved to another request) or ``Authorization: Bearer <jwt>`` (a Slurm
JWT, ``scontrol token``: HS256 with the key of ``AuthAltParameters=jwt_key=``, the user name in
the ``sun`` claim). The broker turns it into an :class:`Identity`: uid, gid, user name, groups,
and whether the caller is an admin (root, ``broker.auth.admin_users``/``admin_groups``).
"""

from __future__ import annotations

import grp
import os
import pwd
import time
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path

import httpx

from colocate.auth import munge
from colocate.errors import BackendUnavailable, ConfigError, Unauthorized

AUTH_HEADER = "Authorization"
HOW_TO = (
    "run the client on a cluster node with munged (MUNGE), "
    "or set SLURM_JWT to the token of `scontrol token`"
)


def request_payload(method: str, path: str) -> bytes:
    """What a MUNGE credential carries: binds it to one request."""
    return f"colocate/1 {method.upper()} {path}".encode()


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated caller. ``method`` is ``"munge"`` or ``"jwt"``."""

    uid: int
    gid: int
    user: str
    groups: tuple[str, ...]
    admin: bool
    method: str

    def label(self) -> str:
        return f"{self.user}({self.uid})"


class Authenticator:
    """Checks the ``Authorization`` header of a broker request.

    ``methods`` are the accepted schemes (``"munge"``, ``"jwt"``); ``jwt_key`` the HS256 key
    (the bytes of Slurm's jwt key file); ``admin_users``/``admin_groups`` may act on every
    lease (root always may). ``max_clock_skew_s`` bounds how far in the future a JWT's ``iat``
    may be.
    """

    def __init__(
        self,
        methods: tuple[str, ...] = ("munge",),
        *,
        jwt_key: bytes | None = None,
        admin_users: tuple[str, ...] = (),
        admin_groups: tuple[str, ...] = (),
        max_clock_skew_s: float = 60.0,
    ) -> None:
        if "jwt" in methods and not jwt_key:
            raise ConfigError(
                "jwt needs broker.auth.jwt_key_file (Slurm's AuthAltParameters=jwt_key=)",
                key="broker.auth.methods",
            )
        self.methods = methods
        self._jwt_key = jwt_key
        self._admin_users = frozenset(admin_users)
        self._admin_groups = frozenset(admin_groups)
        self._skew = max_clock_skew_s

    @classmethod
    def from_files(
        cls,
        methods: tuple[str, ...],
        jwt_key_file: str | None,
        admin_users: tuple[str, ...],
        admin_groups: tuple[str, ...],
    ) -> Authenticator:
        key = None
        if jwt_key_file:
            try:
                key = Path(jwt_key_file).read_bytes()
            except OSError as exc:
                raise ConfigError(
                    f"cannot read the JWT key ({exc.strerror})", path=jwt_key_file
                ) from None
        return cls(methods, jwt_key=key, admin_users=admin_users, admin_groups=admin_groups)

    def authenticate(self, header: str | None, method: str, path: str) -> Identity:
        """The caller's identity, or Unauthorized (one line saying how to get a credential)."""
        if not header:
            raise Unauthorized(f"{method} {path}: no credentials; {HOW_TO}")
        scheme, _, value = header.strip().partition(" ")
        scheme = scheme.lower()
        value = value.strip()
        if scheme == "munge" and "munge" in self.methods:
            cred = munge.decode(value)
            if cred.payload != request_payload(method, path):
                raise Unauthorized(
                    f"{method} {path}: MUNGE credential was made for another request; make one per request"
                )
            return self._identity(cred.uid, cred.gid, "munge")
        if scheme == "bearer" and "jwt" in self.methods:
            return self._jwt(value)
        accepted = " or ".join(
            {"munge": "MUNGE", "jwt": "Bearer (Slurm JWT)"}[m] for m in self.methods
        )
        raise Unauthorized(f"{method} {path}: credentials must be {accepted}; {HOW_TO}")

    def _jwt(self, token: str) -> Identity:
        import jwt  # PyJWT: only the broker needs it

        assert self._jwt_key is not None
        try:
            claims = jwt.decode(
                token,
                self._jwt_key,
                algorithms=["HS256"],
                options={"require": ["exp", "iat"]},
                leeway=0,
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized(
                "Slurm JWT has expired; get a new one with `scontrol token`"
            ) from None
        except jwt.InvalidTokenError as exc:
            raise Unauthorized(
                f"Slurm JWT refused ({exc}); get one with `scontrol token`"
            ) from None
        if float(claims["iat"]) > time.time() + self._skew:
            raise Unauthorized("Slurm JWT was issued in the future; check the clocks")
        user = claims.get("sun") or claims.get("username")
        if not isinstance(user, str) or not user:
            raise Unauthorized(
                "Slurm JWT names no user (claim `sun`); get one with `scontrol token`"
            )
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            raise Unauthorized(f"Slurm JWT user {user!r} is not known on the broker host") from None
        return self._identity(entry.pw_uid, entry.pw_gid, "jwt")

    def _identity(self, uid: int, gid: int, method: str) -> Identity:
        try:
            user = pwd.getpwuid(uid).pw_name
        except KeyError:
            user = str(uid)
        groups: tuple[str, ...] = ()
        if self._admin_groups and uid != 0:  # the group database is only read when it matters
            names = []
            for member_gid in os.getgrouplist(user, gid) if user != str(uid) else [gid]:
                try:
                    names.append(grp.getgrgid(member_gid).gr_name)
                except KeyError:
                    continue
            groups = tuple(names)
        admin = (
            uid == 0 or user in self._admin_users or bool(self._admin_groups.intersection(groups))
        )
        return Identity(uid, gid, user, groups, admin, method)


class ClientAuth(httpx.Auth):
    """Attaches a fresh credential to every request: the Slurm JWT in ``jwt`` (default:
    ``$SLURM_JWT``), else a MUNGE credential from the local munged."""

    def __init__(self, jwt: str | None = None) -> None:
        self._jwt = jwt if jwt is not None else os.environ.get("SLURM_JWT") or None

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if self._jwt:
            request.headers[AUTH_HEADER] = f"Bearer {self._jwt}"
        else:
            try:
                cred = munge.encode(request_payload(request.method, request.url.path))
            except BackendUnavailable as exc:
                raise BackendUnavailable(f"no credentials for the broker: {exc}") from None
            request.headers[AUTH_HEADER] = f"MUNGE {cred}"
        yield request
