"""Reading a trace file as text, plain or gzip-compressed, with errors that name the file."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

from colocate.errors import TraceFormatError


def read_text(path: str | Path) -> str:
    """The whole file as text; ``.gz`` (or gzip magic) is decompressed.

    Raises TraceFormatError for a missing or unreadable file, a broken gzip stream or bytes
    that are not UTF-8/Latin-1 text.
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise TraceFormatError("no such file; check the path", path=str(p)) from None
    except IsADirectoryError:
        raise TraceFormatError("is a directory, expected a trace file", path=str(p)) from None
    except OSError as exc:
        raise TraceFormatError(f"cannot read: {exc.strerror}", path=str(p)) from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise TraceFormatError(f"broken gzip data ({exc})", path=str(p)) from None
    if b"\x00" in raw[:4096]:
        raise TraceFormatError("binary data, expected a text trace", path=str(p))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")
