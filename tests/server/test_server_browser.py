"""The chat page in a real headless browser (selenium + the system's chromium and chromedriver): load /,
type a message, press Send, and watch the reply stream in, then the tokens/s line; Reset clears it.
Skipped, with the reason, where chromium or chromedriver is not installed (`make setup` installs them)."""

from __future__ import annotations

import shutil

import pytest

for _dep in ("fastapi", "uvicorn", "prometheus_client"):  # the serve extra
    pytest.importorskip(_dep)

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from minicpm4.server import create_app  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip(f"needs chromium and chromedriver on PATH (found browser={CHROMIUM}, driver={CHROMEDRIVER}); "
                    "apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--disable-extensions", "--window-size=1200,900",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    # an explicit driver path: selenium must not try to download one
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page_server(servers):
    return servers.start(create_app(servers.engine(kv_cache_tokens=2048), "minicpm4-page"))


def test_chat_page_streams_a_reply(browser, page_server):
    browser.get(page_server.url + "/")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: "minicpm4-page" in d.find_element(By.ID, "model").text)
    # record every length the reply text takes, to see it arrive in pieces (streamed), not at once
    browser.execute_script("""
        window.__lengths = [];
        new MutationObserver(() => {
          const r = document.querySelector('.msg.assistant:last-child');
          if (r) window.__lengths.push(r.textContent.length);
        }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
    """)
    max_tokens = browser.find_element(By.ID, "max_tokens")
    max_tokens.clear()
    max_tokens.send_keys("48")
    browser.find_element(By.ID, "message").send_keys('What does the word "lantern" mean?')
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant.done"))
    reply = browser.find_element(By.CSS_SELECTOR, ".msg.assistant.done")
    assert reply.text.strip() and "error" not in reply.get_attribute("class")
    lengths = [n for n in browser.execute_script("return window.__lengths") if n > 0]
    assert len(set(lengths)) > 1, f"the reply arrived in one piece: {lengths}"
    wait.until(lambda d: "tokens/s" in d.find_element(By.ID, "stats").text)
    assert browser.find_element(By.CSS_SELECTOR, ".msg.user").text == 'What does the word "lantern" mean?'

    browser.find_element(By.ID, "message").send_keys("And a river?")
    browser.find_element(By.ID, "send").click()  # the second turn carries the first (history kept)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant.done")) == 2)
    assert len(browser.find_elements(By.CSS_SELECTOR, ".msg")) == 4
    browser.find_element(By.ID, "reset").click()
    assert browser.find_elements(By.CSS_SELECTOR, ".msg") == []
