"""Models named on the command line instead of in models.yaml.

`hostler serve --model ./file.gguf`, `--model hf:owner/repo/file.gguf` and
`--model hf:owner/repo:Q4_K_M` (or `owner/repo:Q4_K_M`, llama-server's `-hf` form) become
a registry entry like any other: the GGUF's own chat template, 8192 tokens of context,
`gpu_layers: auto`.
"""

from __future__ import annotations

import re
from pathlib import Path

from server.errors import ConfigError, DownloadError
from server.registry.schema import HuggingFaceSource, ModelSpec, PathSource

ADHOC_CONTEXT = 8192
_QUANT_REF = re.compile(r"^(?:hf:)?([\w.-]+/[\w.-]+):([\w.-]+)$")
_SPLIT = re.compile(r"-\d{5}-of-\d{5}\.gguf$")


def is_reference(name: str) -> bool:
    """True for a file path or a Hugging Face reference (not a registry name)."""
    return (
        name.startswith("hf:")
        or name.lower().endswith(".gguf")
        or bool(_QUANT_REF.match(name))
        or name.startswith(("./", "../", "/", "~"))
    )


def _id(text: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-") or "model"


def spec_for(reference: str) -> ModelSpec:
    """The registry entry for a path or Hugging Face reference (may ask the hub which
    file a quantization name means)."""
    if reference.startswith("hf:") and reference.lower().endswith(".gguf"):
        parts = reference[3:].split("/")
        if len(parts) < 3:
            raise ConfigError(f"--model {reference}: expected hf:owner/repo/file.gguf")
        repo, file = "/".join(parts[:2]), "/".join(parts[2:])
        return _hf_spec(repo, file)
    match = _QUANT_REF.match(reference)
    if match:
        repo, quant = match.groups()
        return _hf_spec(repo, _pick_quant(repo, quant))
    path = Path(reference).expanduser()
    if not path.is_file():
        raise ConfigError(f"--model {reference}: no such file")
    return ModelSpec(
        id=_id(path.stem),
        source=PathSource(path=path.resolve()),
        context=ADHOC_CONTEXT,
        gpu_layers="auto",
    )


def _hf_spec(repo: str, file: str) -> ModelSpec:
    return ModelSpec(
        id=_id(Path(file).stem),
        name=f"{repo}/{file}",
        source=HuggingFaceSource(repo=repo, file=file),
        context=ADHOC_CONTEXT,
        gpu_layers="auto",
        aliases=(f"hf:{repo}/{file}",),
    )


def _pick_quant(repo: str, quant: str) -> str:
    """The GGUF file of `repo` whose name carries `quant` (e.g. Q4_K_M)."""
    from huggingface_hub import list_repo_files
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    try:
        files = list_repo_files(repo)
    except RepositoryNotFoundError as exc:
        raise DownloadError(f"{repo}: no such repository on the hub (404)") from exc
    except (HfHubHTTPError, OSError) as exc:
        raise DownloadError(f"{repo}: cannot list its files on the hub: {exc}") from exc
    q = quant.lower()
    ggufs = [f for f in files if f.lower().endswith(".gguf")]
    matches = [
        f for f in ggufs if re.search(rf"(^|[^a-z0-9]){re.escape(q)}([^a-z0-9]|$)", f.lower())
    ]
    singles = [f for f in matches if not _SPLIT.search(f)]
    if singles:
        return min(singles, key=len)
    if matches:
        raise DownloadError(
            f"{repo}: the {quant} file is split in parts ({matches[0]}, ...); not supported"
        )
    have = ", ".join(Path(f).name for f in ggufs[:8]) or "none"
    raise DownloadError(f"{repo} has no {quant} GGUF (its GGUF files: {have})")
