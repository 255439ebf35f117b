"""Headless Debian Chromium driven by Selenium, and where screenshots go.

Without a browser the browser tests skip, unless NEURON_ATLAS_REQUIRE_BROWSER is set (CI sets it),
so a missing install is a failure there rather than a silent pass."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The machine's network is closed: without the background-networking flags Chromium spends its
# start-up on refused connections and failed lookups of Google's hosts.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,1000",
)


def artifacts_dir() -> Path:
    """Screenshots are kept as test artifacts: $NEURON_ATLAS_ARTIFACTS, else test-artifacts/."""
    path = Path(os.environ.get("NEURON_ATLAS_ARTIFACTS") or ROOT / "test-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _binaries() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@contextmanager
def chromium() -> Iterator[object]:
    """A fresh headless Chromium (own empty profile) as a Selenium WebDriver."""
    found = _binaries()
    if found is None:
        message = "headless Chromium/chromedriver not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("NEURON_ATLAS_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for flag in FLAGS:
        options.add_argument(flag)
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        options.add_argument(f"--user-data-dir={profile}")
        driver = webdriver.Chrome(options=options, service=Service(executable_path=found[1]))
        try:
            driver.set_page_load_timeout(120)
            yield driver
        finally:
            driver.quit()
