"""The playground page at ``/`` (issue 19).

(a) In-process: ``/`` is HTML that names only this server's assets, each served with its media type
    and the playground's Content-Security-Policy, and no URL outside the server; the page needs no
    key even when auth is on.
(b) A real headless Chromium (Debian's ``chromium``), driven over the DevTools protocol, uses the
    page against a loopback uvicorn with auth on and every other host sent to a refusing proxy:
    key, subject, prompt, Generate -> G, E and DreamBlend images with one heat-map canvas per word
    and row, the attention-distance curve, the collapse plot; then a bad seed and a wrong key show
    the API's own messages. The backend is the tiny model through ``batching.run_group`` (real maps).
    The Status panel (issue 30) shows ``GET /v1/status`` (the fake replica's fixed numbers, the
    caller's subjects only, the generation's latency), says "replica not answering" on a 503, and
    polls neither while the page is hidden nor after a 401.
    ``DREAMBLEND_SCREENSHOT=PATH`` also saves the final page (the tiny model's) there; the docs'
    ``docs/img/playground.png`` comes from ``docs/playground_screenshot.py`` (the embedded model).

(b) is skipped with one line without chromium, unless DREAMBLEND_REQUIRE_BROWSER=1 (then it fails).
"""

import asyncio
import base64
import copy
import io
import itertools
import json
import logging
import os
import re
import shutil
import subprocess
import threading
import time

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from dreamblend_ray.evaluation.collapse import collapse_plot, png_bytes, probe_model, scene_prompts
from dreamblend_ray.method.pair import TwoUNetPair, single
from dreamblend_ray.method.sampler import DreamBlendSampler
from dreamblend_ray.models.components import build_tiny_components
from dreamblend_ray.serving import batching, http
from dreamblend_ray.serving.batching import GenerationResult
from dreamblend_ray.serving.http import RecentLatency, StatusView
from dreamblend_ray.serving.requests import AppArgs
from test_docs_offline import BROWSER_SERVICES, URL, RefusingProxy, chromium

import api_fakes
from api_fakes import make_app, serve_on_loopback

KEY = "playground-k3y-9e8d7c6b5a4f3e2d1c0b"
SCREENSHOT = os.environ.get("DREAMBLEND_SCREENSHOT")  # a path for the tiny model's page
SVG_NAMESPACE = "http://www.w3.org/2000/svg"  # an identifier for createElementNS, never fetched
# Chromium's own services as in test_docs_offline, and its GCM check-in, which it opens once it has run
# some 10 s (this test's browser lives longer than the /docs one's)
CHROMIUM_OWN = re.compile(rf"{BROWSER_SERVICES.pattern}|^android\.clients\.google\.com$")
ASSET = re.compile(r"""(?:src|href)=["']([^"']+)["']""")


@pytest.fixture(scope="module")
def secured():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DB_PLAYGROUND_KEY", KEY)
        yield make_app(auth_enabled=True, api_key_env="DB_PLAYGROUND_KEY")


# ------------------------------------------------------------------------------ (a) in-process


def test_page_names_only_its_own_assets_each_served_with_its_type_and_the_policy(secured):
    client = TestClient(secured)
    page = client.get("/")  # no key: the page asks for it
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "img-src 'self' data: blob:" in policy
    assert "unsafe-inline" not in policy and "http" not in policy
    assert URL.findall(page.text) == []
    assets = {a for a in ASSET.findall(page.text) if not a.startswith("data:")}
    assert assets == {"/playground/playground.js", "/playground/playground.css"}, assets
    types = {".js": "text/javascript", ".css": "text/css"}
    for asset in assets:
        response = client.get(asset)
        assert response.status_code == 200, asset
        assert response.headers["content-type"].split(";")[0] == types[asset[asset.rindex("."):]]
        assert response.headers["content-security-policy"] == policy
        assert response.headers["x-content-type-options"] == "nosniff"
        external = [url for url in URL.findall(response.text) if url != SVG_NAMESPACE]
        assert external == [], (asset, external)
    assert client.get("/playground/nothing.js").status_code == 404
    assert client.get("/v1/subjects/dog").status_code == 401  # the API itself still needs the key


def test_the_script_keeps_the_key_in_memory_and_uses_no_inline_code(secured):
    client = TestClient(secured)
    script = client.get("/playground/playground.js").text
    for forbidden in ("localStorage", "sessionStorage", "document.cookie", "indexedDB", "eval(", "innerHTML"):
        assert forbidden not in script, forbidden
    html = client.get("/").text
    assert re.search(r"<script(?![^>]*\bsrc=)", html) is None  # no inline script (the CSP would block it)
    assert " style=" not in html and "<style" not in html  # no inline style either
    assert re.search(r"\son[a-z]+=", html) is None  # no inline event handlers
    paths = client.get("/openapi.json").json()["paths"]
    assert "/" not in paths and not any(path.startswith("/playground") for path in paths)


STATUS_OUTPUTS = ("status-batching", "status-queue", "status-active", "status-rows", "status-step", "status-guided",
                  "status-subjects", "status-latency")


def test_the_status_panel_reads_only_fields_that_get_v1_status_has(secured):
    client = TestClient(secured)
    html = client.get("/").text
    for element in ("status-panel", "status-note", "status-view", *STATUS_OUTPUTS):
        assert re.search(rf'\bid="{element}"', html), element
    script = client.get("/playground/playground.js").text
    assert 'getJson("/v1/status")' in script and "document.visibilityState" in script
    assert "visibilitychange" in script
    for element in STATUS_OUTPUTS:  # each filled as text
        assert f'$("{element}").textContent = ' in script, element
    # the fields the page reads exist in the response models (a renamed field would show "–" forever)
    read = set(re.findall(r"\bview\.(\w+)", script)) - {"base", "steps", "guidance_step", "edit_step",
                                                         "instance_prompt", "kind"}  # chooseSubject's view
    assert read and read <= set(StatusView.model_fields), read - set(StatusView.model_fields)
    latency = set(re.findall(r"\bl\.(\w+)", script))
    assert latency and latency <= set(RecentLatency.model_fields), latency - set(RecentLatency.model_fields)
    assert client.get("/v1/status").status_code == 401  # the page needs the key for it, like the other /v1 routes
    body = client.get("/v1/status", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert (body["queue_depth"], body["rows_per_step"], body["loaded_subjects"]) == (2, 2.5, ["dog"])


# ------------------------------------------------------------------------------ (b) the browser


class DevTools:
    """A minimal Chrome DevTools Protocol client: one browser websocket, one flattened page session."""

    def __init__(self, ws_url: str):
        from websockets.sync.client import connect  # deferred: only the browser test needs it

        self.ws = connect(ws_url, max_size=64 * 2 ** 20, open_timeout=10)
        self.ids = itertools.count(1)
        self.events: list[dict] = []
        self.session = None

    def send(self, method: str, params: dict | None = None, timeout: float = 20.0) -> dict:
        message_id = next(self.ids)
        message = {"id": message_id, "method": method, "params": params or {}}
        if self.session is not None:
            message["sessionId"] = self.session
        self.ws.send(json.dumps(message))
        deadline = time.monotonic() + timeout
        while True:
            answer = json.loads(self.ws.recv(timeout=max(0.01, deadline - time.monotonic())))
            if answer.get("id") == message_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer.get("result", {})
            self.events.append(answer)

    def open_page(self) -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20.0, what: str = ""):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what or expression}; page: "
                             f"{self.evaluate('document.body.innerText')[:1500]}")

    def type_into(self, selector: str, text: str) -> None:
        """Focus, clear and type (as the keyboard would: input events fire)."""
        self.evaluate(f"(e => {{ e.focus(); e.select && e.select(); }})(document.querySelector({json.dumps(selector)}))")
        self.send("Input.insertText", {"text": text})

    def close(self) -> None:
        self.ws.close()


def start_browser(browser: str, proxy: RefusingProxy, profile) -> tuple[subprocess.Popen, str]:
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
               "--disable-default-apps", "--disable-domain-reliability", "--no-pings",
               "--disable-client-side-phishing-detection", "--disable-field-trial-config", "--no-service-autorun",
               ("--disable-features=NetworkTimeServiceQuerying,OptimizationHints,MediaRouter,Translate,"
                "AutofillServerCommunication,CertificateTransparencyComponentUpdater"),
               "--hide-scrollbars", "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1",
               f"--user-data-dir={profile}",
               f"--proxy-server=http://127.0.0.1:{proxy.port}", "--proxy-bypass-list=127.0.0.1", "about:blank"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline, seen = time.monotonic() + 30, []
    while time.monotonic() < deadline:  # stderr's "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/ID"
        line = process.stderr.readline()
        if not line and process.poll() is not None:
            break
        seen.append(line)
        match = re.search(r"DevTools listening on (ws://\S+)", line)
        if match:  # keep draining stderr, or a chatty browser blocks on a full pipe
            threading.Thread(target=process.stderr.read, daemon=True).start()
            return process, match.group(1)
    process.kill()
    raise RuntimeError("chromium did not report its DevTools endpoint: " + "".join(seen)[-2000:])


def perturbed_copy(unet, scale: float = 0.02, seed: int = 1):
    """A second UNet: ``unet`` with seeded Gaussian noise on every weight (a stand-in late checkpoint E)."""
    edit = copy.deepcopy(unet)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in edit.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return edit


class TinyModelBackend:
    """The tiny model through ``batching.run_group`` in a worker thread: G = its UNet, E = a perturbed copy."""

    def __init__(self):
        components = build_tiny_components(0, "tiny")
        self.sampler = DreamBlendSampler(components)
        self.pair = TwoUNetPair(components.unet, perturbed_copy(components.unet))
        self.jobs = []
        self.status_down = False  # True: model_status raises, as a replica that does not answer

    async def generate(self, job):
        self.jobs.append(job)
        (output,) = await asyncio.to_thread(batching.run_group, self.sampler, self.pair, [job])
        return GenerationResult(pngs=output.pngs, seeds=job.seeds, batch_requests=1, batch_images=len(job.prompts),
                                replica="tiny-0", loaded_models=[job.model_id], sample_seconds=output.seconds,
                                attention_distance=output.distances, attention=output.attention)

    async def model_health(self):
        return {"replica": "tiny-0", "loaded_models": []}

    async def model_status(self):
        """RecordingBackend's fixed numbers (subjects "dog" and tenant acme's "cat" loaded)."""
        if self.status_down:
            raise RuntimeError("the replica is down")
        return await api_fakes.RecordingBackend().model_status()


def probe_plot(backend: TinyModelBackend) -> bytes:
    """A real attention-probe plot on the tiny model: its UNet as the base, perturbed copies of growing
    noise standing in for checkpoints 2, 4, 6. For the docs screenshot only (several sampler calls)."""
    prompts = scene_prompts("dog", "sks", 2)

    def measure(unet) -> dict:
        return probe_model(backend.sampler, single(unet), prompts, [0], "sks", "dog", steps=4)

    base = backend.pair.guidance_unet
    rows = [{"step": step, **measure(perturbed_copy(base, scale))} for step, scale in ((2, 0.01), (4, 0.03), (6, 0.1))]
    return png_bytes(collapse_plot(rows, measure(base)))


PROMPT = "a photo of sks dog"
WORDS = ["a", "photo", "of", "sks", "dog"]
RAMP_ENDS = {"68,1,84", "253,231,37"}  # playground.js's ramp at 0 and 1, as COLUMN_COLOURS writes them
# Per word (canvas column): its pixel colours over the G, E and DreamBlend canvases.
COLUMN_COLOURS = """(() => {
  const cards = [...document.querySelectorAll('.sample .card')];
  const words = cards[0].querySelectorAll('.map').length;
  return [...Array(words).keys()].map(w => {
    const colours = new Set();
    for (const card of cards) {
      const canvas = card.querySelectorAll('.map canvas')[w];
      const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
      for (let i = 0; i < data.length; i += 4) colours.add(`${data[i]},${data[i + 1]},${data[i + 2]}`);
    }
    return [...colours];
  });
})()"""


def click(tools: DevTools, selector: str) -> None:
    tools.evaluate(f"document.querySelector({json.dumps(selector)}).click()")


def choose_subject(tools: DevTools, subject_id: str) -> None:
    tools.evaluate(f"""(s => {{ s.value = {json.dumps(subject_id)};
                       s.dispatchEvent(new Event('change')); }})(document.getElementById('subject'))""")


def shown_error(tools: DevTools) -> str:
    return tools.wait_for("!document.getElementById('error').hidden && document.getElementById('error').innerText",
                          what="the error box")


STATUS_ASKED = "performance.getEntriesByType('resource').filter(e => e.name.endsWith('/v1/status')).length"
STATUS_TEXT = "Object.fromEntries([...document.querySelectorAll('#status-view output')].map(o => [o.id, o.innerText]))"


def status_note(tools: DevTools) -> str:
    return tools.evaluate("document.getElementById('status-note').innerText")


def assert_no_status_polls(tools: DevTools, why: str) -> None:
    """No GET /v1/status for longer than the 2 s period (after one still in flight has landed)."""
    time.sleep(0.5)
    asked = tools.evaluate(STATUS_ASKED)
    time.sleep(2.6)
    assert tools.evaluate(STATUS_ASKED) == asked, why


def api_message(base: str, body: dict) -> str:
    """What the API itself says to ``body`` (no proxy: loopback), as the page should show it."""
    answer = httpx.post(f"{base}/v1/generate", json=body, headers={"X-API-Key": KEY}, trust_env=False)
    assert answer.status_code == 422, answer.text
    return "\n".join(f"{issue['loc'][-1]}: {issue['msg']}" for issue in answer.json()["detail"])


@pytest.mark.slow
def test_a_headless_browser_generates_and_shows_maps_and_errors(tmp_path):
    browser = chromium()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DB_PLAYGROUND_KEY", KEY)
        backend = TinyModelBackend()
        plot = probe_plot(backend) if SCREENSHOT else api_fakes.read_collapse_plot("dog")

        def read_plot(subject_id, tenant="default"):
            return plot if subject_id == "dog" else api_fakes.read_collapse_plot(subject_id)

        app = http.make_api(AppArgs(base="tiny", auth_enabled=True, api_key_env="DB_PLAYGROUND_KEY"), backend,
                            api_fakes.read_manifest, api_fakes.list_subjects, read_plot)
    proxy = RefusingProxy()
    process, tools = None, None
    try:
        with serve_on_loopback(app) as base:
            process, endpoint = start_browser(browser, proxy, tmp_path / "profile")
            tools = DevTools(endpoint)
            tools.open_page()
            for domain in ("Page", "Runtime"):
                tools.send(f"{domain}.enable")
            tools.send("Emulation.setDeviceMetricsOverride", {"width": 1100, "height": 800,
                                                              "deviceScaleFactor": 1, "mobile": False})
            tools.send("Page.addScriptToEvaluateOnNewDocument", {"source": (
                "window.__violations = []; document.addEventListener('securitypolicyviolation', "
                "e => window.__violations.push(e.violatedDirective + ' ' + e.blockedURI));")})
            tools.send("Page.navigate", {"url": f"{base}/?page_size=2"})
            tools.wait_for("document.readyState === 'complete' && "
                           "document.getElementById('subject').innerText.includes('enter the API key')",
                           what="the page asking for the key")
            tools.wait_for("document.getElementById('status-note').innerText.includes('enter the API key')",
                           what="the status panel asking for the key")
            assert tools.evaluate("document.getElementById('status-view').hidden") is True

            tools.type_into("#api-key", KEY)
            click(tools, "#use-key")  # subjects come two at a time: "more subjects" follows `next`
            tools.wait_for("[...document.querySelectorAll('#subject option')].map(o => o.value).join() === ',bird,dog'",
                           what="the first page of subjects")
            for expected in (",bird,dog,eel,fox", ",bird,dog,eel,fox,owl"):
                click(tools, "#more-subjects")
                tools.wait_for("[...document.querySelectorAll('#subject option')].map(o => o.value).join() === "
                               f"{json.dumps(expected)}", what=expected)
            assert tools.evaluate("document.getElementById('more-subjects').hidden") is True

            # the status panel: RecordingBackend's numbers, this tenant's subjects only ("cat" is acme's)
            tools.wait_for("document.getElementById('status-queue').innerText === '2'", what="the status panel")
            assert tools.evaluate(STATUS_TEXT) == {
                "status-batching": "continuous · sd1", "status-queue": "2", "status-active": "3",
                "status-rows": "2.5 mean · 4 max", "status-step": "12.5 ms", "status-guided": "40%",
                "status-subjects": "dog", "status-latency": "no generations yet"}
            panel = tools.evaluate("document.getElementById('status-panel').innerText")
            assert "Guidance share\n40%" in panel and "cat" not in panel, panel
            assert status_note(tools).startswith("replica r1 · 10 recent steps, last "), status_note(tools)

            choose_subject(tools, "bird")  # no attention-probe plot
            tools.wait_for("document.getElementById('collapse-note').innerText === 'no collapse plot yet'",
                           what="the missing-plot note")
            choose_subject(tools, "dog")
            plot_width = Image.open(io.BytesIO(plot)).width
            tools.wait_for(f"document.getElementById('collapse').naturalWidth === {plot_width}", what="the collapse plot")
            info = tools.evaluate("document.getElementById('subject-info').innerText")
            assert "saved steps 2, 4, 6" in info and "G=2, E=6" in info and "base tiny-sd" in info, info

            tools.type_into("#prompt", PROMPT)
            tools.type_into("#seed", "3")
            tools.type_into("#steps", "4")
            tools.type_into("#window", "2")
            tools.evaluate("document.getElementById('eta-schedule').value = 'constant'")
            started = time.monotonic()
            click(tools, "#generate")
            tools.wait_for(f"document.querySelectorAll('.sample .map canvas').length === {3 * len(WORDS)} && "
                           "[...document.querySelectorAll('.sample-image')].every(i => i.complete && i.naturalWidth > 0)",
                           timeout=90, what="the images and heat maps")
            generate_s = time.monotonic() - started
            rows = tools.evaluate("[...document.querySelectorAll('.sample .card')].map(c => [c.dataset.row, "
                                  "c.querySelector('img').naturalWidth, [...c.querySelectorAll('.word')].map(w => w.innerText)])")
            assert rows == [["guidance", 32, WORDS], ["edit", 32, WORDS], ["dreamblend", 32, WORDS]], rows
            columns = tools.evaluate(COLUMN_COLOURS)  # one shared scale per word: its range spans the ramp
            for word, colours in zip(WORDS, columns):
                assert RAMP_ENDS <= set(colours), (word, colours[:5])
            points = tools.evaluate("document.querySelector('.curve-plot polyline').getAttribute('points')")
            assert len(points.split()) == 2, points  # one per guided step (window K = 2)
            job = backend.jobs[-1]
            assert (job.seeds, job.config.num_inference_steps, job.config.guidance_steps) == ([3], 4, 2)
            assert job.config.eta_schedule == "constant"  # the Step size select
            assert job.config.attention_maps and job.model_id == "dog"
            latency = tools.wait_for("(t => t.includes('1 request in') && t)"
                                     "(document.getElementById('status-latency').innerText)",
                                     what="the generation's latency in the status panel")
            assert re.fullmatch(r"p50 [\d.]+ ms · p95 [\d.]+ ms · 1 request in [\d.]+ s", latency), latency
            gap = tools.evaluate("""(() => {  // ms from the generation's answer to the next status request
              const entries = performance.getEntriesByType('resource');
              const done = entries.find(e => e.name.endsWith('/v1/generate')).responseEnd;
              return Math.min(...entries.filter(e => e.name.endsWith('/v1/status') && e.startTime >= done)
                                        .map(e => e.startTime - done)); })()""")
            assert gap < 500, gap  # asked right after the generation, not at the next 2 s tick

            tools.evaluate("document.activeElement.blur()")
            shot = tools.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                          "clip": full_page(tools)})
            (tmp_path / "playground.png").write_bytes(base64.b64decode(shot["data"]))
            if SCREENSHOT:  # on request only
                shutil.copyfile(tmp_path / "playground.png", SCREENSHOT)

            backend.status_down = True  # the replica stops answering: a 503, polled on
            tools.wait_for("document.getElementById('status-view').hidden", what="the status hidden on a 503")
            assert status_note(tools) == "replica not answering; retrying"
            backend.status_down = False
            tools.wait_for("!document.getElementById('status-view').hidden", what="the status back after the 503")
            assert tools.evaluate("document.getElementById('status-guided').innerText") == "40%"

            tools.evaluate("Object.defineProperty(document, 'visibilityState', {configurable: true, get: () => "
                           "'hidden'}); document.dispatchEvent(new Event('visibilitychange'))")
            assert_no_status_polls(tools, "polled while hidden")
            asked = tools.evaluate(STATUS_ASKED)
            tools.evaluate("delete document.visibilityState; document.dispatchEvent(new Event('visibilitychange'))")
            tools.wait_for(f"{STATUS_ASKED} > {asked}", timeout=1.5, what="a status poll on becoming visible")

            tools.type_into("#seed", "-1")  # a 422 list: "field: message" lines
            click(tools, "#generate")
            expected = api_message(base, {"subject_id": "dog", "prompt": PROMPT, "seed": -1})
            assert shown_error(tools) == f"HTTP 422\n{expected}" and expected.startswith("seed: ")

            tools.type_into("#api-key", "wrong-key")  # a one-sentence detail, as is
            click(tools, "#use-key")
            tools.wait_for("document.getElementById('error-text').innerText.startsWith('missing or invalid API key')",
                           what="the 401 sentence")
            assert tools.evaluate("document.getElementById('error-status').innerText") == "HTTP 401"
            tools.wait_for("document.getElementById('status-note').innerText.startsWith('missing or invalid API key')",
                           what="the status panel's 401")
            assert tools.evaluate("document.getElementById('status-view').hidden") is True
            assert_no_status_polls(tools, "polled on after a 401")

            kept = tools.evaluate("[localStorage.length, sessionStorage.length, document.cookie]")
            assert kept == [0, 0, ""], kept  # the key lived in a JS variable only
            assert tools.evaluate("window.__violations") == []
            thrown = [e["params"] for e in tools.events if e.get("method") == "Runtime.exceptionThrown"]
            assert thrown == [], thrown
    finally:
        if tools is not None:
            tools.close()
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        proxy.close()
    page_requests = {host for host in proxy.hosts() if not CHROMIUM_OWN.match(host)}
    assert page_requests == set(), proxy.requests  # the page asked for nothing outside the server
    logging.getLogger(__name__).info("generate in the browser took %.1f s", generate_s)


def full_page(tools: DevTools) -> dict:
    size = tools.send("Page.getLayoutMetrics")["cssContentSize"]
    return {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}


def test_the_step_size_select_offers_the_registered_schedules_and_sends_the_field(secured):
    """The page's Step size choices are the sampler's eta schedules (a schedule added to or renamed
    in method/guidance.py shows up here), "default" sends nothing, and the choice goes out as the
    request's eta_schedule field."""
    from dreamblend_ray.method import guidance

    client = TestClient(secured)
    html = client.get("/").text
    select = re.search(r'<select id="eta-schedule"[^>]*>(.*?)</select>', html, re.S)
    assert select is not None
    values = re.findall(r'<option value="([^"]*)">', select.group(1))
    assert values[0] == "" and sorted(values[1:]) == sorted(guidance.ETA_SCHEDULES)
    script = client.get("/playground/playground.js").text
    assert 'body.eta_schedule = $("eta-schedule").value' in script
