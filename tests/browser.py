"""A real browser for the console's tests: Debian's headless Chromium driven by Selenium.

The browser and its driver are the distribution's (/usr/bin/chromium, /usr/bin/chromedriver:
`scripts/setup.sh test` installs them); the driver's path is given to Selenium, so Selenium
Manager never runs (it would try to download a driver: there is no network here). Starting
Chromium costs about a second, a new session on it nothing: a test module starts one browser
(`chromium()` in a module-scoped fixture) and logs in and out on it (`Console`).

Screenshots are test artifacts: under $TEST_ARTIFACTS (scripts/test.sh sets it to
build/test-artifacts, kept whether the run passes or not), else <basetemp>/artifacts.
"""

from __future__ import annotations

import base64
import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WINDOW = (1280, 900)
ARTIFACTS_ENV = "TEST_ARTIFACTS"
# Not APPLIANCE_*: every CLI a test starts would read it as a setting (and refuse it).
_ARTIFACTS = os.environ.get(ARTIFACTS_ENV)
# Chromium phones home (updates, safe browsing, field trials) unless told not to: nothing may
# leave the machine, and each attempt would cost a timeout on a host without a network.
_FLAGS = (
    "--headless=new",
    f"--window-size={WINDOW[0]},{WINDOW[1]}",
    "--disable-dev-shm-usage",  # containers' /dev/shm is 64 MB
    "--disable-gpu",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-extensions",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-features=Translate,OptimizationHints,MediaRouter",
    "--password-store=basic",
)
T = TypeVar("T")


def browser_skip_reason() -> str | None:
    """Why no browser test can run here, or None."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} is missing: `scripts/setup.sh test` installs chromium, chromium-driver"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (the test extra)"
    return None


def skip_without_browser(allow_module_level: bool = False) -> None:
    """Skip when no browser test can run here; under CI (the variable set) fail instead: the
    README's test command installs the browser, so a missing one never hides these tests."""
    why = browser_skip_reason()
    if why is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI is set and the browser tests cannot run: {why}", pytrace=False)
    pytest.skip(why, allow_module_level=allow_module_level)


def artifacts_dir(config: pytest.Config, module: str) -> Path:
    """Where a module's screenshots go (made if missing)."""
    basetemp = config._tmp_path_factory.getbasetemp()  # type: ignore[attr-defined]
    path = (Path(_ARTIFACTS) if _ARTIFACTS else basetemp / "artifacts") / module
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def chromium(log: Path) -> Iterator[Any]:
    """A headless Chromium WebDriver; the driver's log goes to `log`."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in _FLAGS:
        options.add_argument(flag)
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")  # Chromium's own sandbox refuses to run as root
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(log))
    driver = webdriver.Chrome(service=service, options=options)
    try:
        yield driver
    finally:
        driver.quit()


@dataclass
class Console:
    """The console at `base_url` ("http://127.0.0.1:PORT") in one browser."""

    driver: Any
    base_url: str
    shots: Path
    timeout: float = 10.0

    def url(self, path: str) -> str:
        return self.base_url.rstrip("/") + path

    def open(self, path: str) -> None:
        self.driver.get(self.url(path))

    @property
    def path(self) -> str:
        """The current page's path (no query)."""
        current: str = self.driver.current_url
        return "/" + current.split("://", 1)[-1].split("/", 1)[-1].split("?", 1)[0].split("#")[0]

    def login(self, token: str) -> None:
        """Log in through the login form and wait until the console left it."""
        self.logout()
        self.open("/login")
        field = self.wait_for("input[name=token]")
        field.send_keys(token)
        field.submit()
        self.until("the console to leave /login", lambda d: self.path != "/login")

    def logout(self) -> None:
        """Forget the session (the cookie; the server's session simply idles out)."""
        self.open("/login")
        self.driver.delete_all_cookies()

    def css(self, selector: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return list(self.driver.find_elements(By.CSS_SELECTOR, selector))

    def wait_for(self, selector: str, timeout: float | None = None) -> Any:
        """The first visible element matching `selector`, within `timeout` s."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as ec

        locator = (By.CSS_SELECTOR, selector)
        return self.until(
            f"a visible {selector!r}", ec.visibility_of_element_located(locator), timeout
        )

    def until(
        self, what: str, condition: Callable[[Any], T | bool | None], timeout: float | None = None
    ) -> T:
        """`condition(driver)`'s first truthy value (WebDriverWait); a screenshot on timeout."""
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        wait = WebDriverWait(self.driver, timeout or self.timeout, poll_frequency=0.05)
        try:
            return wait.until(condition)  # type: ignore[arg-type]
        except TimeoutException:
            shot = self.screenshot(f"timeout-{int(time.time() * 1000)}")
            raise AssertionError(
                f"not within {timeout or self.timeout:g} s: {what} (on {self.driver.current_url}; "
                f"screenshot {shot})"
            ) from None

    def click(self, selector: str, timeout: float | None = None) -> None:
        """Click the first visible match, found afresh: a page's live refresh may swap the
        element between finding and clicking it (a stale element is looked up again)."""
        from selenium.common.exceptions import StaleElementReferenceException

        def clicked(driver: Any) -> bool:
            try:
                found = [e for e in self.css(selector) if e.is_displayed()]
                if found:
                    found[0].click()
                    return True
            except StaleElementReferenceException:
                pass
            return False

        self.until(f"a visible {selector!r} to click", clicked, timeout)

    def text(self, selector: str) -> str | None:
        """The first match's rendered text, read in one step in the page (never stale)."""
        return self.driver.execute_script(
            "const e = document.querySelector(arguments[0]); return e ? e.innerText : null;",
            selector,
        )

    def cookie(self, name: str) -> str | None:
        found = self.driver.get_cookie(name)
        return found["value"] if found else None

    def screenshot(self, name: str) -> Path:
        """The whole page, beyond the window too, as <artifacts>/<module>/<name>.png."""
        path = self.shots / f"{name}.png"
        shot = self.driver.execute_cdp_cmd(
            "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}
        )
        path.write_bytes(base64.b64decode(shot["data"]))
        return path
