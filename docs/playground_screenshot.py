"""Regenerate docs/img/playground.png: the web playground generating with the embedded base and a
fine-tuned demo subject.

    python docs/playground_screenshot.py --storage outputs/demo/storage

``--storage`` is a storage root holding ``subjects/<id>/`` (``make demo`` writes
``outputs/demo/storage``). The script loads the embedded shapes-world base, serves the real
playground app (``serving.http.make_api`` over that root's manifests, subject list and collapse
plots, auth on with a throwaway key) on 127.0.0.1 with a backend that runs the real sampler through
``batching.run_group``, and drives Debian's headless chromium over the DevTools protocol (every
host but 127.0.0.1 goes to a proxy that refuses it): key, subject, prompt, seed, steps, window K,
alpha, step size, CFG, Generate; it waits for the G, E and DreamBlend images, their heat maps and the status
panel's latency, then saves the full page to ``--out``. The browser helpers are those of
``tests/test_playground.py``. About 30 s on two CPU cores.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the playground test's browser helpers

from api_fakes import serve_on_loopback  # noqa: E402
from test_docs_offline import RefusingProxy  # noqa: E402
from test_playground import CHROMIUM_OWN, DevTools, choose_subject, click, full_page, start_browser  # noqa: E402

from dreamblend_ray.serving import batching, http  # noqa: E402
from dreamblend_ray.serving.batching import GenerationJob, GenerationResult  # noqa: E402
from dreamblend_ray.serving.requests import AppArgs, parse_model_id, per_tenant, read_collapse_plot  # noqa: E402
from dreamblend_ray.serving.telemetry import ReplicaTelemetry  # noqa: E402
from dreamblend_ray.training import layout  # noqa: E402

logger = logging.getLogger("playground_screenshot")

KEY_ENV = "DB_SCREENSHOT_KEY"
PROMPT = "a sks shape and a blue square on a black background"
VIEWPORT = {"width": 1100, "height": 800, "deviceScaleFactor": 1, "mobile": False}
# The page's fields (index.html ids) and the parsed arguments that fill them.
FIELDS = {"#prompt": "prompt", "#seed": "seed", "#steps": "steps", "#window": "window", "#alpha": "alpha",
          "#scale": "scale"}
RESULTS_SHOWN = """(() => {
  const cards = [...document.querySelectorAll('.sample .card')];
  const maps = cards.map(c => c.querySelectorAll('.map canvas').length);
  return cards.length === 3 && maps[0] > 0 && maps.every(m => m === maps[0])
    && [...document.querySelectorAll('.sample-image')].every(i => i.complete && i.naturalWidth > 0)
    && document.querySelector('.curve-plot polyline') !== null;
})()"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--storage", default="outputs/demo/storage", help="storage root with subjects/<id>/")
    parser.add_argument("--subject", default="half-ring", help="the subject to generate")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=30, help="DDIM steps T")
    parser.add_argument("--window", type=int, default=18, help="guidance window K (guidance_steps)")
    parser.add_argument("--alpha", type=float, default=0.25)
    parser.add_argument("--eta-schedule", default="constant", help="the guidance's step size over the window "
                        "(the page's Step size; the demo's: constant)")
    parser.add_argument("--scale", type=float, default=3.0, help="CFG scale")
    parser.add_argument("--out", default="docs/img/playground.png")
    parser.add_argument("--browser", default=shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the images")
    return parser.parse_args(argv)


def expected_job(args: argparse.Namespace) -> dict:
    """What the backend's job must hold once the page has sent the form as this script fills it."""
    return {"subject": args.subject, "prompts": [args.prompt], "seeds": [args.seed], "steps": args.steps,
            "guidance_steps": args.window, "alpha": args.alpha, "eta_schedule": args.eta_schedule,
            "guidance_scale": args.scale, "attention_maps": True}


def job_summary(job: GenerationJob) -> dict:
    config = job.config
    return {"subject": parse_model_id(job.model_id).subject_id, "prompts": job.prompts, "seeds": job.seeds,
            "steps": config.num_inference_steps, "guidance_steps": config.guidance_steps, "alpha": config.alpha,
            "eta_schedule": config.eta_schedule, "guidance_scale": config.guidance_scale, "attention_maps": config.attention_maps}


class SamplerBackend:
    """The model replica's part, in process: the real sampler on ``components`` and the subjects'
    G/E pairs from ``root`` (loaded on first use), timed step by step for the status panel."""

    def __init__(self, components, root: str, load_pair=None):
        from dreamblend_ray.method.sampler import DreamBlendSampler
        from dreamblend_ray.training.checkpoints import load_pair as load_checkpoints

        self.components, self.root = components, root
        self.load_pair = load_pair or load_checkpoints
        self.sampler = DreamBlendSampler(components)
        self.telemetry = ReplicaTelemetry(components.family)
        self.pairs: dict[str, object] = {}
        self.jobs: list[GenerationJob] = []

    def pair(self, model_id: str):
        if model_id not in self.pairs:
            model = parse_model_id(model_id)
            self.pairs[model_id], _ = self.load_pair(self.root, model.subject_id, self.components,
                                                     model.guidance_step, model.edit_step)
        return self.pairs[model_id]

    def run(self, job: GenerationJob) -> batching.JobOutput:
        pair, last = self.pair(job.model_id), [time.perf_counter()]

        def timed(step: int, total: int) -> None:
            now = time.perf_counter()
            self.telemetry.step("static", [len(job.prompts)], now - last[0])
            last[0] = now

        self.telemetry.rows("static", len(job.prompts))
        try:
            (output,) = batching.run_group(self.sampler, pair, [job], callback=timed)
        finally:
            self.telemetry.rows("static", 0)
        return output

    async def generate(self, job: GenerationJob) -> GenerationResult:
        self.jobs.append(job)
        output = await asyncio.to_thread(self.run, job)
        return GenerationResult(pngs=output.pngs, seeds=job.seeds, batch_requests=1, batch_images=len(job.prompts),
                                replica="local-0", loaded_models=list(self.pairs), sample_seconds=output.seconds,
                                attention_distance=output.distances, attention=output.attention)

    async def model_health(self) -> dict:
        return {"replica": "local-0", "loaded_models": list(self.pairs)}

    async def model_status(self) -> dict:
        return {"replica": "local-0", "family": self.components.family, "batching": "static",
                "loaded_models": list(self.pairs), **self.telemetry.snapshot()}


def make_app(root: str, backend: SamplerBackend):
    """The playground's app over ``root``, as the Serve ingress builds it; auth on with ``KEY_ENV``'s key.
    No subject service: nothing is written to ``root``."""
    args = AppArgs(base="embedded", storage_root=root, auth_enabled=True, api_key_env=KEY_ENV,
                   subjects_service=False)
    return http.make_api(args, backend, per_tenant(layout.read_manifest, root),
                         per_tenant(layout.list_subject_ids, root), per_tenant(read_collapse_plot, root))


@contextlib.contextmanager
def browser_page(browser: str):
    """A headless chromium page (DevTools) whose traffic beyond 127.0.0.1 is refused."""
    proxy, profile = RefusingProxy(), tempfile.mkdtemp(prefix="playground-shot-")
    process, tools = None, None
    try:
        process, endpoint = start_browser(browser, proxy, Path(profile) / "profile")
        tools = DevTools(endpoint)
        tools.open_page()
        for domain in ("Page", "Runtime"):
            tools.send(f"{domain}.enable")
        tools.send("Emulation.setDeviceMetricsOverride", VIEWPORT)
        yield tools
    finally:
        if tools is not None:
            tools.close()
        if process is not None:
            stop(process)
        proxy.close()
        shutil.rmtree(profile, ignore_errors=True)
    outside = {host for host in proxy.hosts() if not CHROMIUM_OWN.match(host)}
    if outside:  # the page asked for something beyond the server (the proxy refused it)
        raise RuntimeError(f"the page tried to reach {sorted(outside)}")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()


def open_subject(tools: DevTools, base: str, key: str, subject: str) -> None:
    """Load the page, enter the key, choose ``subject`` and wait for its info and collapse plot."""
    tools.send("Page.navigate", {"url": f"{base}/"})
    tools.wait_for("document.readyState === 'complete'", what="the page")
    tools.type_into("#api-key", key)
    click(tools, "#use-key")
    tools.wait_for(f"[...document.querySelectorAll('#subject option')].some(o => o.value === {json.dumps(subject)})",
                   what=f"subject {subject} in the list")
    choose_subject(tools, subject)
    tools.wait_for("document.getElementById('subject-info').innerText.includes('saved steps')", what="subject info")
    tools.wait_for("(c => c.hidden ? document.getElementById('collapse-note').innerText.includes('no collapse') "
                   ": c.complete && c.naturalWidth > 0)(document.getElementById('collapse'))",
                   what="the collapse plot or its note")


def generate(tools: DevTools, args: argparse.Namespace) -> float:
    """Fill the form, Generate, wait for the images, heat maps and the status panel's latency; seconds taken."""
    for selector, name in FIELDS.items():
        tools.type_into(selector, str(getattr(args, name)))
    tools.evaluate(f"document.getElementById('eta-schedule').value = {json.dumps(args.eta_schedule)}")
    if tools.evaluate("document.getElementById('eta-schedule').value") != args.eta_schedule:
        raise ValueError(f"the page offers no step size {args.eta_schedule!r}")
    started = time.monotonic()
    click(tools, "#generate")
    tools.wait_for(RESULTS_SHOWN, timeout=args.timeout, what="the G, E and DreamBlend images and heat maps")
    seconds = time.monotonic() - started
    tools.wait_for("document.getElementById('status-latency').innerText.includes('1 request in')",
                   what="the latency in the status panel")
    tools.evaluate("document.activeElement.blur()")
    return seconds


def screenshot(tools: DevTools) -> bytes:
    shot = tools.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                  "clip": full_page(tools)}, timeout=60)
    return base64.b64decode(shot["data"])


def check_job(backend: SamplerBackend, args: argparse.Namespace) -> None:
    """The page sent what the form says (ValueError otherwise)."""
    if len(backend.jobs) != 1 or job_summary(backend.jobs[0]) != expected_job(args):
        got = [job_summary(job) for job in backend.jobs]
        raise ValueError(f"the page's generation was {got}, expected {expected_job(args)}")


def capture(args: argparse.Namespace, backend: SamplerBackend) -> bytes:
    """Serve the app, drive the page and return the screenshot (PNG bytes)."""
    key = secrets.token_urlsafe(32)
    os.environ[KEY_ENV] = key
    app = make_app(args.storage, backend)
    with serve_on_loopback(app) as base, browser_page(args.browser) as tools:
        open_subject(tools, base, key, args.subject)
        seconds = generate(tools, args)
        logger.info("generate in the browser took %.1f s", seconds)
        png = screenshot(tools)
    check_job(backend, args)
    return png


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    torch.set_num_threads(1)
    from dreamblend_ray.models.components import load_components

    started = time.monotonic()
    layout.read_manifest(args.storage, args.subject)  # fail early on a missing or damaged subject
    backend = SamplerBackend(load_components("embedded"), args.storage)
    png = capture(args, backend)
    Path(args.out).write_bytes(png)
    logger.info("wrote %s (%d bytes) in %.1f s", args.out, len(png), time.monotonic() - started)


if __name__ == "__main__":
    main()
