"""Running the web app with uvicorn: in the foreground (``pivotseg serve``) or on a thread
(tests, the screenshot script)."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time

from pivotseg.errors import ConfigError


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_port(host: str, port: int) -> None:
    """Refuse a port already taken, with the fix (uvicorn would log it and exit)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            raise ConfigError(
                f"--port {port} on {host}: cannot listen there ({err.strerror}); "
                "pass another --port, or stop what is using it"
            ) from None


def serve_forever(app, host: str, port: int) -> None:
    """Serve until Ctrl+C."""
    import uvicorn

    check_port(host, port)
    shown = f"[{host}]" if ":" in host else host
    print(f"pivotseg serve: open http://{shown}:{port} (Ctrl+C stops)", flush=True)
    if not is_loopback(host):
        print(
            f"pivotseg serve: listening on {host}: anyone who can reach this machine can use it",
            flush=True,
        )
    uvicorn.run(app, host=host, port=port, log_level="warning")


class BackgroundServer:
    """The app served on a thread, on a free port of ``host``: ``with BackgroundServer(app) as
    url: ...`` (the server stops when the block ends)."""

    def __init__(self, app, host: str = "127.0.0.1", timeout: float = 30.0):
        import uvicorn

        config = uvicorn.Config(app, host=host, port=0, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.host, self.timeout = host, timeout
        self.thread = threading.Thread(target=self.server.run, name="pivotseg-serve-http")
        self.url = ""

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + self.timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the web app's server did not start (see the log above)")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{self.host}:{port}"
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(self.timeout)
