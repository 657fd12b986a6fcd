"""Checks the built documentation site in headless Chromium, as a reader would see it.

Serves ``docs/_build/html`` on localhost, opens the landing page, an API page with math and a
notebook page with a plot, and checks on each: the math is rendered by MathJax (its output
elements are present and no raw ``\\(``, ``\\[``, ``$$`` or ``$...$`` is left in the text outside
code), every image has loaded (``naturalWidth > 0``), and the browser console has no error. Exits
with status 1 and the list of problems otherwise.

Needs Debian's ``chromium`` and ``chromium-driver`` and ``selenium`` (the ``docs`` extra)::

    apt-get install -y chromium chromium-driver
    python -m sphinx -W --keep-going -b html docs docs/_build/html
    python scripts/check_site.py [--html docs/_build/html] [--screenshots DIR]
"""

from __future__ import annotations

import argparse
import functools
import http.server
import shutil
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: (page, needs math, needs an image): the landing page, an API page, a notebook with plots.
PAGES = (
    ("index.html", False, False),
    ("api/curvjax.html", True, False),
    ("notebooks/hessian_spectrum.html", False, True),
)

#: Text nodes outside code, scripts and MathJax's output that still hold TeX delimiters.
RAW_MATH_JS = r"""
const skip = new Set(["PRE", "CODE", "SCRIPT", "STYLE", "TEXTAREA", "MJX-CONTAINER"]);
const pattern = /\\\(|\\\[|\$\$|\$[^\s$][^$]*[^\s$\\]\$/;
const found = [];
const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
for (let node = walker.nextNode(); node; node = walker.nextNode()) {
  let parent = node.parentElement, inside = false;
  for (; parent; parent = parent.parentElement) {
    if (skip.has(parent.tagName) || parent.classList.contains("highlight")) { inside = true; break; }
  }
  if (!inside && pattern.test(node.textContent)) found.push(node.textContent.trim().slice(0, 80));
}
return found;
"""

#: Waits for MathJax to finish typesetting (if the page loads it), then returns.
MATHJAX_READY_JS = """
const done = arguments[arguments.length - 1];
if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
  MathJax.startup.promise.then(() => done(true), () => done(false));
} else {
  done(null);
}
"""

IMAGES_JS = """
return Array.from(document.images).map(
  (img) => [img.getAttribute("src"), img.complete, img.naturalWidth]);
"""


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


def serve(directory: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """Serves ``directory`` on a free localhost port in a daemon thread; returns the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def browser():
    """Headless Chromium driven by Debian's chromedriver, with the console log kept."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        raise SystemExit(
            "check_site: chromium and chromedriver are needed: "
            "apt-get install -y chromium chromium-driver"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,2000",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(driver_path))


def check_page(driver, url: str, needs_math: bool, needs_image: bool) -> list[str]:
    """The problems found on one page (an empty list when it is fine)."""
    problems = []
    driver.get(url)
    deadline = time.monotonic() + 30
    while driver.execute_script("return document.readyState") != "complete":
        if time.monotonic() > deadline:
            return [f"{url}: did not finish loading in 30 s"]
        time.sleep(0.1)
    driver.set_script_timeout(30)
    typeset = driver.execute_async_script(MATHJAX_READY_JS)
    rendered = driver.execute_script("return document.querySelectorAll('mjx-container').length")
    if needs_math and not rendered:
        problems.append(f"{url}: no rendered math (MathJax loaded: {typeset is not None})")
    if typeset is False:
        problems.append(f"{url}: MathJax failed while typesetting")
    errors = driver.execute_script(
        "return document.querySelectorAll('mjx-merror, .MathJax_Error').length"
    )
    if errors:
        problems.append(f"{url}: {errors} math expression(s) with TeX errors")
    for text in driver.execute_script(RAW_MATH_JS):
        problems.append(f"{url}: raw TeX left in the text: {text!r}")
    images = driver.execute_script(IMAGES_JS)
    for src, complete, width in images:
        if not complete or not width:
            problems.append(f"{url}: image not loaded: {src}")
    if needs_image and not images:
        problems.append(f"{url}: no image on a page that should show a plot")
    for entry in driver.get_log("browser"):
        if entry.get("level") == "SEVERE":
            problems.append(f"{url}: console error: {entry.get('message')}")
    print(
        f"{url}: {rendered} math elements, {len(images)} images, "
        f"{sum(1 for _, c, w in images if c and w)} loaded"
    )
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--html", type=Path, default=ROOT / "docs" / "_build" / "html")
    parser.add_argument("--screenshots", type=Path, help="save a screenshot of each page here")
    args = parser.parse_args(argv)
    missing = [page for page, *_ in PAGES if not (args.html / page).exists()]
    if missing:
        print(f"check_site: not built: {', '.join(missing)} under {args.html}")
        return 1
    server, base = serve(args.html)
    driver = browser()
    problems = []
    try:
        for page, needs_math, needs_image in PAGES:
            problems += check_page(driver, base + page, needs_math, needs_image)
            if args.screenshots:
                args.screenshots.mkdir(parents=True, exist_ok=True)
                driver.save_screenshot(str(args.screenshots / (page.replace("/", "_") + ".png")))
    finally:
        driver.quit()
        server.shutdown()
    for problem in problems:
        print(problem)
    print(f"check_site: {len(PAGES)} pages, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
