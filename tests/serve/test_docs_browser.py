"""/docs in a real browser inside the loopback namespace (no internet): Debian's
headless Chromium, driven by Selenium through Debian's chromedriver, renders
Swagger UI from the service's own assets and lists every documented operation."""

from __future__ import annotations

import shutil

import httpx
import pytest

pytestmark = pytest.mark.serve

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture
def browser():
    if not (CHROMIUM and DRIVER):
        pytest.fail("Debian's chromium and chromium-driver are missing (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_docs_render_offline_and_list_every_operation(stack, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    spec = httpx.get(f"{stack}/openapi.json", timeout=10).json()
    documented = {(m.upper(), path) for path, ops in spec["paths"].items() for m in ops}
    browser.get(f"{stack}/docs")
    WebDriverWait(browser, 30).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) >= len(documented))
    shown = {(b.find_element(By.CSS_SELECTOR, ".opblock-summary-method").text,
              b.find_element(By.CSS_SELECTOR, ".opblock-summary-path").get_attribute(
                  "data-path"))
             for b in browser.find_elements(By.CSS_SELECTOR, ".opblock")}
    assert shown == documented
    assert ("POST", "/v1/images/generations") in shown
    # Everything the page loaded came from the service itself.
    loaded = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)")
    assert loaded and all(url.startswith(stack) for url in loaded), loaded
