"""A serverless process whose state outlives its leases.

Run against a broker with an agent (``colocate broker`` and ``colocate agent --standalone``):

    COLOCATE_PROCESS_STORE=/var/tmp/processes python examples/process_counter.py http://127.0.0.1:8642

(the store root made once with ``install -d -m 1733 /var/tmp/processes``). Run it twice: the
second run continues the count from the store, on a new lease.
"""

from __future__ import annotations

import sys
from typing import Any

from colocate import Client


def count(state: Any, word: str) -> int:
    counts = state.setdefault("counts", {})
    counts[word] = counts.get(word, 0) + 1
    return int(counts[word])


def main() -> None:
    url = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8642"
    with Client(url).process("word-counter", memory="256MiB") as proc:
        for word in [
            "the",
            "quick",
            "brown",
            "fox",
            "jumps",
            "over",
            "the",
            "lazy",
            "dog",
            "the",
            "end",
        ]:
            proc.invoke(count, word)
        print("'the' seen", proc.invoke(lambda state: state["counts"]["the"]), "times so far")
        print(proc.stats())


if __name__ == "__main__":
    main()
