"""Headless Chromium driven by Selenium, for the pages redistill ships.

`open_page` loads a page from disk and reports what a user's browser would show in its console and which
addresses the page asked for, so a test can prove that a page renders offline with no errors. Chromium is
Debian's `chromium` with `chromium-driver`; `make setup` installs them where it can. Without them the browser
tests skip, except where REDISTILL_REQUIRE_BROWSER is set (CI), where they fail.
"""

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# Every host name resolves to nothing, so a page that reaches for a CDN fails loudly instead of waiting.
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND",
    "--window-size=1280,1024",
]


@dataclass
class PageVisit:
    console_errors: list[str]
    requested: list[str]

    @property
    def network_requests(self) -> list[str]:
        """Addresses the page asked for beyond its own file and inlined data."""
        return [
            url
            for url in self.requested
            if not url.startswith(("file:", "data:", "blob:", "about:", "chrome:", "chrome-untrusted:"))
        ]


@pytest.fixture(scope="session")
def chromium(tmp_path_factory) -> Iterator[object]:
    binary, driver_binary = shutil.which("chromium"), shutil.which("chromedriver")
    if not (binary and driver_binary):
        message = "Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("REDISTILL_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_binary), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def open_page(driver, page: Path, ready_script: str = "return document.readyState === 'complete'") -> PageVisit:
    """Load `page` and wait until `ready_script` returns true; the console's errors and every address asked for."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get_log("browser")  # drop what earlier pages left
    driver.get_log("performance")
    driver.get(page.resolve().as_uri())
    WebDriverWait(driver, 60).until(lambda d: d.execute_script(ready_script))
    errors = [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    requested = []
    for entry in driver.get_log("performance"):
        event = json.loads(entry["message"])["message"]
        if event["method"] == "Network.requestWillBeSent":
            requested.append(event["params"]["request"]["url"])
    return PageVisit(console_errors=errors, requested=requested)
