"""Shared test settings.

Integration tests that need a real service (SLURM, an MLflow server, KenLM binaries) call
`require(condition, reason)`: on a developer machine without the service they skip with the
reason; in CI (`CI=true`) the same condition is a failure, so a missing part is never hidden.
"""

from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


def require(condition: bool, reason: str) -> None:
    """Skip (developer machine) or fail (CI) when `condition` is false."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def _audio_header_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Training checks audio headers through a cache in the user's cache directory: keep it in tmp."""
    monkeypatch.setenv("REPRO_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "repro_cache"))
