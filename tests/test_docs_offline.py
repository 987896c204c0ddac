"""/docs and /redoc render without internet (issue 23 item 1).

(a) The pages' HTML names no URL outside the server, and every asset they name is served by the app.
(b) A real headless Chromium (Debian's ``chromium``) loads each page from a loopback uvicorn with all
    other traffic sent to a recording proxy that refuses it: the operations list renders, and nothing
    but Chromium's own background services (sign-in, component updates, network time: it asks them
    for about:blank too) tried to leave the machine.

(b) needs /usr/bin/chromium. Without it the test is skipped with one line saying how to enable it,
unless DREAMBLEND_REQUIRE_BROWSER=1 (CI sets it), where a missing browser fails the test.
"""

import os
import re
import shutil
import socket
import subprocess
import threading

import pytest
from fastapi.testclient import TestClient

from api_fakes import make_app, serve_on_loopback

KEY = "docs-k3y-2c4e6a8b0d2f4a6c8e0b2d4f6a8c"
# Chromium's own services, contacted whatever the page (measured with about:blank; Chromium 150
# also opens www.google.com several times for about:blank); a page's assets would come from
# elsewhere (cdn.jsdelivr.net, fastapi.tiangolo.com, fonts.googleapis.com).
BROWSER_SERVICES = re.compile(r"^(accounts|clients\d*|update|redirector|www)\.(google\.com|googleapis\.com|gvt1\.com)$")
URL = re.compile(r"""(?:https?:)?//[^\s"'<>)]+""")


@pytest.fixture(scope="module")
def app():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DB_DOCS_KEY", KEY)
        yield make_app(auth_enabled=True, api_key_env="DB_DOCS_KEY")  # the docs stay open with auth on


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_html_names_no_external_url_and_its_assets_are_served(app, page):
    http = TestClient(app)
    response = http.get(page)
    html = response.text
    policy = response.headers["content-security-policy"]  # the browser refuses anything from elsewhere
    assert "default-src 'self'" in policy and "img-src 'self' data:" in policy and "https:" not in policy
    assert URL.findall(html) == [], URL.findall(html)  # no CDN script or style, no remote favicon
    assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)
    assert any(a.endswith(".js") for a in assets) and any("favicon" in a for a in assets), assets
    for asset in assets:
        assert asset.startswith("/static-offline-docs/"), asset
        response = http.get(asset)
        assert response.status_code == 200 and len(response.content) > 1000, asset
    if page == "/docs":
        assert '"validatorUrl": null' in html  # Swagger UI's online validator badge is off


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("DREAMBLEND_REQUIRE_BROWSER") == "1":
            pytest.fail("DREAMBLEND_REQUIRE_BROWSER=1 but no chromium on PATH (apt-get install chromium)")
        pytest.skip("no chromium: `apt-get install chromium` (Debian) runs the offline /docs browser test")
    return path


class RefusingProxy:
    """An HTTP proxy on loopback that answers every request 403 and records what was asked for."""

    def __init__(self):
        self.requests: list[str] = []  # request lines: "CONNECT host:443 HTTP/1.1", "GET http://host/..."
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    line = conn.recv(4096).split(b"\r\n", 1)[0].decode("latin-1")
                    if line:  # a connection closed unused (chromium preconnects) asked for nothing
                        self.requests.append(line)
                    conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                except OSError:
                    pass

    def close(self):
        self.sock.close()

    def hosts(self) -> set[str]:
        targets = [line.split(" ")[1] if line.count(" ") >= 2 else line for line in self.requests]
        return {re.sub(r"^[a-z]+://", "", target).split("/")[0].rsplit(":", 1)[0] for target in targets}


def render(browser: str, url: str, proxy: RefusingProxy, profile, *extra: str) -> str:
    """The page's DOM after scripts ran (virtual time), all non-loopback traffic to the proxy."""
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
               "--disable-default-apps", "--disable-domain-reliability", "--no-pings", "--metrics-recording-only",
               "--disable-client-side-phishing-detection", "--disable-field-trial-config", "--no-service-autorun",
               "--disable-features=NetworkTimeServiceQuerying,OptimizationHints,MediaRouter,Translate,"
               "AutofillServerCommunication,CertificateTransparencyComponentUpdater",
               f"--user-data-dir={profile}",
               f"--proxy-server=http://127.0.0.1:{proxy.port}", "--proxy-bypass-list=127.0.0.1",
               "--virtual-time-budget=10000", *extra, url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.slow
def test_a_headless_browser_renders_docs_and_redoc_offline(app, tmp_path):
    browser = chromium()
    proxy = RefusingProxy()
    try:
        with serve_on_loopback(app) as base:
            docs = render(browser, f"{base}/docs", proxy, tmp_path / "p1", "--dump-dom")
            redoc = render(browser, f"{base}/redoc", proxy, tmp_path / "p2", "--dump-dom")
    finally:
        proxy.close()
    # Swagger UI: one opblock per operation, with its path
    paths = set(re.findall(r'class="opblock opblock-(?:get|post|delete)"[^>]*>.*?data-path="([^"]+)"', docs, re.S))
    assert paths == {"/healthz", "/v1/subjects", "/v1/subjects/{subject_id}", "/v1/subjects/{subject_id}/collapse.png",
                     "/v1/generate", "/v1/subjects/{subject_id}/cancel", "/v1/jobs", "/v1/jobs/{job_id}",
                     "/v1/jobs/{job_id}/images/{n}", "/v1/status"}, docs[:2000]
    # ReDoc: one section per operation
    sections = set(re.findall(r'data-section-id="operation/([^"]+)"', redoc))
    assert sections == {"healthz_healthz_get", "subjects_v1_subjects_get", "get_subject",
                        "collapse_plot_v1_subjects__subject_id__collapse_png_get", "generate_v1_generate_post",
                        "create_subject", "cancel_subject", "delete_subject", "create_job", "get_job",
                        "get_job_image", "status_v1_status_get"}, redoc[:2000]
    page_requests = {host for host in proxy.hosts() if not BROWSER_SERVICES.match(host)}
    assert page_requests == set(), proxy.requests  # the pages asked for nothing outside the server
