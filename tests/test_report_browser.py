"""The report page in a real browser (headless Chromium): every image decodes, nothing logs an error.

The page has no JavaScript, so the test loads a copy with two test-only probe
scripts: the first (top of <head>) turns every `error` event, a resource that
failed to load included, into a console.error; the second, on load, writes the
images' naturalWidth, those errors and the page height into an attribute of
<html>, which `--dump-dom` returns. Why the probe: the headless shell prints
console messages on stderr (`--enable-logging=stderr --v=0`) as
`INFO:CONSOLE:<line>] "<message>", source: <url> (<line>)`, with no level, and
prints nothing at all for a failed resource load (`net::ERR_FILE_NOT_FOUND`).
A page without scripts logs nothing, so any CONSOLE line is an error.

A screenshot of the whole page is saved in the test's tmp dir and, when set,
at $REPORT_SCREENSHOT.
"""

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from report_fixtures import write_report_run

from ensemble.report import cli

BROWSERS = ("chromium-headless-shell", "chrome-headless-shell", "chromium-headless", "chromium")
INSTALL = "apt-get install chromium-headless-shell"

PROBE_HEAD = """<script>/* test-only probe */
window.__errors = [];
addEventListener("error", (e) => {
  const src = e.target && e.target.src;
  const what = src ? "failed to load " + (src.startsWith("data:") ? src.slice(0, 30) + "..." : src) : String(e.message);
  __errors.push(what);
  console.error("report probe: " + what);
}, true);
</script>"""
PROBE_END = """<script>/* test-only probe */
addEventListener("load", () => document.documentElement.setAttribute("data-probe", JSON.stringify({
  widths: Array.from(document.images, (img) => img.naturalWidth),
  errors: window.__errors,
  height: document.documentElement.scrollHeight})));
</script>"""


def find_browser() -> str:
    for name in BROWSERS:
        if shutil.which(name):
            return shutil.which(name)
    for path in ("/usr/lib/chromium/chrome-headless-shell", "/usr/lib/chromium/chromium-headless-shell"):
        if os.access(path, os.X_OK):
            return path
    message = f"no headless Chromium ({', '.join(BROWSERS)}) on PATH; install it: {INSTALL}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def chromium(browser: str, url: str, *flags: str) -> subprocess.CompletedProcess:
    sandbox = ["--no-sandbox"] if os.geteuid() == 0 else []  # Chromium's sandbox refuses to run as root
    headless = ["--headless"] if not Path(browser).name.endswith("shell") else []  # the shell is always headless
    return subprocess.run([browser, *headless, *sandbox, "--disable-gpu", "--hide-scrollbars", "--no-first-run",
                           "--virtual-time-budget=5000", *flags, url], capture_output=True, text=True, timeout=120,
                          check=False)


def probe(browser: str, page: Path) -> dict:
    """Load a probed copy of `page`: {'widths', 'errors', 'height', 'console'} (console: stderr CONSOLE lines)."""
    text = page.read_text()
    probed = page.with_name(f"probe-{page.name}")
    probed.write_text(text.replace("<head>", "<head>\n" + PROBE_HEAD, 1).replace("</body>", PROBE_END + "</body>", 1))
    proc = chromium(browser, probed.as_uri(), "--enable-logging=stderr", "--v=0", "--dump-dom")
    probed.unlink()
    found = re.search(r'data-probe="([^"]*)"', proc.stdout)
    assert found, f"the probe did not run (exit {proc.returncode}): {proc.stderr[-2000:]}"
    result = json.loads(html.unescape(found.group(1)))
    result["console"] = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return result


def screenshot(browser: str, page: Path, height: int, out: Path) -> None:
    proc = chromium(browser, page.as_uri(), f"--screenshot={out}", f"--window-size=1280,{height}")
    assert out.exists(), proc.stderr[-2000:]


@pytest.fixture(scope="module")
def report_page(tmp_path_factory):
    run = write_report_run(tmp_path_factory.mktemp("browser") / "run")
    assert cli.main(["--run", str(run)]) == 0
    return run / "report" / "index.html"


def test_report_page_renders_without_errors(report_page, tmp_path):
    browser = find_browser()
    page = Path(shutil.copytree(report_page.parent, tmp_path / "report")) / "index.html"
    result = probe(browser, page)
    n_images = page.read_text().count("<img ")
    assert len(result["widths"]) == n_images >= 8
    assert all(width > 0 for width in result["widths"]), result["widths"]  # every image decoded
    assert result["errors"] == [] and result["console"] == []
    shot = tmp_path / "report.png"
    screenshot(browser, page, result["height"] + 40, shot)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("REPORT_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["REPORT_SCREENSHOT"])


def test_probe_catches_a_broken_image(report_page, tmp_path):
    """The detector itself: a corrupt embedded image and a missing file must both be reported."""
    browser = find_browser()
    page = tmp_path / "index.html"
    text = report_page.read_text()
    broken = re.sub(r'src="data:image/png;base64,[^"]{40}', 'src="data:image/png;base64,AAAA', text, count=1)
    broken = broken.replace("</body>", '<img src="missing.png" alt="missing"></body>', 1)
    page.write_text(broken)
    result = probe(browser, page)
    assert result["widths"][0] == 0 and result["widths"][-1] == 0 and all(w > 0 for w in result["widths"][1:-1])
    assert len(result["errors"]) == 2 and any("missing.png" in e for e in result["errors"])
    assert len(result["console"]) == 2 and all("report probe: failed to load" in line for line in result["console"])
