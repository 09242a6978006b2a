"""A missing browser skips the browser tests on a workstation, but fails them under CI: the
README's test command installs Chromium, so its absence there is a broken setup, never a
reason for the required browser tests to vanish from the run."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import browser


def test_a_missing_browser_fails_under_ci_and_skips_elsewhere(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(browser, "CHROMIUM", tmp_path / "no-chromium")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"CI is set.*no-chromium"):
        browser.skip_without_browser(allow_module_level=True)
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="no-chromium"):
        browser.skip_without_browser(allow_module_level=True)
