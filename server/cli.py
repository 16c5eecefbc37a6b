"""`hostler serve | pull | models`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
from typing import Any

from server import __version__
from server.config import Settings, load_settings
from server.errors import ConfigError, DownloadError, HostlerError


def _serve_flags(p: argparse.ArgumentParser) -> None:
    """One flag per Settings field, named after it (documented from its description)."""
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = f"{field.description} (env HOSTLER_{name.upper()})"
        if field.annotation in (bool, bool | None):
            p.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        elif name in ("cors_origins", "allowed_hosts"):
            p.add_argument(flag, nargs="*", default=None, help=help_text)
        elif name == "keys":
            p.add_argument(flag, type=json.loads, default=None, help=help_text + " (JSON)")
        else:
            p.add_argument(flag, default=None, help=help_text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hostler", description="Serve local GGUF models.")
    parser.add_argument("--version", action="version", version=f"hostler {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the OpenAI/OpenRouter-compatible server")
    _serve_flags(serve)
    pull = sub.add_parser("pull", help="download a model listed in models.yaml")
    pull.add_argument("name", help="model name or alias")
    pull.add_argument("--models-file", default=None)
    pull.add_argument("--quiet", action="store_true", help="no progress bar")
    models = sub.add_parser("models", help="list models and whether they are downloaded")
    models.add_argument("--models-file", default=None)
    return parser


def _settings_from(args: argparse.Namespace) -> tuple[Settings, Any]:
    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
    return load_settings(overrides)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.api import create_app
    from server.registry import Registry, local_file

    settings, models_file = _settings_from(args)
    # The engine thread and the event loop share the GIL; a short switch interval keeps
    # the engine from waiting up to 5 ms for the loop between llama.cpp calls.
    sys.setswitchinterval(0.0005)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    registry = Registry(models_file)
    if settings.model is None:
        present = [s.id for s in registry if local_file(s) is not None]
        if not present:
            print("no model is downloaded; run `hostler pull NAME` first", file=sys.stderr)
            return 2
        settings = settings.model_copy(update={"model": present[0]})
    spec = registry.get(settings.model or "")
    if local_file(spec) is None:
        print(f"model '{spec.id}' is not downloaded; run `hostler pull {spec.id}`", file=sys.stderr)
        return 2
    # Bind before the model loads: a port in use is reported at once, not after a
    # 12B model has spent a minute loading.
    try:
        listener = _bind(settings.host, settings.port)
    except OSError as exc:
        print(
            f"hostler: cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 2
    app = create_app(settings, models_file)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.shutdown_grace) + 5,
    )

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if app.state.draining:
                # A second Ctrl-C: the user wants out now, not tracebacks of every task
                # being torn down. Cache files are written atomically, so none is torn.
                print("hostler: second signal, exiting now", file=sys.stderr, flush=True)
                os._exit(1)
            # From the first signal on, new requests get 503 while streams finish.
            app.state.draining = True
            super().handle_exit(sig, frame)

    server = _Server(config)
    # uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown; with these handlers
    # in place that re-raise is a no-op, so a clean shutdown exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=[listener])
    if app.state.startup_error:
        print(f"hostler: {app.state.startup_error}", file=sys.stderr)
        return 1
    return 0 if server.started else 1


def _bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (listening starts when the server starts)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _pull(args: argparse.Namespace) -> int:
    from server.registry import Registry, download

    _, models_file = load_settings({"models_file": args.models_file})
    spec = Registry(models_file).get(args.name)
    path = download(spec, progress=not args.quiet)
    print(f"{spec.id}: {path}")
    return 0


def _models(args: argparse.Namespace) -> int:
    from server.registry import Registry, local_file

    _, models_file = load_settings({"models_file": args.models_file})
    rows = [("MODEL", "STATUS", "SIZE", "ALIASES")]
    for spec in Registry(models_file):
        path = local_file(spec)
        size = f"{path.stat().st_size / 2**20:.0f} MiB" if path else "-"
        rows.append((spec.id, "present" if path else "missing", size, ", ".join(spec.aliases)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "pull":
            return _pull(args)
        return _models(args)
    except (ConfigError, DownloadError, HostlerError) as exc:
        print(f"hostler: {exc}", file=sys.stderr)
        return 2
