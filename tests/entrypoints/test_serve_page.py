"""The chat page at `/`, in a real headless Chromium (Debian's chromium + chromium-driver, via selenium).

Skipped where no Chromium is installed, except when LLM_MODULES_REQUIRE_BROWSER=1 (CI sets it:
`.ci/run` installs both packages). LLM_MODULES_SCREENSHOT=PATH saves a screenshot of the page.
"""

from __future__ import annotations

import os
import shutil

import httpx
import pytest

from ..helpers import ServerThread, save_tiny_composed

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


def browser():
    if not (BROWSER and DRIVER):
        if os.environ.get("LLM_MODULES_REQUIRE_BROWSER") == "1":
            pytest.fail("LLM_MODULES_REQUIRE_BROWSER=1 but chromium or chromedriver is not installed "
                        "(apt-get install chromium chromium-driver)")
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1000,720"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)


def api_reply(url: str, messages: list[dict[str, str]]) -> str:
    body = {"messages": messages, "temperature": 0}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()["choices"][0]["message"]["content"]


@pytest.mark.browser
def test_the_page_streams_replies_keeps_the_conversation_and_shows_model_and_speed(tiny_pair_with_tokenizer, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    model = save_tiny_composed(tiny_pair_with_tokenizer, tmp_path / "model")
    driver = browser()
    try:
        with ServerThread(model, max_tokens=24) as server:
            wait = WebDriverWait(driver, 60)
            driver.get(server.url + "/")
            wait.until(ready.text_to_be_present_in_element((By.ID, "model-name"), "model"))
            conversation = []
            for turn, text in enumerate(["Hello, who are you?", "Tell me more."]):
                driver.find_element(By.ID, "prompt").send_keys(text)
                driver.find_element(By.ID, "send").click()
                done = (By.CSS_SELECTOR, f".message.assistant:nth-of-type({2 * turn + 2})[data-done='true']")
                reply = wait.until(ready.presence_of_element_located(done))
                shown = reply.find_element(By.CLASS_NAME, "content").get_attribute("textContent")
                # the page sends the whole conversation (temperature 0): its reply is the API's greedy one
                conversation.append({"role": "user", "content": text})
                assert shown and shown == api_reply(server.url, conversation), shown
                conversation.append({"role": "assistant", "content": shown})
                assert reply.get_attribute("data-finish-reason") == "length"
            speed = driver.find_element(By.ID, "speed").text
            assert "24 tokens" in speed and "tokens/s" in speed, speed
            users = [e.get_attribute("textContent") for e in driver.find_elements(By.CSS_SELECTOR, ".message.user .content")]
            assert users == ["Hello, who are you?", "Tell me more."]
            if os.environ.get("LLM_MODULES_SCREENSHOT"):
                driver.save_screenshot(os.environ["LLM_MODULES_SCREENSHOT"])
    finally:
        driver.quit()


def test_the_page_asks_for_the_api_key_when_the_server_has_one(tiny_pair_with_tokenizer, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    model = save_tiny_composed(tiny_pair_with_tokenizer, tmp_path / "model")
    driver = browser()
    try:
        with ServerThread(model, max_tokens=8, api_key="page-key") as server:
            wait = WebDriverWait(driver, 60)
            driver.get(server.url + "/")
            wait.until(ready.visibility_of_element_located((By.ID, "api-key")))
            assert driver.find_element(By.ID, "model-name").text == "…"  # nothing read without the key
            driver.find_element(By.ID, "api-key").send_keys("wrong")
            driver.find_element(By.ID, "key-save").click()
            wait.until(ready.text_to_be_present_in_element((By.ID, "key-note"), "refused"))
            driver.find_element(By.ID, "api-key").send_keys("page-key")
            driver.find_element(By.ID, "key-save").click()
            wait.until(ready.text_to_be_present_in_element((By.ID, "model-name"), "model"))
            assert not driver.find_element(By.ID, "key-form").is_displayed()
            driver.find_element(By.ID, "prompt").send_keys("Hello?")
            driver.find_element(By.ID, "send").click()
            done = (By.CSS_SELECTOR, ".message.assistant[data-done='true']")
            reply = wait.until(ready.presence_of_element_located(done))
            assert reply.find_element(By.CLASS_NAME, "content").get_attribute("textContent")
            assert reply.get_attribute("data-finish-reason") == "length"
    finally:
        driver.quit()
