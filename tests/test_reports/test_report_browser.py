"""report.html opened in headless Chromium over the DevTools protocol at a 1400 px wide viewport:
no console errors, no network request (the page is self-contained), every table and image
present and decoded, no table wider than the viewport, and a screenshot saved."""
from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import time
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason=f"{CHROMIUM} absent (CI installs it: apt-get install -y chromium)")

# Counts the page must show; the store in conftest.py fills every section but released checkpoints.
N_TABLES = 12  # summary, data, mIoU ss, mIoU ms+flip, runs, sources, inference, training, documented speed,
#                kernels, kernel correctness, curves
N_IMAGES = 3   # mIoU bars, kernels TFLOP/s, training curves
VIEWPORT = 1400

PROBE = """(async () => {
  const imgs = [...document.images];
  await Promise.all(imgs.map(i => i.decode().catch(() => null)));
  return {tables: document.querySelectorAll('table').length,
          rows: document.querySelectorAll('table tbody tr').length,
          images: imgs.length,
          decoded: imgs.filter(i => i.naturalWidth > 0 && i.naturalHeight > 0
                               && i.src.startsWith('data:image/png;base64,') && i.src.length > 1000).length,
          viewport: window.innerWidth, width: document.documentElement.clientWidth,
          page: document.documentElement.scrollWidth,
          first_heading: document.querySelector('h2').textContent,
          // each table's right edge and the section it belongs to
          tables_right: [...document.querySelectorAll('table')].map(t => {
            let h = t.previousElementSibling;
            while (h && h.tagName !== 'H2') h = h.previousElementSibling;
            return [h ? h.textContent : '?', Math.ceil(t.getBoundingClientRect().right)];
          })};
})()"""


@pytest.fixture
def chromium(tmp_path):
    """A headless Chromium with DevTools on a free port; yields the port."""
    profile = tmp_path / "profile"
    proc = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
         "--remote-debugging-port=0", f"--window-size={VIEWPORT},1000", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"  # Chromium writes its chosen port here
        deadline = time.monotonic() + 30
        while not (port_file.is_file() and port_file.read_text().strip()):
            assert proc.poll() is None, f"chromium exited with {proc.returncode}"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.1)
        yield int(port_file.read_text().split()[0])
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _inspect(port: int, url: str) -> tuple[dict, list[str], list[str], bytes]:
    import aiohttp  # mlflow's own dependency: its websocket client speaks CDP

    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
            page = next(t for t in await r.json() if t["type"] == "page")
        async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            ids = iter(range(1, 1_000_000))
            errors, requests, pending = [], [], {}
            loaded = asyncio.Event()

            async def reader():
                async for msg in ws:
                    data = json.loads(msg.data)
                    if "id" in data:
                        pending.pop(data["id"]).set_result(data)
                        continue
                    method, params = data.get("method"), data.get("params", {})
                    if method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                        errors.append(f"console.{params['type']}: {params['args']}")
                    elif method == "Runtime.exceptionThrown":
                        errors.append(f"exception: {params['exceptionDetails']}")
                    elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                        errors.append(f"log: {params['entry']['text']}")
                    elif method == "Network.requestWillBeSent":
                        requests.append(params["request"]["url"])
                    elif method == "Page.loadEventFired":
                        loaded.set()

            async def call(method: str, **params) -> dict:
                i = next(ids)
                pending[i] = asyncio.get_running_loop().create_future()
                await ws.send_json({"id": i, "method": method, "params": params})
                reply = await asyncio.wait_for(pending[i], 30)
                assert "error" not in reply, f"{method}: {reply['error']}"
                return reply["result"]

            task = asyncio.create_task(reader())
            for domain in ("Runtime", "Log", "Page", "Network"):
                await call(f"{domain}.enable")
            await call("Emulation.setDeviceMetricsOverride", width=VIEWPORT, height=1000, deviceScaleFactor=1,
                       mobile=False)
            await call("Page.navigate", url=url)
            await asyncio.wait_for(loaded.wait(), 30)
            probe = await call("Runtime.evaluate", expression=PROBE, awaitPromise=True, returnByValue=True)
            shot = await call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
            task.cancel()
            return probe["result"]["value"], errors, requests, base64.b64decode(shot["data"])


def test_html_report_in_headless_chromium(report, chromium, tmp_path):
    from PIL import Image

    out, _ = report
    html = out / "report.html"
    probe, errors, requests, png = asyncio.run(_inspect(chromium, html.as_uri()))
    assert errors == []
    # Self-contained: the page and its inline data: images, no stylesheet, script or image from elsewhere.
    assert html.as_uri() in requests
    assert [u for u in requests if u != html.as_uri() and not u.startswith("data:")] == []
    assert probe["tables"] == N_TABLES
    assert probe["rows"] > 0
    assert probe["images"] == probe["decoded"] == N_IMAGES
    assert probe["first_heading"] == "Summary"
    # Readable at 1400 px: no table runs past the viewport (less its scroll bar), nothing scrolls sideways.
    width = probe["width"]
    assert probe["viewport"] == VIEWPORT and VIEWPORT - 30 <= width <= VIEWPORT
    assert [(section, right) for section, right in probe["tables_right"] if right > width] == []
    assert probe["page"] <= width
    shot = tmp_path / f"report-{VIEWPORT}px.png"
    shot.write_bytes(png)
    print(f"screenshot: {shot}")
    with Image.open(shot) as im:
        assert im.format == "PNG" and im.width == width and im.height >= 1200
