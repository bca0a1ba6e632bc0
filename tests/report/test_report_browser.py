"""The report in a real headless browser (Chromium), when one is installed: every figure decodes to an image with a
natural width, and a screenshot shows the page drawn (not blank, the bar colours present).

CI's fresh machine installs no browser (the README's install command is CI's), so there this test skips and
test_report_html.py's DOM checks are the CI path. Here: `apt-get install -y chromium` (under a minute).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image
from report_rundir import ALL_FIGURES

from crv_ray.report import write_report

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
BROWSER = next((b for b in map(shutil.which, BROWSERS) if b), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason=f"no headless browser installed (looked for {BROWSERS}); "
                                                        "the HTML/DOM checks in test_report_html.py still ran")

# Added to a copy of the page only: the report itself has no scripts. After load, it writes what the browser
# decoded into attributes that --dump-dom prints.
PROBE = """<script>window.addEventListener("load", () => {
  for (const img of document.images) {
    img.setAttribute("data-natural-width", img.naturalWidth);
    img.setAttribute("data-natural-height", img.naturalHeight);
  }
  document.body.setAttribute("data-probe", "loaded");
});</script>"""


def chrome(*args: str) -> subprocess.CompletedProcess:
    # --no-sandbox: Chromium refuses to start as root otherwise (containers).
    return subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args],
                          capture_output=True, text=True, timeout=120)


def test_report_renders_in_headless_browser(run_dir: Path, tmp_path: Path):
    report = write_report(run_dir)
    probe = tmp_path / "probe.html"
    probe.write_text(report.read_text().replace("</body>", PROBE + "</body>"))
    res = chrome("--virtual-time-budget=5000", "--dump-dom", probe.as_uri())
    assert res.returncode == 0, res.stderr[-2000:]
    dom = res.stdout
    assert 'data-probe="loaded"' in dom
    imgs = re.findall(r'<figure id="([^"]+)"><img [^>]*data-natural-width="(\d+)" data-natural-height="(\d+)"', dom)
    assert {fig_id for fig_id, _, _ in imgs} == ALL_FIGURES
    for fig_id, w, h in imgs:
        assert int(w) > 200 and int(h) > 150, (fig_id, w, h)  # decoded, not a broken-image icon (0 x 0)

    shot = tmp_path / "report.png"
    res = chrome("--window-size=1200,2400", f"--screenshot={shot}", report.as_uri())
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    img = Image.open(shot).convert("RGB")
    assert img.size == (1200, 2400)
    colors = img.getcolors(maxcolors=1 << 20)
    non_white = sum(n for n, c in colors if c != (255, 255, 255))
    assert non_white > 0.05 * img.width * img.height  # text, tables and figures drawn
    # The first bar colour of the figures (critic labels, rounds, ...) is on screen: the PNGs were painted.
    assert any(n > 2000 and c == (0x4C, 0x72, 0xB0) for n, c in colors)
