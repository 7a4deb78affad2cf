"""The Prefect dashboard in a real browser (issue 18): after a smoke study against a
`prefect server` on loopback, headless Chromium (from the OS packages) opens the report's
markdown artifact; every figure must have decoded (`make test-browser`; the screenshot is
kept in the test's tmp_path)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.browser
ROOT = Path(__file__).resolve().parents[2]
FIGURE = "data:image/png;base64,"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, seconds: float) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {seconds} s")


class Browser:
    """Headless Chromium driven through the DevTools protocol (no driver package needed)."""

    def __init__(self, width: int = 1400, height: int = 2400):
        from websockets.sync.client import connect

        exe = shutil.which("chromium") or shutil.which("chromium-browser")
        if exe is None:
            pytest.fail("no chromium: `make test-browser` installs it from the OS packages")
        port, self.profile = free_port(), tempfile.mkdtemp(prefix="rlheal-chromium-")
        cmd = [exe, "--headless=new", "--no-sandbox", "--disable-gpu", f"--remote-debugging-port={port}", f"--user-data-dir={self.profile}", f"--window-size={width},{height}", "about:blank"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(f"http://127.0.0.1:{port}/json/version", 30)
        page = next(t for t in json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json")) if t["type"] == "page")
        self.ws, self.n = connect(page["webSocketDebuggerUrl"], max_size=None), 0
        self.call("Page.enable")

    def call(self, method: str, **params):
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def evaluate(self, js: str):
        return self.call("Runtime.evaluate", expression=js, returnByValue=True)["result"].get("value")

    def images(self, url: str, expected: int, seconds: float = 60) -> list[dict]:
        """The page's images once `expected` figures are there and every image finished loading."""
        self.call("Page.navigate", url=url)
        js = "JSON.stringify(Array.from(document.images).map(i => ({src: i.src.slice(0, 40), alt: i.alt, complete: i.complete, width: i.naturalWidth})))"
        deadline, found = time.time() + seconds, []
        while time.time() < deadline:
            found = json.loads(self.evaluate(js) or "[]")
            figures = [i for i in found if i["alt"].startswith("fig")]
            if len(figures) >= expected and all(i["complete"] for i in figures):
                break
            time.sleep(0.5)
        return found

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
        return path

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A `prefect server` on loopback, with its UI pointed at its own API."""
    home, port = tmp_path_factory.mktemp("prefect-home"), free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api"}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_for(f"http://127.0.0.1:{port}/api/health", 120)
        yield f"http://127.0.0.1:{port}", env
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def smoke(server, tmp_path_factory):
    """configs/smoke.yaml through `rlheal run` against that server."""
    url, env = server
    tmp = tmp_path_factory.mktemp("smoke")
    cfg = yaml.safe_load((ROOT / "configs/smoke.yaml").read_text()) | {"store": str(tmp / "store")}
    (tmp / "smoke.yaml").write_text(yaml.safe_dump(cfg))
    run_env = {**env, "PREFECT_API_URL": f"{url}/api", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(tmp / "smoke.yaml")], env=run_env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return tmp / "store" / "studies" / "smoke"


def artifact(url: str, key: str) -> dict:
    req = urllib.request.Request(f"{url}/api/artifacts/filter", data=json.dumps({"artifacts": {"key": {"any_": [key]}}}).encode(), headers={"Content-Type": "application/json"})
    (found,) = json.load(urllib.request.urlopen(req))
    return found


def test_the_report_artifact_shows_every_figure_in_the_browser(server, smoke, tmp_path):
    url, _ = server
    figures = [p.stem for p in sorted((smoke / "report").glob("fig*.png"))]
    assert figures, "the smoke report has no figures"
    report = artifact(url, "smoke-report")
    browser = Browser()
    try:
        images = browser.images(f"{url}/artifacts/artifact/{report['id']}", len(figures))
        shot = browser.screenshot(tmp_path / "report-artifact.png")
    finally:
        browser.close()
    shown = {i["alt"]: i for i in images if i["alt"].startswith("fig")}
    assert sorted(shown) == figures, f"figures on the page: {sorted(shown)}; in the report: {figures}; screenshot {shot}"
    for name, image in shown.items():
        assert image["src"].startswith(FIGURE) and image["complete"] and image["width"] > 0, f"{name} did not decode: {image} (screenshot {shot})"
    assert shot.stat().st_size > 50_000  # a rendered page, not a blank one


def test_a_figure_by_relative_path_does_not_decode_so_the_check_above_can_fail(server, tmp_path):
    """The artifact as it was before issue 18 (`![fig](fig.png)`): broken in the browser."""
    url, env = server
    script = "from prefect import flow\nfrom prefect.artifacts import create_markdown_artifact\n@flow\ndef f():\n    create_markdown_artifact('![fig1_broken](fig1_broken.png)', key='broken-figure')\nf()\n"
    r = subprocess.run([sys.executable, "-c", script], env={**env, "PREFECT_API_URL": f"{url}/api"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    browser = Browser()
    try:
        images = browser.images(f"{url}/artifacts/artifact/{artifact(url, 'broken-figure')['id']}", 1)
    finally:
        browser.close()
    (image,) = [i for i in images if i["alt"] == "fig1_broken"]
    assert image["complete"] and image["width"] == 0  # loaded and failed: a broken image
