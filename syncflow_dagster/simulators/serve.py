"""Run a stand-in ASGI app under uvicorn: in a background thread for tests, blocking for the CLI.

`start_server` binds the socket itself (port 0 picks a free port), so the URL is
known before uvicorn starts, then waits, bounded in time, until uvicorn says it
is serving. `run_server` is the blocking form used by `syncflow simulate ...`.
"""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType

import uvicorn
from starlette.types import ASGIApp

STARTUP_TIMEOUT_S = 30.0
SHUTDOWN_TIMEOUT_S = 10.0


def _config(app: ASGIApp, host: str, port: int, log_level: str) -> uvicorn.Config:
    # httptools + uvloop are installed and make the stand-ins several times
    # faster than h11 + asyncio, which matters for the 1M-row benchmarks.
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        http="httptools",
        loop="uvloop",
        ws="none",
        lifespan="on",
        timeout_keep_alive=30,
        # Bulk batches in Arrow can be large; uvicorn has no body limit of its
        # own, the apps enforce theirs (413).
    )


class RunningServer:
    """A uvicorn server running in a daemon thread; `url` is its base URL."""

    def __init__(self, server: uvicorn.Server, thread: threading.Thread, sock: socket.socket, url: str):
        self._server = server
        self._thread = thread
        self._socket = sock
        self.url = url

    @property
    def port(self) -> int:
        return int(self._socket.getsockname()[1])

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(SHUTDOWN_TIMEOUT_S)
        if self._thread.is_alive():
            # Open keep-alive connections can hold a graceful exit; force it.
            self._server.force_exit = True
            self._thread.join(SHUTDOWN_TIMEOUT_S)
        self._socket.close()

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_server(
    app: ASGIApp, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning"
) -> RunningServer:
    """Serve `app` on host:port in a background thread; returns once it accepts connections."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound_port = sock.getsockname()[1]
    server = uvicorn.Server(_config(app, host, bound_port, log_level))
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{bound_port}", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not server.started:
        if not thread.is_alive():
            sock.close()
            raise RuntimeError(f"server on {host}:{bound_port} exited during startup")
        if time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError(f"server on {host}:{bound_port} did not start within {STARTUP_TIMEOUT_S}s")
        time.sleep(0.01)
    return RunningServer(server, thread, sock, f"http://{host}:{bound_port}")


def run_server(app: ASGIApp, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info") -> None:
    """Serve `app` in the foreground until interrupted (the `syncflow simulate` commands)."""
    uvicorn.Server(_config(app, host, port, log_level)).run()
