"""netguard: outbound URLs and storage sources a client may name (SSRF), with no network.

Name resolution is injected; the HTTP tests talk to a real http.server thread on 127.0.0.1.
"""

from __future__ import annotations

import http.server
import os
import socket
import threading

import pytest

from dreamblend_ray.io.netguard import (NetPolicy, check_outbound_url, check_storage_source, safe_get,
                                        safe_post)

PUBLIC_V4, PUBLIC_V6 = "93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"


def resolver(*addresses: str, calls: list | None = None):
    """A getaddrinfo stand-in answering every host with ``addresses``."""

    def resolve(host, port, *args, **kwargs):
        if calls is not None:
            calls.append(host)
        return [(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM, 6, "",
                 (ip, port, 0, 0) if ":" in ip else (ip, port)) for ip in addresses]

    return resolve


def check(url: str, *addresses: str, policy: NetPolicy = NetPolicy(), allow_list: bool = False):
    return check_outbound_url(url, policy, resolve=resolver(*addresses), need_allow_list=allow_list)


def refused(url: str, *addresses: str, policy: NetPolicy = NetPolicy(), allow_list: bool = False) -> str:
    with pytest.raises(ValueError) as info:
        check(url, *addresses, policy=policy, allow_list=allow_list)
    return str(info.value)


# ------------------------------------------------------------------------------------- policy --

def test_policy_validates_its_fields():
    with pytest.raises(ValueError, match="tuple"):
        NetPolicy(allow_hosts=["images.example.com"])
    for bad in ("Images.Example.com", "https://images.example.com", "images.example.com:443", "", "a/b"):
        with pytest.raises(ValueError, match="lower-case host names"):
            NetPolicy(allow_hosts=(bad,))
    with pytest.raises(ValueError, match="allow_private"):
        NetPolicy(allow_private="yes")
    assert NetPolicy(allow_hosts=("images.example.com", "10.1.2.3")).allow_hosts[1] == "10.1.2.3"


# ---------------------------------------------------------------------------------- addresses --

def test_public_addresses_pass_and_are_returned():
    assert check("https://hooks.example.com/x?token=1", PUBLIC_V4, PUBLIC_V6) == [PUBLIC_V4, PUBLIC_V6]


@pytest.mark.parametrize("address, rule", [
    ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("::1", "loopback"),
    ("10.0.0.7", "private"), ("172.16.0.1", "private"), ("172.31.255.255", "private"),
    ("192.168.1.1", "private"), ("100.64.0.1", "private"), ("fd00::1", "private"),
    ("169.254.169.254", "link-local"), ("fe80::1", "link-local"),
    ("224.0.0.1", "multicast"), ("ff02::1", "multicast"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    ("240.0.0.1", "reserved"), ("192.0.2.1", "reserved"), ("255.255.255.255", "reserved"),
    ("::ffff:127.0.0.1", "embeds a loopback"), ("::ffff:169.254.169.254", "embeds a link-local"),
    ("::ffff:10.0.0.1", "embeds a private"), ("64:ff9b::a9fe:a9fe", "embeds a link-local"),
    ("2002:7f00:1::", "embeds a loopback"),
])
def test_non_public_addresses_are_refused_by_rule(address, rule):
    message = refused("https://hooks.example.com/path?secret=abc", address)
    assert rule in message and "hooks.example.com" in message
    assert address not in message.replace("hooks.example.com", "") and "secret=abc" not in message


def test_ip_literals_are_checked_like_resolved_names():
    assert "loopback" in check_outbound_url_error("https://127.0.0.1/")
    assert "link-local" in check_outbound_url_error("https://[::ffff:169.254.169.254]/")
    assert "link-local" in check_outbound_url_error("http://169.254.169.254/latest/meta-data/",
                                                    NetPolicy(require_https=False))


def check_outbound_url_error(url: str, policy: NetPolicy = NetPolicy()) -> str:
    """The refusal for ``url`` with the real resolver (IP literals need no network)."""
    with pytest.raises(ValueError) as info:
        check_outbound_url(url, policy, need_allow_list=False)
    return str(info.value)


def test_one_private_address_among_public_ones_refuses_the_host():
    assert "private" in refused("https://rebind.example.com/", PUBLIC_V4, "10.1.2.3")
    assert "loopback" in refused("https://rebind.example.com/", PUBLIC_V6, "::ffff:127.0.0.1")


def test_allow_flags_open_only_their_own_ranges():
    loopback = NetPolicy(allow_loopback=True)
    assert check("https://svc/", "127.0.0.1", "::1", policy=loopback) == ["127.0.0.1", "::1"]
    assert len(check("https://svc/", "::ffff:127.0.0.1", policy=loopback)) == 1
    assert "private" in refused("https://svc/", "10.0.0.1", policy=loopback)
    private = NetPolicy(allow_private=True)
    assert check("https://svc/", "10.0.0.1", "192.168.0.2", "100.100.0.1", "fd12::1", policy=private)
    assert "loopback" in refused("https://svc/", "127.0.0.1", policy=private)
    everything = NetPolicy(allow_private=True, allow_loopback=True)
    for never in ("169.254.169.254", "fe80::1", "0.0.0.0", "224.0.0.1"):
        refused("https://svc/", never, policy=everything)


def test_localhost_by_name_needs_allow_loopback():
    assert "loopback" in refused("https://localhost/", PUBLIC_V4)
    assert "loopback" in refused("https://api.localhost/", PUBLIC_V4)
    assert check("https://localhost/", "127.0.0.1", policy=NetPolicy(allow_loopback=True)) == ["127.0.0.1"]


def test_unresolvable_host_is_refused():
    def fail(*args, **kwargs):
        raise socket.gaierror("no such host")

    with pytest.raises(ValueError, match="could not be resolved"):
        check_outbound_url("https://nowhere.invalid/", NetPolicy(), resolve=fail, need_allow_list=False)
    assert "no address" in refused("https://empty.example.com/")


# ------------------------------------------------------------------------ scheme, userinfo, list --

def test_scheme_must_be_https_unless_the_policy_allows_http():
    assert "scheme" in refused("http://hooks.example.com/", PUBLIC_V4)
    for url in ("ftp://hooks.example.com/", "file:///etc/passwd", "gopher://x/", "hooks.example.com/x"):
        assert "scheme" in refused(url, PUBLIC_V4, policy=NetPolicy(require_https=False))
    assert check("http://hooks.example.com/", PUBLIC_V4, policy=NetPolicy(require_https=False))


def test_userinfo_control_characters_bad_ports_and_missing_hosts_are_refused():
    assert "credentials" in refused("https://user:pass@hooks.example.com/", PUBLIC_V4)
    assert "credentials" in refused("https://hooks.example.com@10.0.0.1/", PUBLIC_V4)
    assert "control" in refused("https://hooks.example.com/\r\nX-Injected: 1", PUBLIC_V4)
    assert "port" in refused("https://hooks.example.com:99999/", PUBLIC_V4)
    assert "no host" in refused("https:///path", PUBLIC_V4)
    assert "non-empty" in refused("", PUBLIC_V4)


def test_allow_list_is_exact_when_asked_for():
    policy = NetPolicy(allow_hosts=("images.example.com",))
    assert check("https://images.example.com/a.png", PUBLIC_V4, policy=policy, allow_list=True)
    assert check("https://IMAGES.example.com./a.png", PUBLIC_V4, policy=policy, allow_list=True)
    for url in ("https://evil.example.com/a.png", "https://images.example.com.evil.org/a.png",
                "https://sub.images.example.com/a.png"):
        assert "allow-list" in refused(url, PUBLIC_V4, policy=policy, allow_list=True)
    # An allow-listed host still may not resolve to a private address.
    assert "private" in refused("https://images.example.com/a.png", "10.0.0.1", policy=policy,
                                allow_list=True)


# ------------------------------------------------------------------------------ storage sources --

def test_storage_prefixes_match_on_segment_boundaries():
    roots = ("s3://bucket/root",)
    assert check_storage_source("s3://bucket/root/subjects/a.png", roots) == "s3://bucket/root/subjects/a.png"
    assert check_storage_source("s3://bucket/root/", roots) == "s3://bucket/root"
    assert check_storage_source("S3://bucket/root/x", roots) == "s3://bucket/root/x"
    for outside in ("s3://bucket/root2/a.png", "s3://bucket/roo", "s3://other/root/a.png",
                    "gs://bucket/root/a.png", "/bucket/root/a.png", "s3://bucket"):
        with pytest.raises(ValueError, match="not under an allowed storage prefix"):
            check_storage_source(outside, roots)
    assert check_storage_source("gs://b/any/thing", ("s3://bucket/root", "gs://b")) == "gs://b/any/thing"


@pytest.mark.parametrize("uri", ["s3://bucket/root/../secret/a.png", "s3://bucket/root/x/..",
                                 "s3://bucket/root//a.png", "s3://bucket/root/./a.png",
                                 "s3://bucket/root/a\x00.png", "s3://bucket/root\\..\\a.png",
                                 "s3://bucket/root/a%2F..%2Fb", "s3://bucket/root/a?x=1",
                                 "s3://user@bucket/root/a", "s3:///root/a"])
def test_remote_traversal_and_odd_characters_are_refused(uri):
    with pytest.raises(ValueError) as info:
        check_storage_source(uri, ("s3://bucket/root",))
    assert "storage source refused" in str(info.value) and "root" not in str(info.value).split(":", 1)[1]


def test_local_paths_stay_under_their_root(tmp_path):
    root = tmp_path / "root"
    (root / "subjects").mkdir(parents=True)
    (root / "subjects" / "a.png").write_bytes(b"x")
    (tmp_path / "root2").mkdir()
    roots = (str(root),)
    real = os.path.realpath(root / "subjects" / "a.png")
    assert check_storage_source(str(root / "subjects" / "a.png"), roots) == real
    assert check_storage_source(f"file://{root}/subjects/a.png", roots) == real
    for bad, rule in (("/etc/passwd", "not under"), (str(tmp_path / "root2" / "a.png"), "not under"),
                      (f"{root}/subjects/../../root2/a.png", r"'\.\.'"), (f"{root}//subjects", "empty"),
                      ("", "non-empty"), ("file://", "no path")):
        with pytest.raises(ValueError, match=rule):
            check_storage_source(bad, roots)


def test_a_symlink_cannot_lead_out_of_the_root(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    (root / "link.png").symlink_to(secret)
    (root / "dir").symlink_to("/etc")
    for escape in (root / "link.png", root / "dir" / "passwd"):
        with pytest.raises(ValueError, match="not under"):
            check_storage_source(str(escape), (str(root),))


def test_bad_prefix_lists_are_refused():
    with pytest.raises(ValueError, match="no storage prefix"):
        check_storage_source("s3://bucket/root/a", ())
    with pytest.raises(ValueError, match="allowed storage prefix is invalid"):
        check_storage_source("s3://bucket/root/a", ("s3://bucket/root/../",))


# ---------------------------------------------------------------------- HTTP against a real server --

class Recorder(http.server.BaseHTTPRequestHandler):
    """Answers POST /ok with 201, /redirect with a 302 to /target, GET /image with 2 KiB."""

    def do_POST(self):
        self.server.seen.append((self.command, self.path, self.headers.get("Host"),
                                 self.rfile.read(int(self.headers.get("Content-Length", 0)))))
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/target")
        else:
            self.send_response(201)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):
        self.server.seen.append((self.command, self.path, self.headers.get("Host"), b""))
        self.send_response(200)
        self.send_header("Content-Length", "2048")
        self.end_headers()
        self.wfile.write(b"\x89PNG" + bytes(2044))

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    httpd.seen = []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


LOCAL = NetPolicy(allow_loopback=True, require_https=False)


def test_safe_post_returns_the_status_and_never_follows_a_redirect(server):
    port = server.server_address[1]
    assert safe_post(f"http://127.0.0.1:{port}/ok", b'{"a":1}', {"content-type": "application/json"},
                     LOCAL, 2.0) == 201
    assert safe_post(f"http://127.0.0.1:{port}/redirect", b"{}", {}, LOCAL, 2.0) == 302
    assert [(m, p) for m, p, _, _ in server.seen] == [("POST", "/ok"), ("POST", "/redirect")]
    assert server.seen[0][3] == b'{"a":1}'


def test_safe_post_is_refused_before_connecting_without_allow_loopback(server):
    port = server.server_address[1]
    with pytest.raises(ValueError, match="loopback"):
        safe_post(f"http://127.0.0.1:{port}/ok", b"{}", {}, NetPolicy(require_https=False), 2.0)
    with pytest.raises(ValueError, match="scheme"):
        safe_post(f"http://127.0.0.1:{port}/ok", b"{}", {}, NetPolicy(allow_loopback=True), 2.0)
    assert server.seen == []


def test_safe_post_connects_to_the_checked_address_and_keeps_the_host_name(server):
    port, calls = server.server_address[1], []
    status = safe_post(f"http://hooks.example.test:{port}/ok?k=v#frag", b"{}", {}, LOCAL, 2.0,
                       resolve=resolver("127.0.0.1", calls=calls))
    assert status == 201 and calls == ["hooks.example.test"]  # resolved once: no second lookup to rebind
    assert server.seen == [("POST", "/ok?k=v", f"hooks.example.test:{port}", b"{}")]


def test_safe_post_connection_refused_raises_oserror():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(OSError):
        safe_post(f"http://127.0.0.1:{port}/", b"{}", {}, LOCAL, 1.0)


def test_safe_get_reads_allow_listed_hosts_within_a_size_bound(server):
    port = server.server_address[1]
    policy = NetPolicy(allow_hosts=("images.example.test",), allow_loopback=True, require_https=False)
    url = f"http://images.example.test:{port}/image"
    data = safe_get(url, policy, 2.0, 4096, resolve=resolver("127.0.0.1"))
    assert data.startswith(b"\x89PNG") and len(data) == 2048
    with pytest.raises(ValueError, match="larger than 1000 bytes"):
        safe_get(url, policy, 2.0, 1000, resolve=resolver("127.0.0.1"))
    with pytest.raises(ValueError, match="allow-list"):
        safe_get(f"http://127.0.0.1:{port}/image", LOCAL, 2.0, 4096)
    with pytest.raises(ValueError, match="timeout_s"):
        safe_get(url, policy, 0, 4096, resolve=resolver("127.0.0.1"))
