"""Shared fixtures: the tiny random model, built once per session, and quiet torch threading."""

import os
import tempfile

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Commands run in-process write their log files here, not into ~/.cache/dreamblend/logs.
os.environ.setdefault("DREAMBLEND_LOG_DIR", tempfile.mkdtemp(prefix="dreamblend-test-logs-"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_components():
    from dreamblend_ray.models.components import build_tiny_components

    return build_tiny_components(seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_components):
    """The tiny model saved in diffusers layout, for tests that load from a path."""
    from dreamblend_ray.models.components import save_components

    return save_components(tiny_components, tmp_path_factory.mktemp("tiny-model"))


# ---------------------------------------------------------------------------------------------
# Issue 5: a real HTTP S3 endpoint on loopback (moto) behind a proxy that can refuse connections,
# and one local Ray cluster shared by the job tests.
# ---------------------------------------------------------------------------------------------
import socket  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FlakyProxy:
    """A TCP proxy on a fixed loopback port in front of moto that can go down and come back.

    While down, its port is closed, so clients get "connection refused"; open connections are cut.
    ``outage_after(marker, seconds)`` arms an outage that starts when a request containing
    ``marker`` (e.g. a key prefix) arrives: that request is cut and the port stays closed for
    ``seconds``; ``outages`` counts the outages that happened.
    """

    def __init__(self, target: tuple[str, int]):
        self.target, self.port = target, free_port()
        self.outages, self._armed = 0, None
        self._lock = threading.Lock()
        self._listener = None
        self._conns: set[socket.socket] = set()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        listener.settimeout(0.1)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, set()
        if listener is not None:
            listener.close()
        for conn in conns:
            _close(conn)

    def outage(self, seconds: float) -> None:
        """Go down now and come back after ``seconds`` (in the background)."""
        self.outages += 1
        self.stop()
        threading.Timer(seconds, self.start).start()

    def outage_after(self, marker: bytes, seconds: float) -> None:
        self._armed = (marker, seconds)

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except (socket.timeout, OSError):
                continue
            client.settimeout(None)
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._conns.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while data := src.recv(65536):
                armed = self._armed
                if from_client and armed and armed[0] in data:
                    self._armed = None
                    self.outage(armed[1])
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _close(src)
            _close(dst)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class S3Server:
    """moto's threaded S3 server plus the proxy that tests talk to (``endpoint``)."""

    def __init__(self, moto_server, proxy: FlakyProxy):
        import boto3

        self.moto, self.proxy, self.endpoint = moto_server, proxy, proxy.endpoint
        host, port = moto_server.get_host_and_port()
        self.direct_endpoint = f"http://{host}:{port}"
        self.client = boto3.client("s3", endpoint_url=self.direct_endpoint, region_name="us-east-1")

    def new_bucket(self, prefix: str = "test") -> str:
        """A fresh, empty bucket's name."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client.create_bucket(Bucket=name)
        return name


S3_TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_REGION": "us-east-1", "DREAMBLEND_STORAGE_RETRY_SECONDS": "20"}


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 on 127.0.0.1 behind a FlakyProxy; the process environment points at the proxy."""
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        for name, value in S3_TEST_ENV.items():
            mp.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(name, raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        proxy = FlakyProxy(server.get_host_and_port())
        proxy.start()
        mp.setenv("DREAMBLEND_S3_ENDPOINT", proxy.endpoint)
        try:
            yield S3Server(server, proxy)
        finally:
            proxy.stop()
            server.stop()


@pytest.fixture()
def s3_bucket(s3_server):
    """A fresh bucket; its ``s3://`` URI."""
    return f"s3://{s3_server.new_bucket()}"


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One local Ray (2 CPUs, no dashboard) for the session; workers see the S3 test endpoint."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    env = {**S3_TEST_ENV, "DREAMBLEND_S3_ENDPOINT": s3_server.endpoint, "TOKENIZERS_PARALLELISM": "false"}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env}, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module (use with pytest.mark.usefixtures): its tiny models gain
    nothing from a second thread, and on a loaded 2-core machine two threads are far slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
