"""One reading of listen addresses for every server (broker, agent API, metrics), and the
unit constants."""

from __future__ import annotations

import pytest

from colocate import units
from colocate.broker.service import parse_listen as broker_listen
from colocate.errors import ConfigError
from colocate.metrics.exposition import parse_listen as metrics_listen


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8642", ("127.0.0.1", 8642)),
        (":9642", ("0.0.0.0", 9642)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("[::]:9642", ("::", 9642)),
        ("[::1]:8000", ("::1", 8000)),
        (" node1:80 ", ("node1", 80)),
    ],
)
def test_every_server_reads_a_listen_address_the_same_way(
    text: str, expected: tuple[str, int]
) -> None:
    assert units.parse_listen(text) == expected
    assert broker_listen(text, 8642) == expected
    assert metrics_listen(text) == expected


def test_a_bare_host_takes_the_default_port_where_there_is_one() -> None:
    assert broker_listen("node1", 8642) == ("node1", 8642)
    assert broker_listen("[::1]", 8642) == ("::1", 8642)
    with pytest.raises(ConfigError, match=r"agent\.metrics_listen: .*'node1' has no port"):
        metrics_listen("node1")


@pytest.mark.parametrize("text", ["127.0.0.1:http", "127.0.0.1:70000", "host:-1", "a:"])
def test_an_unreadable_address_says_how_to_write_it(text: str) -> None:
    with pytest.raises(ConfigError, match=r"write it like 127\.0\.0\.1:8642 \(HOST:PORT"):
        units.parse_listen(text, 8642, key="broker.listen")


def test_binary_units() -> None:
    assert (units.KIB, units.MIB, units.GIB) == (1024, 1024**2, 1024**3)
    assert units.parse_size("2GiB") == 2 * units.GIB
