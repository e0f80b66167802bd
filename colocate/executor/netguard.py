"""``executor.network = "outbound"``: the host's network without the host itself.

With outbound traffic allowed, workers share the host's network namespace, where batch jobs
listen on 127.0.0.1 (and on the node's own addresses). Four small cgroup BPF programs
(``connect()`` and UDP ``sendmsg()``, IPv4 and IPv6) refuse, with EPERM, every destination
that is this host: 127.0.0.0/8, ::1, the unspecified address, their IPv4-mapped forms and the
node's own addresses as the kernel lists them when the agent starts. They are attached to
the agent's ``colocate/<node>`` group of the unified (v2) hierarchy, which every worker
joins; programs stay attached while the group exists, across agent restarts.

Written as raw BPF instructions and loaded with the ``bpf()`` system call through ctypes
(no compiler, no library); a kernel without cgroup BPF raises OSError, which the supervisor
turns into a ConfigError naming ``executor.network``.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import struct
from collections.abc import Iterable
from pathlib import Path

_SYS_BPF = 321  # x86_64
_BPF_PROG_LOAD, _BPF_PROG_ATTACH = 5, 8
_PROG_TYPE_CGROUP_SOCK_ADDR = 18
INET4_CONNECT, INET6_CONNECT, UDP4_SENDMSG, UDP6_SENDMSG = 10, 11, 14, 15

# instruction classes and codes used below
_LDXW, _MOV_K, _AND32_K, _JEQ32_K, _JNE32_K, _JA, _EXIT = 0x61, 0xB7, 0x54, 0x16, 0x56, 0x05, 0x95
_ALLOW, _DENY = "allow", "deny"


def _u32(data: bytes) -> int:
    """A 4-byte address word as a little-endian load of it sees it."""
    return int(struct.unpack("<I", data)[0])


class _Program:
    """A tiny assembler with forward jumps to labels."""

    def __init__(self) -> None:
        self.code: list[tuple[int, int, int, int | str, int]] = []
        self.labels: dict[str, int] = {}

    def op(self, code: int, dst: int = 0, src: int = 0, off: int | str = 0, imm: int = 0) -> None:
        self.code.append((code, dst, src, off, imm))

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def bytes(self) -> bytes:
        out = []
        for i, (code, dst, src, off, imm) in enumerate(self.code):
            rel = self.labels[off] - i - 1 if isinstance(off, str) else off
            imm = imm - (1 << 32) if imm >= 1 << 31 else imm
            out.append(struct.pack("<BBhi", code, (src << 4) | dst, rel, imm))
        return b"".join(out)


def _deny_v4(p: _Program, reg: int, local: Iterable[bytes]) -> None:
    """Jump to deny when the IPv4 address in ``reg`` (as loaded) is this host."""
    p.op(_MOV_K | 0x08, 9, reg)  # r9 = reg (BPF_ALU64|BPF_MOV|BPF_X = 0xbf)
    p.op(_AND32_K, 9, imm=0xFF)
    p.op(_JEQ32_K, 9, off=_DENY, imm=127)
    p.op(_JEQ32_K, reg, off=_DENY, imm=0)
    for addr in local:
        p.op(_JEQ32_K, reg, off=_DENY, imm=_u32(addr))


def program_v4(local_v4: Iterable[bytes]) -> bytes:
    p = _Program()
    p.op(_LDXW, 2, 1, 4)  # r2 = ctx->user_ip4
    _deny_v4(p, 2, local_v4)
    p.label(_ALLOW)
    p.op(_MOV_K, 0, imm=1)
    p.op(_EXIT)
    p.label(_DENY)
    p.op(_MOV_K, 0, imm=0)
    p.op(_EXIT)
    return p.bytes()


def program_v6(local_v4: Iterable[bytes], local_v6: Iterable[bytes]) -> bytes:
    p = _Program()
    for reg, off in ((2, 8), (3, 12), (4, 16), (5, 20)):  # ctx->user_ip6[0..3]
        p.op(_LDXW, reg, 1, off)
    for n, addr in enumerate(local_v6):
        skip = f"next{n}"
        a, b, c, d = (_u32(addr[i : i + 4]) for i in range(0, 16, 4))
        p.op(_JNE32_K, 2, off=skip, imm=a)
        p.op(_JNE32_K, 3, off=skip, imm=b)
        p.op(_JNE32_K, 4, off=skip, imm=c)
        p.op(_JEQ32_K, 5, off=_DENY, imm=d)
        p.label(skip)
    p.op(_JNE32_K, 2, off=_ALLOW, imm=0)
    p.op(_JNE32_K, 3, off=_ALLOW, imm=0)
    p.op(_JEQ32_K, 4, off="zero", imm=0)
    p.op(_JNE32_K, 4, off=_ALLOW, imm=_u32(b"\x00\x00\xff\xff"))
    _deny_v4(p, 5, local_v4)  # ::ffff:a.b.c.d
    p.op(_JA, off=_ALLOW)
    p.label("zero")  # :: and ::1
    p.op(_JEQ32_K, 5, off=_DENY, imm=0)
    p.op(_JEQ32_K, 5, off=_DENY, imm=_u32(b"\x00\x00\x00\x01"))
    p.label(_ALLOW)
    p.op(_MOV_K, 0, imm=1)
    p.op(_EXIT)
    p.label(_DENY)
    p.op(_MOV_K, 0, imm=0)
    p.op(_EXIT)
    return p.bytes()


def local_addresses(proc: str = "/proc") -> tuple[list[bytes], list[bytes]]:
    """This host's own IPv4 and IPv6 addresses (packed), from the kernel's tables."""
    v4: set[bytes] = set()
    last = ""
    try:
        for line in Path(proc, "net", "fib_trie").read_text().splitlines():
            text = line.strip()
            if text.startswith(("|--", "+--")):
                last = text[3:].strip().split("/")[0]
            elif "/32 host LOCAL" in text and last:
                v4.add(ipaddress.IPv4Address(last).packed)
    except (OSError, ValueError):
        pass
    v6: set[bytes] = set()
    try:
        for line in Path(proc, "net", "if_inet6").read_text().splitlines():
            v6.add(bytes.fromhex(line.split()[0]))
    except (OSError, ValueError, IndexError):
        pass
    return sorted(v4), sorted(v6)


_libc = ctypes.CDLL(None, use_errno=True)


def _bpf(cmd: int, attr: bytes) -> int:
    buf = ctypes.create_string_buffer(attr, 128)
    result = int(_libc.syscall(_SYS_BPF, cmd, buf, 128))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf({cmd}): {os.strerror(err)}")
    return result


def load(program: bytes, attach_type: int) -> int:
    """Load ``program`` for ``attach_type``; its file descriptor."""
    code = ctypes.create_string_buffer(program)
    license_ = ctypes.create_string_buffer(b"GPL")
    attr = struct.pack(
        "<IIQQIIQII16sII",
        _PROG_TYPE_CGROUP_SOCK_ADDR,
        len(program) // 8,
        ctypes.addressof(code),
        ctypes.addressof(license_),
        0,
        0,
        0,
        0,
        0,
        b"colocate_net",
        0,
        attach_type,
    )
    return _bpf(_BPF_PROG_LOAD, attr)


def guard(cgroup_dir: str, proc: str = "/proc") -> None:
    """Attach the four programs to ``cgroup_dir`` (a unified-hierarchy group), replacing
    what an earlier agent attached there."""
    v4, v6 = local_addresses(proc)
    programs = {
        INET4_CONNECT: program_v4(v4),
        UDP4_SENDMSG: program_v4(v4),
        INET6_CONNECT: program_v6(v4, v6),
        UDP6_SENDMSG: program_v6(v4, v6),
    }
    target = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for attach_type, program in programs.items():
            fd = load(program, attach_type)
            try:
                _bpf(_BPF_PROG_ATTACH, struct.pack("<IIII", target, fd, attach_type, 0))
            finally:
                os.close(fd)
    finally:
        os.close(target)


def unified_root(cgroup_root: str = "/sys/fs/cgroup") -> str | None:
    """The unified (v2) hierarchy: ``<root>/unified`` on hybrid hosts, ``<root>`` on v2 ones."""
    for candidate in (os.path.join(cgroup_root, "unified"), cgroup_root):
        if os.path.exists(os.path.join(candidate, "cgroup.procs")) and os.path.exists(
            os.path.join(candidate, "cgroup.subtree_control")
        ):
            return candidate
    return None
