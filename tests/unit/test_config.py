from __future__ import annotations

from pathlib import Path

import pytest

from colocate.config import load_config
from colocate.errors import ConfigError
from colocate.units import parse_duration, parse_size


def test_defaults_without_a_file() -> None:
    config = load_config(None, env={})
    assert config.broker.listen == "127.0.0.1:8642"
    assert config.prices.core_hour == pytest.approx(0.015)
    assert config.policy.limits.guard is True


def test_file_values_and_env_override(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[agent]\ninterval_s = 2.5\n[prices]\ncurrency = "CHF"\n')
    config = load_config(path, env={"COLOCATE_AGENT__INTERVAL_S": "4", "UNRELATED": "x"})
    assert config.agent.interval_s == 4.0
    assert config.prices.currency == "CHF"


def test_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[agent]\nintervall_s = 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert str(path) in str(err.value)
    assert "agent.intervall_s" in str(err.value)


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[agent\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad, env={})
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.toml", env={})


def test_out_of_range_value_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[policy.limits]\nmax_function_share = 1.5\n")
    with pytest.raises(ConfigError, match=r"policy\.limits\.max_function_share"):
        load_config(path, env={})


@pytest.mark.parametrize(
    ("text", "expected"),
    [("512MiB", 512 * 1024**2), ("1G", 1024**3), ("1GB", 10**9), ("4096", 4096), (7, 7)],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"), [("5m", 300.0), ("250ms", 0.25), ("2h", 7200.0), (3, 3.0)]
)
def test_parse_duration(text: str | int, expected: float) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["lots", "5 parsecs", "-1"])
def test_bad_sizes_and_durations_say_how_to_write_them(text: str) -> None:
    with pytest.raises(ConfigError, match="write it like"):
        parse_size(text)
    with pytest.raises(ConfigError, match="write it like"):
        parse_duration(text)
