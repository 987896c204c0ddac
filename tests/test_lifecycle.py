"""How commands stop (issue 23 items 2-3, issue 16 item 8): SIGTERM/SIGINT whatever their inherited
disposition, a bounded grace period, no process left behind (SIGKILL of the driver included), and a
console without library chatter.

Processes are looked up by a marker in their environment and by descent, never by name: every
process a command starts (Ray's included) inherits DREAMBLEND_TEST_MARKER from it.
"""

import contextlib
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from dreamblend_ray.runtime import lifecycle

REPO = Path(__file__).resolve().parents[1]
DREAMBLEND = str(Path(sys.executable).with_name("dreamblend"))
# Starts argv with SIGINT ignored, as a shell starts a background job.
IGNORING_SIGINT = ["-c", "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                         "os.execvp(sys.argv[1], sys.argv[1:])"]


def marked(marker: str) -> list[int]:
    """The living processes that carry ``marker`` in their environment or descend from one that
    does, and those seen so before that still run (Ray's agents overwrite their environment with
    their process title, so once the raylet is gone only an earlier look finds them)."""
    table = process_table()
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    needle = f"DREAMBLEND_TEST_MARKER={marker}".encode()
    todo = [pid for pid in table if needle in environment(pid)]
    seen, visited = SEEN.setdefault(marker, {}), set()
    while todo:
        pid = todo.pop()
        if pid not in visited:
            visited.add(pid)
            seen[pid] = table[pid][1]
            todo.extend(children.get(pid, ()))
    return sorted(pid for pid, start in seen.items() if pid in table and table[pid][1] == start)


SEEN: dict[str, dict[int, int]] = {}  # marker -> pid -> start time of every process marked() found


def process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, start time) of every living, non-zombie process."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_bytes()
            except OSError:
                continue
            fields = stat[stat.rindex(b")") + 2:].split()
            if fields[0] not in (b"Z", b"X"):
                table[int(entry)] = (int(fields[1]), int(fields[19]))
    return table


def environment(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return []


def describe(pids: list[int]) -> list[str]:
    names = []
    for pid in pids:
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:80].decode()
            names.append(f"{pid} {command}")
        except OSError:
            pass
    return names


def wait_until_gone(marker: str, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        left = marked(marker)
        if not left:
            return []
        time.sleep(0.25)
    return marked(marker)


class Background:
    """A command started the way a process manager or a shell's `cmd &` starts it."""

    def __init__(self, argv: list[str], tmp_path: Path, **env):
        self.marker = uuid.uuid4().hex
        self.output = tmp_path / f"console-{self.marker[:8]}.txt"
        full_env = {**os.environ, "DREAMBLEND_TEST_MARKER": self.marker, "DREAMBLEND_LOG_DIR": str(tmp_path),
                    **env}
        with open(self.output, "wb") as out:
            self.process = subprocess.Popen([sys.executable, *IGNORING_SIGINT, *argv], cwd=REPO, env=full_env,
                                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def console(self) -> str:
        return self.output.read_text(errors="replace")

    def wait_for(self, ready, timeout_s: float = 240.0, what: str = "start-up") -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"exited with {self.process.returncode} during {what}:\n{self.console()[-3000:]}")
            if ready():
                marked(self.marker)  # note the processes it started, while their parents live
                return
            time.sleep(0.5)
        self.kill()
        pytest.fail(f"no {what} within {timeout_s} s:\n{self.console()[-3000:]}")

    def kill(self) -> None:
        for pid in marked(self.marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture()
def background(tmp_path):
    started = []

    def start(argv, **env):
        started.append(Background(argv, tmp_path, **env))
        return started[-1]

    yield start
    for command in started:  # never leave anything behind, whatever the test's outcome
        command.kill()


def healthz_answers(port: int):
    import httpx

    def ready():
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False
    return ready


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------- no Ray: signals and the reaper

DRIVER = textwrap.dedent("""
    import os, subprocess, sys, time
    from dreamblend_ray.runtime import lifecycle

    lifecycle.setup_logging("test", log_file=sys.argv[1])
    marker = "{marker}"

    def body():
        reaper = lifecycle.Reaper(marker)
        env = dict(os.environ, DREAMBLEND_CLUSTER_ID=marker)
        stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
        # like Ray's agents: a grandchild whose environment no longer shows the marker, left with
        # parent 1 when its parent (marked) exits 3 s later, before the driver is killed
        orphaning = ("import os, subprocess, sys, time; env = dict(os.environ); env.pop('DREAMBLEND_CLUSTER_ID'); "
                     "subprocess.Popen([sys.executable, '-c', %r], env=env, start_new_session=True); "
                     "time.sleep(3)" % stubborn)
        for code in ("import time; time.sleep(600)", stubborn, orphaning):
            # a child that outlives its parent, like Ray's agents
            subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True)
        print("UP", flush=True)
        try:
            lifecycle.wait_for_shutdown()
        finally:
            {finally_body}
            reaper.close(10)

    sys.exit(lifecycle.run_command(body, grace_s={grace}))
""")


def start_driver(background, tmp_path, finally_body="pass", grace=10):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(marker=uuid.uuid4().hex, finally_body=finally_body, grace=grace))
    command = background([sys.executable, str(script), str(tmp_path / "driver.log")])
    command.wait_for(lambda: "UP" in command.console(), timeout_s=60)
    time.sleep(0.5)  # the reaper's interpreter is up
    return command


RESPAWNER = textwrap.dedent("""
    import signal, subprocess, sys, time
    def respawn(*_):  # like a parent that restarts its agent when told to stop
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, respawn)
    print("UP", flush=True)
    time.sleep(600)
""")


def test_sweep_also_ends_processes_started_after_its_first_scan():
    marker = uuid.uuid4().hex
    env = dict(os.environ, **{lifecycle.MARKER_ENV: marker})
    parent = subprocess.Popen([sys.executable, "-c", RESPAWNER], env=env, stdout=subprocess.PIPE)
    try:
        assert parent.stdout.readline().strip() == b"UP"
        assert lifecycle.sweep(marker, term_wait_s=1.0) == 0
        assert lifecycle.marked_pids(marker) == set()
    finally:
        for pid in lifecycle.marked_pids(marker):
            os.kill(pid, signal.SIGKILL)
        parent.wait(timeout=10)


STUBBORN_ORPHAN = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    env = dict(os.environ)
    env.pop("DREAMBLEND_CLUSTER_ID")  # as if its title had overwritten its environment
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    child = subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True)
    print(child.pid, flush=True)
    time.sleep(600)
""")


def test_sweep_ends_an_unmarked_descendant_seen_before_its_parent_died():
    marker = uuid.uuid4().hex
    env = dict(os.environ, **{lifecycle.MARKER_ENV: marker})
    parent = subprocess.Popen([sys.executable, "-c", STUBBORN_ORPHAN], env=env, stdout=subprocess.PIPE)
    child = int(parent.stdout.readline())
    try:
        assert lifecycle.marked_pids(marker) == {parent.pid}
        known = lifecycle.cluster_processes(marker)
        assert set(known) == {parent.pid, child}
        parent.kill()
        parent.wait(timeout=10)
        assert lifecycle.marked_pids(marker) == set() and lifecycle.living({child: known[child]})
        assert lifecycle.sweep(marker, known, term_wait_s=0.5) == 0
        assert not lifecycle.living({child: known[child]})
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def test_a_reused_pid_is_not_taken_for_the_process_seen_before():
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        parent, start = lifecycle.identity(sleeper.pid)
        assert parent == os.getpid()
        assert lifecycle.living({sleeper.pid: start}) == {sleeper.pid: start}
        assert lifecycle.living({sleeper.pid: start + 1}) == {}  # another process under the same pid
    finally:
        sleeper.kill()
        sleeper.wait(timeout=10)
    assert lifecycle.identity(sleeper.pid) is None


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_stops_a_command_that_inherited_sigint_ignored(background, tmp_path, signum, code):
    command = start_driver(background, tmp_path)
    assert len(marked(command.marker)) >= 4  # the driver, the reaper, two children
    command.process.send_signal(signum)
    assert command.process.wait(timeout=20) == code
    left = wait_until_gone(command.marker, 10)
    assert not left, describe(left)
    assert f"{signal.Signals(signum).name}: shutting down" in command.console()


@pytest.mark.slow
def test_sigkill_of_the_driver_leaves_no_process(background, tmp_path):
    command = start_driver(background, tmp_path)
    time.sleep(4)  # the orphaning child has exited: its grandchild is unmarked, with parent 1
    command.process.kill()
    left = wait_until_gone(command.marker, 15)
    assert not left, describe(left)


@pytest.mark.slow
def test_clean_up_that_outruns_the_grace_period_is_cut_short(background, tmp_path):
    command = start_driver(background, tmp_path, finally_body="time.sleep(600)", grace=2)
    start = time.monotonic()
    command.process.terminate()
    assert command.process.wait(timeout=20) == 143
    assert time.monotonic() - start < 10
    left = wait_until_gone(command.marker, 15)
    assert not left, describe(left)
    assert "did not finish within the 2 s grace period" in command.console()


@pytest.mark.slow
def test_a_second_signal_stops_at_once(background, tmp_path):
    command = start_driver(background, tmp_path, finally_body="time.sleep(600)", grace=60)
    command.process.terminate()
    time.sleep(1.0)
    command.process.terminate()
    assert command.process.wait(timeout=10) == 143
    left = wait_until_gone(command.marker, 15)
    assert not left, describe(left)


# --------------------------------------------------------------------------- logging

@pytest.fixture()
def our_handlers():
    yield
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "dreamblend", False):
            root.removeHandler(handler)
            handler.close()


@pytest.mark.parametrize("verbose", [False, True])
def test_library_chatter_goes_to_the_log_file(tmp_path, capsys, our_handlers, verbose):
    path = lifecycle.setup_logging("test", log_file=str(tmp_path / "x.log"), verbose=verbose)
    logging.getLogger("httpx").info("HTTP Request: POST http://127.0.0.1/v1/generate")
    logging.getLogger("ray.serve").info("Started Serve")
    logging.getLogger("dreamblend_ray.demo").info("step 1/3")
    logging.getLogger("diffusers").warning("your scheduler config is odd")
    console, log = capsys.readouterr().err, path.read_text()
    for line in ("HTTP Request", "Started Serve", "step 1/3", "scheduler config", f"log file: {path}"):
        assert line in log
    for line in ("step 1/3", "scheduler config", f"log file: {path}"):
        assert line in console
    assert ("HTTP Request" in console) == verbose and ("Started Serve" in console) == verbose


def test_grace_period_is_checked(monkeypatch):
    assert lifecycle.grace_period_s() == lifecycle.DEFAULT_GRACE_S
    monkeypatch.setenv(lifecycle.GRACE_ENV, "12.5")
    assert lifecycle.grace_period_s() == 12.5
    assert lifecycle.grace_period_s(5) == 5.0
    monkeypatch.setenv(lifecycle.GRACE_ENV, "soon")
    with pytest.raises(ValueError, match=lifecycle.GRACE_ENV):
        lifecycle.grace_period_s()
    with pytest.raises(ValueError, match="grace period"):
        lifecycle.grace_period_s(0)


# --------------------------------------------------------------------------- with Ray (slow)

def log_file(tmp_path: Path, command: str) -> str:
    paths = sorted(tmp_path.glob(f"{command}-*.log"))
    assert paths, f"no {command} log file in {tmp_path}"
    return paths[-1].read_text(errors="replace")


def start_serve(background, tmp_path):
    port = free_port()
    command = background([DREAMBLEND, "serve", "--base", "tiny", "--storage-root", str(tmp_path / "store"),
                          "--port", str(port), "--grace-period", "30"])
    command.wait_for(healthz_answers(port), what="/healthz")
    return command


@pytest.mark.slow
def test_serve_stops_on_sigterm_in_order_and_leaves_no_process(background, tmp_path):
    command = start_serve(background, tmp_path)
    assert any("raylet" in name for name in describe(marked(command.marker)))
    start = time.monotonic()
    command.process.terminate()
    assert command.process.wait(timeout=40) == 143
    left = wait_until_gone(command.marker, max(1.0, 30 - (time.monotonic() - start)))
    assert not left, describe(left)
    console = command.console()
    assert "(raylet)" not in console and "killed by `ray.kill`" not in console  # an orderly stop
    assert "Started Serve" not in console  # Serve's INFO chatter is in the log file
    log = log_file(tmp_path, "serve")
    assert "Started Serve" in log and "Deleting app" in log


@pytest.mark.slow
def test_sigkill_of_the_serve_driver_leaves_no_process(background, tmp_path):
    command = start_serve(background, tmp_path)
    command.process.kill()
    left = wait_until_gone(command.marker, 15)
    assert not left, describe(left)


SLOW_APP = textwrap.dedent("""
    import asyncio, sys
    from ray import serve
    from dreamblend_ray.runtime import lifecycle

    @serve.deployment(graceful_shutdown_timeout_s=20)
    class Slow:
        async def __call__(self, request):
            await asyncio.sleep(float(request.query_params.get("s", "0")))
            return "done"

    def body():
        lifecycle.init_ray(num_cpus=2, object_store_memory=200_000_000)
        try:
            lifecycle.start_serve("127.0.0.1", int(sys.argv[1]))
            serve.run(Slow.bind(), name="slow", route_prefix="/")
            print("UP", flush=True)
            lifecycle.wait_for_shutdown()
        finally:
            lifecycle.stop_serve()

    lifecycle.setup_logging("slow-app")
    sys.exit(lifecycle.run_command(body, grace_s=30))
""")


@pytest.mark.slow
def test_in_flight_requests_finish_after_sigterm_and_new_ones_are_turned_away(background, tmp_path):
    import concurrent.futures

    import httpx

    script, port = tmp_path / "slow_app.py", free_port()
    script.write_text(SLOW_APP)
    command = background([sys.executable, str(script), str(port)])
    command.wait_for(lambda: "UP" in command.console())
    url = f"http://127.0.0.1:{port}/"
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        in_flight = pool.submit(httpx.get, url, params={"s": 6}, timeout=60)
        time.sleep(2.0)  # the request is in the replica
        command.process.terminate()
        time.sleep(1.0)
        late = httpx.get(url, timeout=30)
        answer = in_flight.result()
    assert answer.status_code == 200 and answer.text == "done"
    assert late.status_code == 404  # the application is gone; the request was answered, not dropped
    assert command.process.wait(timeout=40) == 143
    left = wait_until_gone(command.marker, 20)
    assert not left, describe(left)


def write_subjects(tmp_path: Path) -> Path:
    import json

    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i, colour in enumerate(("red", "blue")):
        Image.new("RGB", (32, 32), colour).save(images / f"{i}.png")
    manifest = tmp_path / "subjects.jsonl"
    manifest.write_text(json.dumps({"subject_id": "alpha", "class_noun": "ball",
                                    "images": [str(p) for p in sorted(images.iterdir())]}) + "\n")
    return manifest


def sigterm_while_actor_runs(command, actor: str, grace_s: float = 30) -> None:
    """SIGTERM once ``actor`` runs; the command exits 143 and leaves no marked process within the grace."""
    command.wait_for(lambda: any(actor in name for name in describe(marked(command.marker))), what=actor)
    time.sleep(2.0)
    start = time.monotonic()
    command.process.terminate()
    assert command.process.wait(timeout=grace_s + 10) == 143
    left = wait_until_gone(command.marker, max(1.0, grace_s - (time.monotonic() - start)))
    assert not left, describe(left)


@pytest.mark.slow
@pytest.mark.parametrize("command_line", ["job", "demo"])
def test_finetune_job_stops_on_sigterm_and_leaves_no_process(background, tmp_path, command_line):
    """The fine-tune job, alone or inside `dreamblend demo`, stopped while its actor trains."""
    if command_line == "job":
        argv = [sys.executable, "jobs/finetune_subjects.py", "--subjects", str(write_subjects(tmp_path)),
                "--output", str(tmp_path / "out"), "--base", "tiny", "--steps", "100000",
                "--no-prior-preservation", "--grace-period", "30"]
    else:
        argv = [DREAMBLEND, "demo", "--base", "tiny", "--subjects", "striped-star", "--finetune-steps", "100000",
                "--out", str(tmp_path / "demo"), "--grace-period", "30"]
    command = background(argv)
    sigterm_while_actor_runs(command, "FinetuneActor")
    assert "SIGTERM: shutting down" in command.console()


@pytest.mark.slow
def test_generate_job_stops_on_sigterm_and_leaves_no_process(background, tmp_path):
    """The generate job stopped while its actor samples (1000 DDIM steps: long enough to catch)."""
    import json

    from PIL import Image

    from dreamblend_ray.config import FinetuneConfig
    from dreamblend_ray.training.finetune import finetune_subject

    store = tmp_path / "store"
    image = tmp_path / "red.png"
    Image.new("RGB", (32, 32), "red").save(image)
    finetune_subject("tiny", [str(image)], "ball", "alpha", str(store),
                     FinetuneConfig(steps=2, prior_preservation=False), progress=False)
    requests_file = tmp_path / "requests.jsonl"
    requests_file.write_text(json.dumps({"subject_id": "alpha", "prompt": "a sks ball", "seed": 0}) + "\n")
    command = background([sys.executable, "jobs/generate_batch.py", "--requests", str(requests_file),
                          "--output", str(store), "--base", "tiny", "--steps", "1000", "--grace-period", "30"])
    sigterm_while_actor_runs(command, "GenerateActor")


@pytest.mark.slow
def test_demo_console_shows_steps_not_library_chatter(background, tmp_path):
    out = tmp_path / "demo"
    # The console is what is checked here; the probe and the heat maps are tests/test_demo.py's.
    command = background([DREAMBLEND, "demo", "--base", "tiny", "--subjects", "striped-star", "--finetune-steps",
                          "3", "--steps", "3", "--contexts", "1", "--no-attention-probe", "--no-attention-maps",
                          "--out", str(out)])
    assert command.process.wait(timeout=600) == 0, command.console()[-3000:]
    console, log = command.console(), (out / "dreamblend.log").read_text()
    assert f"log file: {out / 'dreamblend.log'}" in console
    assert "step 1/3" in console and "grid.png" in console and "demo requests" in console  # steps, bar, outputs
    for chatter in ("httpx", "HTTP Request", "(raylet)", "Started Serve", "Running Dataset"):
        assert chatter not in console, chatter
    assert "HTTP Request: POST" in log and "Started Serve" in log
    left = wait_until_gone(command.marker, 10)
    assert not left, describe(left)
