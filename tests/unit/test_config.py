from pathlib import Path

import pytest

from server.config import load_settings
from server.errors import ConfigError


def _file(tmp_path: Path) -> Path:
    f = tmp_path / "models.yaml"
    f.write_text(
        "server:\n  port: 9001\n  slots: 2\nmodels:\n  m:\n    source: {type: path, path: m.gguf}\n"
    )
    return f


def test_layers_file_env_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = _file(tmp_path)
    s, models = load_settings({"models_file": f})
    assert (s.port, s.slots) == (9001, 2)
    monkeypatch.setenv("HOSTLER_PORT", "9002")
    s, _ = load_settings({"models_file": f})
    assert (s.port, s.slots) == (9002, 2)
    s, _ = load_settings({"models_file": f, "port": "9003"})
    assert s.port == 9003
    assert list(models.models) == ["m"]


def test_invalid_setting_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="port"):
        load_settings({"models_file": _file(tmp_path), "port": "not-a-port"})
