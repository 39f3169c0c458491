"""First contact with the dashboard, timed end to end: server start -> page -> Run with the defaults -> result.

    python benchmarks/first_contact.py [--cache DIR] [--port 7861]

Starts ``app.py`` as a new user would after ``make install`` (so the public warm start is in the cache, unless
``--cache`` points at an empty folder), opens it in Debian's headless Chromium, presses Run with every default,
and prints the seconds after start at which the server answered, the result appeared and its non-private
reference (measured on first use) followed. Needs the test extras (playwright) and /usr/bin/chromium.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]


def wait_for_server(url: str, proc: subprocess.Popen, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app.py exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:   # not listening yet (refused, reset): expected while it starts; the deadline bounds it
            time.sleep(0.3)
    raise RuntimeError(f"app.py did not answer on {url} within {timeout_s:.0f} s")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", help="DUALPRIV_CACHE for the server (default: the user's cache)")
    parser.add_argument("--port", type=int, default=7861)
    args = parser.parse_args(argv)
    from playwright.sync_api import expect, sync_playwright

    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    if args.cache:
        env["DUALPRIV_CACHE"] = str(Path(args.cache).resolve())
    url = f"http://127.0.0.1:{args.port}/"
    events = {}
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(args.port)], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_server(url, proc)
        events["server answers"] = time.monotonic() - started
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.wait_for_selector("#ft-run")
            page.locator("#ft-run").click()
            events["Run pressed (defaults)"] = time.monotonic() - started
            expect(page.locator("#ft-result")).to_contain_text("accuracy", timeout=900_000)
            events["first result shown"] = time.monotonic() - started
            result = " ".join(page.locator("#ft-result").inner_text().split())[:300]
            expect(page.locator("#ft-verdict")).to_contain_text("Non-private reference, same", timeout=900_000)
            events["its non-private reference shown"] = time.monotonic() - started
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print("| event | seconds after start |\n|---|---|")
    for name, seconds in events.items():
        print(f"| {name} | {seconds:.1f} |")
    print(f"result line: {result}")
    print(f"load average at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
