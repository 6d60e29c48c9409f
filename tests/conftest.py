from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

from gateway.app import create_app
from gateway.config import load_policy, load_settings
from gateway.settings import Settings
from policies.schema import Policy

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def settings(tmp_path, monkeypatch) -> Settings:
    for key in [k for k in __import__("os").environ if k.startswith("IMAGEGW_")]:
        monkeypatch.delenv(key)
    s = load_settings(ROOT / "config")
    s.data_dir = tmp_path / "data"
    s.audit.flush_interval_s = 0.02
    s.sandbox.mode = "off"  # providers unconfigured unless a test turns the sandbox on
    return s


@pytest.fixture
def shipped_policy(settings) -> Policy:
    return load_policy(settings)


class RunningServer:
    """A real uvicorn server on a free port in a background thread."""

    def __init__(self, app, port: int):
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, timeout: float = 120.0) -> RunningServer:
        """Returns once /readyz says every backend is past warming."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                r = httpx.get(self.base_url + "/readyz", timeout=1)
                if r.status_code == 200 and not r.json()["warming"]:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server did not become ready")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        if self.thread.is_alive():  # a connection or a drain held it past 30 s: cut it, as a second Ctrl-C does
            self.server.force_exit = True
            self.thread.join(timeout=15)
        if self.thread.is_alive():
            import warnings  # listed in pytest's summary (a teardown's print is shown only if its test fails)

            warnings.warn(f"the server on port {self.port} did not stop within 45 s: its shutdown hangs",
                          stacklevel=2)


@pytest.fixture
def serve():
    """Start create_app(...) on a real port; stopped (and drained) at teardown."""
    servers: list[RunningServer] = []

    def _serve(settings: Settings, policy: Policy, backends=None) -> RunningServer:
        server = RunningServer(create_app(settings, policy, backends), free_port()).start()
        servers.append(server)
        return server

    yield _serve
    for server in servers:
        server.stop()


POSTGRES_DSN = __import__("os").environ.get("IMAGEGW_TEST_POSTGRES",
                                           "host=127.0.0.1 port=5432 dbname=test user=postgres")


@pytest.fixture
def postgres_dsn():
    """A DSN on the real Postgres (127.0.0.1:5432, database test) whose tables live in a schema of their own,
    dropped afterwards: tests never see each other's rows."""
    import uuid

    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_DSN, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    yield f"{POSTGRES_DSN} options='-csearch_path={schema}'"
    with psycopg.connect(POSTGRES_DSN, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


_THREAD_ORIGIN: dict[int, str] = {}  # thread ident -> the test during which it started


@pytest.fixture(autouse=True)
def _note_new_threads(request):
    """Remember which test started each thread still alive after it (set up first, so torn down last)."""
    import threading

    before = {t.ident for t in threading.enumerate()}
    yield
    for t in threading.enumerate():
        if t.ident not in before:
            _THREAD_ORIGIN.setdefault(t.ident, request.node.nodeid)


def pytest_sessionfinish(session, exitstatus):
    """Name what a run leaves behind: a thread still alive at exit is a leak, and one that runs native code while
    the interpreter finalises can crash it after every test has passed."""
    import threading

    left = [t for t in threading.enumerate() if t is not threading.main_thread()]
    if left:
        names = "\n  ".join(f"{t.name}{' (daemon)' if t.daemon else ''}: {_THREAD_ORIGIN.get(t.ident, '?')}"
                             for t in left)
        print(f"\n[conftest] threads alive at the end of the session:\n  {names}")
        if any(t.name.endswith("(run)") for t in left):  # a server still running: show where it is stuck
            import faulthandler
            import sys

            faulthandler.dump_traceback(file=sys.__stderr__, all_threads=True)
    session.config._imagegw_exitstatus = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """End the process with pytest's verdict once every hook has run, without the interpreter's teardown.

    That teardown is not under test: it runs beside the daemon threads tests leave (a server that would not stop,
    the tqdm monitor, proxy accept loops), and once it crashed with SIGSEGV after "523 passed", failing CI on a
    green suite. The gateway's own shutdown is tested where it matters (tests/resilience/test_shutdown.py).
    """
    import os
    import sys

    status = getattr(config, "_imagegw_exitstatus", None)
    if status is None:  # the session never ran (--help, a usage error): let pytest end as usual
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
