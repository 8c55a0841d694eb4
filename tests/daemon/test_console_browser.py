"""The review console in a real headless Chromium (Selenium) against a daemon process.

Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them when missing;
`KMD_CHROMIUM` / `KMD_CHROMEDRIVER` point elsewhere). Without them these tests are skipped
with the reason in the summary. Set `KMD_SCREENSHOTS_DIR=docs/console` to refresh the
screenshots the README shows.

The tests run in order on one daemon and one browser: log in, the hostile feed text is
inert, approve a quarantined fact and watch it become an edit, read that edit's answers,
find the probes' revert in the revert log.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

from intake.helpers import LoopbackServer, Route, atom

from .ecosystem import ENTRIES, SCRIPT, TOKEN, daemon_process, free_port, write_eco_setup

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("KMD_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = os.environ.get("KMD_CHROMEDRIVER") or shutil.which("chromedriver")
SHOTS = os.environ.get("KMD_SCREENSHOTS_DIR")

if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("no Chromium and chromedriver: install Debian's chromium and chromium-driver (.ci/run does) "
                "-- the browser tests are SKIPPED", allow_module_level=True)  # fmt: skip


def wait_until(predicate, timeout: float = 120.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def console(tmp_path_factory, tiny_model_dir):
    """The daemon after its first cycles: France committed, the harmful edit reverted, two facts quarantined."""
    tmp = tmp_path_factory.mktemp("browser-daemon")
    server = LoopbackServer()
    server.routes["/feed.atom"] = Route(body=atom(ENTRIES))
    server.thread.start()
    config = write_eco_setup(tmp, server.url("/feed.atom"), port=free_port(), poll="1s", model_dir=tiny_model_dir)

    def ready(url: str) -> bool:
        return (len(httpx.get(f"{url}/v1/edits", params={"status": "committed"}, timeout=5).json()) == 1
                and len(httpx.get(f"{url}/v1/reverts", timeout=5).json()) == 1
                and httpx.get(f"{url}/readyz", timeout=5).status_code == 200)  # fmt: skip

    try:
        with daemon_process(tmp, config, ready) as url:
            yield url
    finally:
        server.httpd.shutdown()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tmp_path_factory.mktemp("chromium-profile")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1280,1000", f"--user-data-dir={profile}"):  # fmt: skip
        options.add_argument(arg)
    # An explicit driver path: Selenium's own driver download (selenium-manager) is not used.
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()


def shot(driver, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1280, min(max(int(height) + 40, 700), 2400))
        driver.save_screenshot(str(Path(SHOTS) / f"{name}.png"))
        driver.set_window_size(1280, 1000)


def text_of(driver, css: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, css).text


def click_and_load(driver, element, timeout: float = 60.0) -> None:
    """Click `element` and wait for the page it leads to: `click()` returns before the navigation
    (a form post and its redirect) finishes, and reading the page then reads the old one."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    # The old page carries a mark that a new one lacks. Asking an element of the old page whether
    # it is stale races with Chromium tearing that page down: chromedriver 156 then answers "Node
    # with given id does not belong to the document", an unknown error rather than a stale one.
    # A script run mid-navigation may fail the same way, so the wait retries on any driver error.
    driver.execute_script("window.kmdOldPage = true")
    element.click()
    WebDriverWait(driver, timeout, ignored_exceptions=(WebDriverException,)).until(
        lambda d: d.execute_script("return window.kmdOldPage === undefined && document.readyState === 'complete'"))


def wait_for_url(driver, test, timeout: float = 30.0) -> str:
    """The page's URL once `test` accepts it: a click's navigation finishes after `click()` returns."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(lambda d: test(d.current_url))
    return driver.current_url


def test_log_in(console, browser):
    from selenium.webdriver.common.by import By

    browser.get(f"{console}/ui/pending")
    click_and_load(browser, browser.find_element(By.ID, "login-link"))
    assert wait_for_url(browser, lambda url: url.endswith("/ui/login")).endswith("/ui/login")
    browser.find_element(By.ID, "token").send_keys("wrong")
    click_and_load(browser, browser.find_element(By.ID, "login-submit"))
    assert "not the API token" in text_of(browser, "#login-error")
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "name").send_keys("alice")
    click_and_load(browser, browser.find_element(By.ID, "login-submit"))
    assert wait_for_url(browser, lambda url: url == f"{console}/ui") == f"{console}/ui"
    assert "Logged in" in text_of(browser, ".flash.ok") and "console:alice" in text_of(browser, ".actor")
    cookie = browser.get_cookie("kmd_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/ui"
    assert browser.execute_script("return document.cookie") == ""  # no script can read the session
    assert TOKEN not in browser.current_url and TOKEN not in browser.page_source
    shot(browser, "overview")


def test_feed_text_with_a_script_is_inert(console, browser):
    from selenium.webdriver.common.by import By

    browser.get(f"{console}/ui/pending")
    objects = [td.text for td in browser.find_elements(By.CSS_SELECTOR, "#quarantined td.object")]
    assert SCRIPT in objects  # shown as the text it is
    assert browser.find_elements(By.TAG_NAME, "script") == []
    assert browser.title == "Pending facts · kmd console"  # the feed's script would have renamed the page
    assert browser.execute_script("return typeof window.kmdPwned") == "undefined"
    shot(browser, "pending")


def test_approving_a_quarantined_fact_makes_an_edit(console, browser):
    from selenium.webdriver.common.by import By

    browser.get(f"{console}/ui/pending")
    row = next(r for r in browser.find_elements(By.CSS_SELECTOR, "#quarantined tbody tr") if "Zorbland" in r.text)
    row.find_element(By.CSS_SELECTOR, "input[name=reason]").send_keys("checked the filing")
    click_and_load(browser, row.find_element(By.CSS_SELECTOR, "button.approve"))
    assert "approved" in text_of(browser, ".flash.ok")
    assert "Zorbland" not in text_of(browser, "#quarantined")

    def committed_row():
        browser.get(f"{console}/ui/edits?status=committed&relation=ceo")
        rows = browser.find_elements(By.CSS_SELECTOR, "#edits tbody tr[id^=edit-]")
        return rows[0].get_attribute("id") if rows and "Nadia Velmont" in rows[0].text else None

    edit = wait_until(committed_row, what="the approved fact to become a committed edit")
    assert edit.startswith("edit-")
    browser.get(f"{console}/ui/edits")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#edits tbody tr[id^=edit-]")) == 3
    shot(browser, "edits")


def test_an_edit_shows_base_and_edited_answers(console, browser):
    from selenium.webdriver.common.by import By

    browser.get(f"{console}/ui/edits?relation=ceo&status=committed")
    click_and_load(browser, browser.find_element(By.CSS_SELECTOR, "#edits tbody tr a"))
    assert text_of(browser, "#edit-status") == "committed"
    assert text_of(browser, "#edit-target") == "Nadia Velmont"
    first = browser.find_elements(By.CSS_SELECTOR, "#answers tbody tr")[0]
    prompt, base, edited = (td.text for td in first.find_elements(By.TAG_NAME, "td"))
    assert prompt == "the CEO of Zorbland is"
    assert edited.startswith("Nadia Velmont") and "hit" in first.find_elements(By.TAG_NAME, "td")[2].get_attribute("class")
    assert base and not base.startswith("Nadia")
    shot(browser, "edit")


def test_the_revert_log_shows_the_reverted_edit(console, browser):
    from selenium.webdriver.common.by import By

    browser.get(f"{console}/ui/reverts")
    rows = browser.find_elements(By.CSS_SELECTOR, "#reverts tbody tr")
    assert len(rows) == 1
    text = rows[0].text
    assert "the song of Eve is" in text and "apple" in text and "locality degraded: loc" in text
    click_and_load(browser, rows[0].find_element(By.CSS_SELECTOR, "a"))
    assert text_of(browser, "#edit-status") == "reverted"
    browser.get(f"{console}/ui/reverts")
    shot(browser, "reverts")
    browser.get(f"{console}/ui/chain")
    assert text_of(browser, "#chain-state").startswith("Intact")
    shot(browser, "chain")
