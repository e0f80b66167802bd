"""Shared pytest setup. Markers (pyproject.toml) say what a test needs; tests that need a
real service skip with the reason when it is not there, except in CI (CI=true), where a
missing service is a failure: the suite must not go green by skipping."""

from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


def require(condition: bool, reason: str) -> None:
    """Skip locally, fail in CI, when a real dependency of the test is missing."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI must provide this: {reason}")
    pytest.skip(reason)
