"""Slurm's compact lists: host lists (``n[1-3,5],gpu01``) and CPU id lists (``0-3,8``)."""

from __future__ import annotations

import re

_BRACKET = re.compile(r"^(?P<prefix>[^\[]*)\[(?P<body>[^\]]*)\](?P<rest>.*)$")


def _split_top(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def expand_hostlist(text: str | None) -> tuple[str, ...]:
    """``n[1-3,5]`` -> (n1, n2, n3, n5). Zero padding is kept (``a[01-02]`` -> a01, a02).

    Raises ValueError on a malformed list (callers turn it into a warning).
    """
    if not text or text in {"(null)", "None"}:
        return ()
    hosts: list[str] = []
    for part in _split_top(text):
        m = _BRACKET.match(part)
        if not m:
            if "[" in part or "]" in part:
                raise ValueError(f"malformed host list {text!r}")
            hosts.append(part)
            continue
        tails = expand_hostlist(m["rest"]) if m["rest"] else ("",)
        for item in m["body"].split(","):
            lo, _, hi = item.partition("-")
            if not lo.isdigit() or (hi and not hi.isdigit()):
                raise ValueError(f"malformed host list {text!r}")
            width = len(lo)
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.extend(f"{m['prefix']}{i:0{width}d}{tail}" for tail in tails)
    return tuple(hosts)


def parse_cpu_ids(text: str | None) -> tuple[int, ...]:
    """``0-3,8`` -> (0, 1, 2, 3, 8), sorted and unique; empty text -> ().

    Raises ValueError on anything else (callers turn it into a warning).
    """
    if text is None:
        return ()
    text = text.strip()
    if not text or text in {"(null)", "N/A"}:
        return ()
    ids: set[int] = set()
    for item in text.split(","):
        lo, _, hi = item.strip().partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ValueError(f"malformed CPU id list {text!r}")
        ids.update(range(int(lo), int(hi or lo) + 1))
    return tuple(sorted(ids))


def format_cpu_ids(ids: tuple[int, ...] | frozenset[int] | list[int]) -> str:
    """(0, 1, 2, 5) -> ``0-2,5``: the kernel's cpuset list format."""
    out: list[str] = []
    run: list[int] = []
    for i in sorted(set(ids)):
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [i]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)
