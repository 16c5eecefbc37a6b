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


def test_named_keys_from_the_file_and_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = tmp_path / "models.yaml"
    f.write_text(
        "server:\n  keys:\n    - {name: alice, key: alice-secret, requests_per_minute: 3}\n"
        "models:\n  m:\n    source: {type: path, path: m.gguf}\n"
    )
    s, _ = load_settings({"models_file": f})
    assert s.keys[0].name == "alice" and s.keys[0].requests_per_minute == 3
    monkeypatch.setenv(
        "HOSTLER_KEYS", '[{"name": "bob", "key": "bob-secret", "tokens_per_day": 9}]'
    )
    s, _ = load_settings({"models_file": f})
    assert [(k.name, k.tokens_per_day) for k in s.keys] == [("bob", 9)]
    monkeypatch.delenv("HOSTLER_KEYS")
    with pytest.raises(ConfigError, match="keys"):
        load_settings({"models_file": f, "keys": [{"name": "x", "key": "short"}]})


def test_unknown_log_level_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="log_level"):
        load_settings({"models_file": _file(tmp_path), "log_level": "verbose"})
