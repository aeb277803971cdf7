"""A real uvicorn server on 127.0.0.1 in a thread, with the settings' transport options (timeouts, caps)."""

from __future__ import annotations

import socket
import threading
import time


class HardenedServer:
    def __init__(self, settings, engine=None):
        import uvicorn

        from edge.server.app import create_app
        from edge.server.guards import uvicorn_options

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.settings = settings.replace(port=self.port)
        self.app = create_app(self.settings, engine)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                **uvicorn_options(self.settings))
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 300
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")
