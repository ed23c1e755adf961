"""The README's screenshot of the chat page: serves a model, asks the page questions in headless
Chromium (greedy), waits for each streamed reply, and saves the page.

    python benchmarks/serve_page_screenshot.py --model DIR_OR_SPEC [--name ID] [--out docs/serve_page.png]

Needs Debian's chromium and chromium-driver (as the page test does).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from serve_load import free_port, start_server

QUESTIONS = ["What is 12 + 30? Answer in one sentence.", "And twice that?"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--name", help="the model id the page shows (default: --model)")
    parser.add_argument("--out", default="docs/serve_page.png")
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    port = free_port()
    server = start_server(args.model, port, 1, 4, Path(tempfile.mkdtemp()) / "server.log", args.name)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,760"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")), options=options)
    try:
        wait = WebDriverWait(driver, 600)
        driver.get(f"http://127.0.0.1:{port}/")
        wait.until(ready.text_to_be_present_in_element((By.ID, "model-name"), args.name or args.model))
        driver.find_element(By.ID, "max-tokens").send_keys(str(args.max_tokens))
        for turn, question in enumerate(QUESTIONS):
            driver.find_element(By.ID, "prompt").send_keys(question)
            driver.find_element(By.ID, "send").click()
            done = f".message.assistant:nth-of-type({2 * turn + 2})[data-done='true']"
            wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, done)))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(args.out)
        print(f"saved {args.out}")
    finally:
        driver.quit()
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
