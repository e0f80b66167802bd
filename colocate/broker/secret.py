"""The cluster secret: signs lease tokens and authenticates agents to the broker and back.

Broker and agents read the same file (``broker.secret_file`` in the config). The first one to
start creates it: 32 random bytes, hex, mode 0600, created exclusively so two processes
starting together agree on one secret.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path

from colocate.errors import ConfigError

log = logging.getLogger(__name__)


def default_secret_file() -> Path:
    """``/var/lib/colocate/cluster.secret`` for root, else under ``$XDG_STATE_HOME`` (or ~/.local/state)."""
    if os.geteuid() == 0:
        return Path("/var/lib/colocate/cluster.secret")
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "colocate" / "cluster.secret"


def load_or_create_secret(path: str | Path | None) -> bytes:
    """The secret in ``path`` (default :func:`default_secret_file`), creating it when absent.

    Raises ConfigError when the file exists but is empty, unreadable or readable by others.
    """
    file = Path(path) if path else default_secret_file()
    if not file.exists():
        # Write a private temp file, then hard-link it into place: atomic, and a process
        # losing the race reads the winner's complete secret.
        tmp = file.with_name(f".{file.name}.{os.getpid()}.{secrets.token_hex(4)}")
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_hex(32) + "\n")
            os.link(tmp, file)
            log.info("created cluster secret %s", file)
        except FileExistsError:
            pass
        except OSError as exc:
            raise ConfigError(
                f"cannot create the cluster secret ({exc.strerror}); set broker.secret_file to a writable path",
                path=str(file),
            ) from None
        finally:
            tmp.unlink(missing_ok=True)
    try:
        mode = file.stat().st_mode
        text = file.read_text().strip()
    except OSError as exc:
        raise ConfigError(
            f"cannot read the cluster secret ({exc.strerror})", path=str(file)
        ) from None
    if mode & 0o077:
        raise ConfigError(
            "cluster secret is readable by group or others; chmod 600 it", path=str(file)
        )
    if len(text) < 16:
        raise ConfigError(
            "cluster secret is shorter than 16 characters; delete it to regenerate", path=str(file)
        )
    return text.encode()


def control_token(secret: bytes) -> str:
    """The header value agents and the broker present to each other (derived, not the secret)."""
    return hmac.new(secret, b"colocate control v1", hashlib.sha256).hexdigest()


def control_token_ok(secret: bytes, presented: str | None) -> bool:
    """True when ``presented`` is the control token; False for anything else, non-ASCII included."""
    if presented is None or not presented.isascii():
        return False
    return hmac.compare_digest(presented.encode(), control_token(secret).encode())
