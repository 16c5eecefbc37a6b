"""The README's settings table covers every setting (and its set-up commands exist)."""

from pathlib import Path

from server.config import Settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_setting_is_documented() -> None:
    for name, field in Settings.model_fields.items():
        assert field.description, name
        assert f"`--{name.replace('_', '-')}`" in README, name
        assert f"`HOSTLER_{name.upper()}`" in README, name


def test_setup_commands_exist() -> None:
    root = Path(__file__).resolve().parents[2]
    for cmd in ("scripts/serve", "scripts/test"):
        assert cmd in README and (root / cmd).exists()
