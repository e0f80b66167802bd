"""MUNGE credentials through libmunge (ctypes), the way Slurm authenticates its users.

``encode(payload)`` asks the local munged for a credential naming the calling process's uid
and gid; ``decode(credential)`` asks munged to check one and returns who made it. munged
enforces the credential's TTL (300 s by default) and refuses a credential decoded twice
(replay), so a client makes a fresh credential per request. When libmunge is missing, the
``munge``/``unmunge`` commands are used instead (slower: one process each).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import shutil
import subprocess
from dataclasses import dataclass

from colocate.errors import BackendUnavailable, Unauthorized

# munge_err_t values from munge.h that say "the credential is bad" (not "munged is down").
_EMUNGE_SOCKET = 6
_EMUNGE_TIMEOUT = 7
_CRED_ERRORS = {
    8: "credential has an invalid length",
    9: "credential is malformed",
    10: "credential is invalid",
    11: "credential is not MUNGE's (wrong key?)",
    12: "credential uses an unsupported cipher",
    13: "credential uses an unsupported MAC",
    14: "credential uses an unsupported compression",
    15: "credential has expired; make a new one",
    16: "credential was issued in the future (clock skew)",
    17: "credential was already used (replayed); make a new one per request",
    18: "credential is not authorized for this user",
}


@dataclass(frozen=True, slots=True)
class MungeCredential:
    """What munged vouched for: the encoding process's uid and gid, and the payload."""

    uid: int
    gid: int
    payload: bytes


class _Lib:
    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        lib.munge_encode.argtypes = [
            ctypes.POINTER(ctypes.c_char_p),
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int,
        ]
        lib.munge_encode.restype = ctypes.c_int
        lib.munge_decode.argtypes = [
            ctypes.c_char_p,
            ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.POINTER(ctypes.c_int),
            ctypes.POINTER(ctypes.c_uint32),
            ctypes.POINTER(ctypes.c_uint32),
        ]
        lib.munge_decode.restype = ctypes.c_int
        lib.munge_strerror.argtypes = [ctypes.c_int]
        lib.munge_strerror.restype = ctypes.c_char_p
        self.libc = ctypes.CDLL(None)
        self.libc.free.argtypes = [ctypes.c_void_p]

    def encode(self, payload: bytes) -> str:
        cred = ctypes.c_char_p()
        buf = ctypes.create_string_buffer(payload, len(payload)) if payload else None
        err = self.lib.munge_encode(ctypes.byref(cred), None, buf, len(payload))
        if err != 0:
            raise BackendUnavailable(
                f"munged refused to make a credential: {self._text(err)}; is munged running?"
            )
        try:
            assert cred.value is not None
            return cred.value.decode()
        finally:
            self.libc.free(ctypes.cast(cred, ctypes.c_void_p))

    def decode(self, credential: str) -> MungeCredential:
        buf = ctypes.c_void_p()
        length = ctypes.c_int()
        uid = ctypes.c_uint32()
        gid = ctypes.c_uint32()
        err = self.lib.munge_decode(
            credential.encode(),
            None,
            ctypes.byref(buf),
            ctypes.byref(length),
            ctypes.byref(uid),
            ctypes.byref(gid),
        )
        try:
            payload = ctypes.string_at(buf, length.value) if buf.value and length.value > 0 else b""
        finally:
            if buf.value:
                self.libc.free(buf)
        if err in (_EMUNGE_SOCKET, _EMUNGE_TIMEOUT) or (err and err not in _CRED_ERRORS):
            raise BackendUnavailable(
                f"cannot check the MUNGE credential: {self._text(err)}; is munged running?"
            )
        if err:
            raise Unauthorized(f"MUNGE {_CRED_ERRORS[err]}")
        return MungeCredential(uid.value, gid.value, payload)

    def _text(self, err: int) -> str:
        text = self.lib.munge_strerror(err)
        return text.decode() if text else f"error {err}"


class _Commands:
    """The ``munge``/``unmunge`` programs, for hosts without libmunge.so."""

    def encode(self, payload: bytes) -> str:
        try:
            done = subprocess.run(
                ["munge", "-s", payload.decode()],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BackendUnavailable(
                f"cannot run `munge` ({exc}); install munge and start munged"
            ) from None
        if done.returncode != 0:
            raise BackendUnavailable(f"munge failed: {done.stderr.strip()}; is munged running?")
        return done.stdout.strip()

    def decode(self, credential: str) -> MungeCredential:
        try:
            done = subprocess.run(
                ["unmunge"],
                input=credential,
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BackendUnavailable(
                f"cannot run `unmunge` ({exc}); install munge and start munged"
            ) from None
        fields: dict[str, str] = {}
        lines = done.stdout.splitlines()
        for i, line in enumerate(lines):
            if not line.strip():
                payload = "\n".join(lines[i + 1 :]).encode()
                break
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
        else:
            payload = b""
        if done.returncode != 0:
            raise Unauthorized(
                f"MUNGE credential refused: {done.stderr.strip() or fields.get('STATUS', '?')}"
            )
        try:
            uid = int(fields["UID"].rsplit("(", 1)[1].rstrip(")"))
            gid = int(fields["GID"].rsplit("(", 1)[1].rstrip(")"))
        except (KeyError, IndexError, ValueError):
            raise Unauthorized("unmunge gave no uid/gid for the credential") from None
        return MungeCredential(uid, gid, payload)


@functools.cache
def _backend() -> _Lib | _Commands | None:
    name = ctypes.util.find_library("munge") or "libmunge.so.2"
    try:
        return _Lib(ctypes.CDLL(name))
    except OSError:
        pass
    if shutil.which("munge") and shutil.which("unmunge"):
        return _Commands()
    return None


def available() -> bool:
    """True when libmunge or the munge commands are installed (munged may still be down)."""
    return _backend() is not None


def encode(payload: bytes = b"") -> str:
    """A fresh credential for this process's uid/gid carrying ``payload``."""
    backend = _backend()
    if backend is None:
        raise BackendUnavailable(
            "MUNGE is not installed here; install munge or use a Slurm JWT (SLURM_JWT)"
        )
    return backend.encode(payload)


def decode(credential: str) -> MungeCredential:
    """Check ``credential`` with munged: Unauthorized when bad, expired or replayed."""
    backend = _backend()
    if backend is None:
        raise BackendUnavailable(
            "MUNGE is not installed on the broker host; install munge and start munged"
        )
    if not credential.isascii() or len(credential) > 16384:
        raise Unauthorized("MUNGE credential is malformed")
    return backend.decode(credential)
