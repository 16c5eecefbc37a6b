"""Where a model's GGUF file lives: find it locally, download it, verify it."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import time
from pathlib import Path

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

    cached = try_to_load_from_cache(src.repo, src.file, revision=src.revision)
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


def download(spec: ModelSpec, *, progress: bool = True) -> Path:
    """Make the model's file present locally and verified; return its path."""
    src = spec.source
    if not isinstance(src, HuggingFaceSource):
        path = local_file(spec)
        if path is None:
            where = src.path if isinstance(src, PathSource) else f"package {src.package}"
            raise DownloadError(f"{spec.id}: the file is not present ({where})")
        verify(spec, path)
        return path
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import (  # type: ignore[attr-defined]
        disable_progress_bars,
        enable_progress_bars,
    )

    started = time.time()
    (disable_progress_bars if not progress else enable_progress_bars)()
    try:
        path = Path(hf_hub_download(src.repo, src.file, revision=src.revision))
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise DownloadError(
            f"{spec.id}: {src.repo}@{src.revision} has no file {src.file} (404)"
        ) from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        _drop_partial(constants.HF_HUB_CACHE, src.repo, started)
        raise DownloadError(f"{spec.id}: download of {src.file} failed: {exc}") from exc
    except Exception as exc:
        _drop_partial(constants.HF_HUB_CACHE, src.repo, started)
        raise DownloadError(f"{spec.id}: download of {src.file} failed: {exc}") from exc
    verify(spec, path)
    return path


def _drop_partial(cache: str, repo: str, since: float) -> None:
    """Remove the partial blob a failed transfer left, so no half file stays in the cache."""
    blobs = Path(cache) / ("models--" + repo.replace("/", "--")) / "blobs"
    for p in blobs.glob("*.incomplete"):
        try:
            if p.stat().st_mtime >= since - 1:
                p.unlink()
        except FileNotFoundError:
            pass
