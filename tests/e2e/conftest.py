"""Checks of VMix in a running WebUI (AUTOMATIC1111, Forge, Forge Neo): in the browser, and over the HTTP
API alone (test_e2e_compose.py: no selenium, no browser).  Opt-in: every test here is skipped unless
VMIX_E2E_URL names the WebUI.  See docs/tests.md, "Browser checks".

    VMIX_E2E_URL          the WebUI, e.g. http://127.0.0.1:7860 (started with --api; the extension installed)
    VMIX_E2E_ADAPTER_DIR  its VMix adapter folder (the refresh and damaged-file checks write files there
                          under names containing "vmix_e2e" and remove them; skipped without it)
    VMIX_E2E_LOG          its console log (the "Reload UI" check reads VMix's line there; optional)
    VMIX_E2E_OUT          folder for screenshots and report.txt (default: a new temporary folder)
    VMIX_E2E_CHROMIUM, VMIX_E2E_CHROMEDRIVER   default /usr/bin/chromium, /usr/bin/chromedriver

The browser checks need selenium (requirements-e2e.txt) and a local chromium + chromedriver; nothing
is downloaded.
"""
import os
import shutil
import tempfile

import pytest

URL = os.environ.get("VMIX_E2E_URL", "").rstrip("/")
CHROMIUM = os.environ.get("VMIX_E2E_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("VMIX_E2E_CHROMEDRIVER", "/usr/bin/chromedriver")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1600,1300")


API_ONLY = ("test_e2e_compose.py",)  # checks over the HTTP API alone: no selenium, no browser


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(os.path.abspath(__file__))
    if not URL:
        for item in items:
            if os.path.abspath(str(item.fspath)).startswith(here + os.sep):
                item.add_marker(pytest.mark.skip(reason="WebUI checks are opt-in: set VMIX_E2E_URL to a running WebUI"))
        return
    reason = None
    try:
        import selenium  # noqa: F401
    except ImportError:
        reason = "browser checks need selenium: pip install -r requirements-e2e.txt"
    if reason is None and not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        reason = f"browser checks need {CHROMIUM} and {CHROMEDRIVER} (or VMIX_E2E_CHROMIUM/CHROMEDRIVER)"
    if reason is None:
        return
    for item in items:
        path = os.path.abspath(str(item.fspath))
        if path.startswith(here + os.sep) and os.path.basename(path) not in API_ONLY:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def out_dir():
    folder = os.environ.get("VMIX_E2E_OUT") or tempfile.mkdtemp(prefix="vmix-e2e-")
    os.makedirs(folder, exist_ok=True)
    print(f"\nscreenshots and report: {folder}")
    return folder


@pytest.fixture(scope="session")
def adapter_dir():
    folder = os.environ.get("VMIX_E2E_ADAPTER_DIR")
    if not folder or not os.path.isdir(folder):
        pytest.skip("set VMIX_E2E_ADAPTER_DIR to the WebUI's VMix adapter folder for this check")
    return folder


@pytest.fixture(scope="session")
def driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    profile = tempfile.mkdtemp(prefix="vmix-e2e-profile-")
    options.add_argument(f"--user-data-dir={profile}")
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    browser.set_page_load_timeout(120)
    yield browser
    browser.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="session")
def page(driver, out_dir):
    from e2e_browser import WebUIPage

    ui = WebUIPage(driver, URL, out_dir)
    ui.open()
    yield ui
    ui.write_report()
