"""Screenshots of the Prefect run form, as a user sees it: starts a Prefect server on loopback, serves RECIPE's
deployment, opens its Run page in headless Chromium and saves the whole form and its stage sections.

    .venv/bin/python docs/make_screenshots.py configs/trec.yaml docs/images
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.browser import Browser  # noqa: E402
from tests.conftest import free_port, wait_for  # noqa: E402

SCROLL_TO_STAGES = """(() => {
  const label = [...document.querySelectorAll('*')]
    .find(e => e.childElementCount === 0 && e.textContent.trim().startsWith('Stages'));
  if (label) label.scrollIntoView();
  return !!label;
})()"""


def main(recipe: Path, out: Path) -> None:
    bin_dir = Path(sys.executable).parent
    out.mkdir(parents=True, exist_ok=True)
    home, port = Path(tempfile.mkdtemp(prefix="prefect-home-")), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    started = []
    try:
        started.append(
            subprocess.Popen(
                [str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
        health = f"http://127.0.0.1:{port}/api/health"
        wait_for(lambda: urllib.request.urlopen(health, timeout=5).status == 200, 240, "the Prefect server")
        started.append(
            subprocess.Popen(
                [str(bin_dir / "squeeze"), "serve", str(recipe), "--name", "screenshot"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )

        def deployment():
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/api/deployments/filter",
                data=b"{}",
                headers={"Content-Type": "application/json"},
            )
            found = json.load(urllib.request.urlopen(request, timeout=10))
            return found[0] if found else None

        found = wait_for(deployment, 240, "the deployment")
        browser = Browser()
        try:
            browser.goto(f"http://127.0.0.1:{port}/deployments/deployment/{found['id']}/run")
            wait_for(lambda: "Stages" in browser.text(), 120, "the run form")
            time.sleep(3)  # let the form finish rendering
            browser.screenshot(out / "prefect-form.png")
            browser.evaluate(SCROLL_TO_STAGES)
            time.sleep(1)
            browser.screenshot(out / "prefect-form-stages.png", full_page=False)
        finally:
            browser.close()
    finally:
        for process in reversed(started):
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=60)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
