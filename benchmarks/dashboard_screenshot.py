"""The README's screenshot of the live dashboard: docs/dashboard.png.

A 3-client deployment on 127.0.0.1 (synthetic data, logistic regression), one more client with a
wrong secret (so the refusals log has a line), and headless Chromium (Debian's `chromium`) over
its DevTools pipe, as the tests drive it:

    .venv/bin/python benchmarks/dashboard_screenshot.py [OUT.png]
"""

import base64
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "network"))

from browser import CHROMIUM, Browser  # noqa: E402
from cluster import BASE, Cluster  # noqa: E402


def main(out: Path) -> None:
    if CHROMIUM is None:
        sys.exit("no chromium binary: apt-get install chromium")
    with tempfile.TemporaryDirectory() as folder:
        cluster = Cluster(Path(folder))
        browser = None
        try:
            server, port = cluster.server(
                "--insecure",
                "--min-clients",
                "3",
                "--dashboard",
                "0",
                "--rounds",
                "40",
                "--local-epochs",
                "40",
                *BASE,
                name="screenshot",
            )
            url = server.wait_for(r"dashboard at (\S+)").group(1)
            for i in range(3):
                cluster.client(i, port)
            cluster.client(2, port, token="client-3.token", name="wrong-secret")
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                state = json.loads(urllib.request.urlopen(url + "api/state").read())
                if len(state["rounds"]) > 12:
                    break
                time.sleep(0.2)
            browser = Browser(Path(folder) / "profile", "--window-size=1200,900", "--hide-scrollbars")
            browser.open(url)
            time.sleep(2.5)  # two polls: the page drawn, and one update without a reload
            png = base64.b64decode(browser.send("Page.captureScreenshot", {"format": "png"})["data"])
            out.write_bytes(png)
            print(f"{out}: {len(png)} bytes, at round {state['rounds'][-1]['round']}")
        finally:
            if browser is not None:
                browser.close()
            cluster.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "dashboard.png")
