"""Direct messages over TCP between live processes (colocate.process.direct): a sender must
prove the key in the receiver's live.addr; outside an executor, plain loopback sockets."""

from __future__ import annotations

import json
import os
from pathlib import Path

from colocate.process import direct


def test_a_sender_with_the_key_is_heard_and_one_without_is_not(tmp_path: Path) -> None:
    box = direct.Mailbox(str(tmp_path), direct.Net("node-a", "127.0.0.1"))
    try:
        addr = tmp_path / direct.ADDR
        assert addr.stat().st_mode & 0o777 == 0o600  # the owner's workers only
        sender = direct.Net("node-b", "127.0.0.1")
        assert direct.send(str(tmp_path), b"hello", sender)
        assert list(box.messages) == [b"hello"] and box.received_tcp == 1
        info = json.loads(addr.read_text())
        forged = tmp_path / "forged"
        forged.mkdir()
        (forged / direct.ADDR).write_text(json.dumps({**info, "key": os.urandom(32).hex()}))
        assert not direct.send(str(forged), b"intruder", sender)  # wrong key: refused
        assert list(box.messages) == [b"hello"]
    finally:
        box.close(lambda data: None)
    assert not (tmp_path / direct.ADDR).exists()  # gone with the listener
    assert not direct.send(str(tmp_path), b"late", direct.Net("node-b", "127.0.0.1"))


def test_a_sender_on_the_same_node_keeps_the_unix_socket(tmp_path: Path) -> None:
    box = direct.Mailbox(str(tmp_path), direct.Net("node-a", "127.0.0.1"))
    try:
        assert direct.send(str(tmp_path), b"near", direct.Net("node-a", "127.0.0.1"))
        assert list(box.messages) == [b"near"] and box.received_tcp == 0
    finally:
        box.close(lambda data: None)
