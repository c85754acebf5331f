"""
Run on the operator's machine of the acceptance cluster (its network namespace), by
test_10_install.py: a headless Chromium opens the web console at C{URL} over TLS, trusting
the control plane's certificate by its key alone (C{--ignore-certificate-errors-spki-list}:
the browser has no way to be given the cluster's CA file), logs in with the operator token,
waits until the page is live and shows C{HOSTS} hosts ready, and prints one JSON line: the
page's URL, role and connection line (C{live}: its WAMP session over C{wss://} is up), each
host row's id and state, and the browser's severe log entries.  Exit 1 with a line on
stderr if the page never becomes ready.

    python console_page.py URL TOKEN_FILE SPKI_SHA256_B64 HOSTS SCREENSHOT
"""

import json
import shutil
import sys
import tempfile
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

READY = """
const rows = [...document.querySelectorAll('#hosts-table tr[data-host]')];
return document.body.dataset.ready === 'yes'
  && rows.length === arguments[0] && rows.every((r) => r.dataset.state === 'ready');
"""


def main(url, token_file, spki, hosts, shot):
    with open(token_file) as f:
        token = f.read().strip()
    profile = tempfile.mkdtemp(prefix="zwrm-console-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1440,900", "--no-first-run", "--disable-extensions",
                "--disable-background-networking", "--disable-sync",
                "--disable-component-update", f"--user-data-dir={profile}",
                f"--ignore-certificate-errors-spki-list={spki}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(60)
        driver.get(url)
        deadline = time.monotonic() + 90
        while not driver.execute_script("return !!document.getElementById('login')"):
            if time.monotonic() > deadline:
                raise SystemExit("console_page: no login form at " + url)
            time.sleep(0.25)
        driver.execute_script(
            "document.getElementById('token').value = arguments[0];"
            " document.getElementById('login').requestSubmit();", token)
        while not driver.execute_script(READY, hosts):
            if time.monotonic() > deadline:
                driver.save_screenshot(shot)
                raise SystemExit("console_page: the console did not show "
                                 f"{hosts} ready hosts within 90 s (screenshot {shot})")
            time.sleep(0.25)
        driver.save_screenshot(shot)
        page = driver.execute_script(
            "return {role: document.body.dataset.role,"
            " conn: document.getElementById('conn').textContent,"
            " page: location.href,"
            " hosts: [...document.querySelectorAll('#hosts-table tr[data-host]')]"
            "   .map((r) => [r.dataset.host, r.dataset.state])}")
        page["severe"] = [e["message"] for e in driver.get_log("browser")
                          if e["level"] == "SEVERE"]
        print(json.dumps(page))
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
