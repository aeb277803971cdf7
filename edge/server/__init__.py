"""OpenAI-compatible HTTP + WebSocket server (optional: `pip install minicpmo-edge[server]`).

Nothing here is imported by `import edge`; this package imports fastapi/uvicorn only when an app is built, so
`edge.server.settings` stays importable by the CLI without the server extra.
"""

from __future__ import annotations

__all__ = ["ServerSettings", "create_app", "serve"]


def __getattr__(name: str):
    if name == "ServerSettings":
        from edge.server.settings import ServerSettings

        return ServerSettings
    if name in ("create_app", "serve"):
        try:
            from edge.server import app
        except ImportError as e:
            raise ImportError(f"the server needs its extra dependencies ({e.name} is missing): "
                              "pip install 'minicpmo-edge[server]'") from e
        return getattr(app, name)
    raise AttributeError(name)
