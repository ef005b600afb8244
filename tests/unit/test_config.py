"""Settings of issue 11: per-tier hosts, public URLs, secrets and limits from TOML and the
environment, and a bad sandbox mode refused at load (one line from the CLI, not a traceback)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vodcore import config


def test_trust_boundary_settings_from_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("VOD_EDGE_HOST", "VOD_NODE_CREDENTIAL", "VOD_TIER_SECRET", "VOD_FFMPEG_SANDBOX"):
        monkeypatch.delenv(name, raising=False)
    toml = tmp_path / "vod.toml"
    toml.write_text(
        'host = "127.0.0.1"\n'
        'public_control_url = "https://api.example"\n'
        'tier_secret = "s3cret"\n'
        "quota_bytes_per_key = 1024\n"
        "playback_sessions_per_ip = 7\n"
        "[hosts]\n"
        'edge = "0.0.0.0"\n'
    )
    s = config.load(toml)
    assert s.bind_host("edge") == "0.0.0.0" and s.bind_host("shield") == "127.0.0.1"
    assert s.control_url == "https://api.example"
    assert s.tier_secret == "s3cret" and s.quota_bytes_per_key == 1024
    assert s.playback_sessions_per_ip == 7


def test_environment_wins_over_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "vod.toml"
    toml.write_text('[hosts]\nedge = "10.0.0.1"\n')
    monkeypatch.setenv("VOD_EDGE_HOST", "192.0.2.1")
    monkeypatch.setenv("VOD_NODE_CREDENTIAL", "vodn_x")
    monkeypatch.setenv("VOD_FFMPEG_SANDBOX", "bwrap")
    s = config.load(toml)
    assert s.bind_host("edge") == "192.0.2.1"
    assert s.node_credential == "vodn_x" and s.ffmpeg_sandbox == "bwrap"
    assert s.control_url == "http://127.0.0.1:8000"  # no public URL: control's own


def test_a_bad_sandbox_mode_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOD_FFMPEG_SANDBOX", "nope")
    with pytest.raises(config.ConfigError, match="ffmpeg_sandbox"):
        config.load(None)


def test_connection_limits_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOD_HEADER_TIMEOUT_SECONDS", "2.5")
    monkeypatch.setenv("VOD_MAX_CONNECTIONS_PER_IP", "9")
    s = config.load(None)
    assert s.header_timeout_seconds == 2.5 and s.max_connections_per_ip == 9
    monkeypatch.setenv("VOD_MAX_CONNECTIONS_PER_IP", "lots")
    with pytest.raises(config.ConfigError, match="VOD_MAX_CONNECTIONS_PER_IP"):
        config.load(None)
