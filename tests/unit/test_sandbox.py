"""transcoder.sandbox: the input restrictions and the bubblewrap argv, built without running."""

from __future__ import annotations

import logging
from fractions import Fraction
from pathlib import Path

import pytest

from transcoder.command import build_argv
from transcoder.ladder import plan_ladder
from transcoder.probe import Probe
from transcoder.sandbox import (
    SOURCE_FORMATS,
    Sandbox,
    SandboxUnavailable,
    resolve,
    source_input,
)

MERGED = {"/bin": "->usr/bin", "/lib": "->usr/lib", "/lib64": "->usr/lib64", "/sbin": None}


def system(path: str) -> str | None:
    return MERGED.get(path, "file" if path.startswith("/etc/") else None)


def test_the_source_is_read_through_both_whitelists() -> None:
    opts = source_input(Path("/w/input/source"))
    assert opts[-2:] == ["-i", "/w/input/source"]
    formats = opts[opts.index("-format_whitelist") + 1].split(",")
    assert opts[opts.index("-protocol_whitelist") + 1] == "file"
    for followers in ("hls", "dash", "concat", "ffconcat", "imf", "sdp", "rtsp", "rtp", "tee"):
        assert followers not in formats
    for image in ("image2", "image2pipe", "png_pipe", "jpeg_pipe"):
        assert image not in formats
    assert {"mov", "matroska", "mpegts"} <= set(formats)
    assert formats == list(SOURCE_FORMATS)


def test_every_input_of_the_encode_is_whitelisted_and_drefs_stay_off() -> None:
    info = Probe(4.0, 0, "h264", 640, 360, Fraction(1), 30.0, 0, 1, "stereo")
    ladder = plan_ladder(640, 360, fps=30.0, has_audio=True)
    argv = build_argv("ffmpeg", "/w/input/source", info, ladder, 2.0).argv
    at = argv.index("-i")
    assert argv[at - 4 : at] == source_input("x")[:4]
    assert argv.count("-i") == 1
    assert "enable_drefs" not in " ".join(argv) and "use_absolute_path" not in " ".join(argv)


def test_off_leaves_the_argv_alone() -> None:
    argv = ["/usr/bin/ffmpeg", "-i", "/w/src"]
    assert Sandbox(None).wrap(argv, rw=["/w/out"], ro=["/w/src"]) == argv


def test_bwrap_shows_only_the_system_the_binary_and_the_named_paths() -> None:
    argv = ["/venv/ffmpeg", "-i", "/data/tmp/w-1/job/input/source", "out.mpd"]
    out = Sandbox("/usr/bin/bwrap").wrap(
        argv,
        rw=["/data/tmp/w-1/job/out"],
        ro=["/data/tmp/w-1/job/input/source"],
        cwd="/data/tmp/w-1/job/out",
        system=system,
    )
    assert out[0] == "/usr/bin/bwrap"
    assert "--unshare-all" in out and "--die-with-parent" in out
    assert "--share-net" not in out
    # no new session: ffmpeg stays in the group ffrun kills with one killpg
    assert "--new-session" not in out
    assert out[out.index("--") + 1 :] == argv
    binds = [(out[i], out[i + 1], out[i + 2]) for i, a in enumerate(out) if a.endswith("bind")]
    assert ("--ro-bind", "/usr", "/usr") in binds
    assert ("--bind", "/data/tmp/w-1/job/out", "/data/tmp/w-1/job/out") in binds
    assert ("--ro-bind", "/venv/ffmpeg", "/venv/ffmpeg") in binds
    src = "/data/tmp/w-1/job/input/source"
    assert ("--ro-bind", src, src) in binds
    # nothing else of the host: not the data directory, not /etc beyond the loader's cache
    shown = {b[2] for b in binds}
    assert shown <= {
        "/usr",
        "/data/tmp/w-1/job/out",
        "/venv/ffmpeg",
        src,
        "/etc/ld.so.cache",
        "/etc/ld.so.conf",
    }
    assert ["--symlink", "usr/lib", "/lib"] == out[out.index("/lib") - 2 : out.index("/lib") + 1]
    assert out[out.index("--chdir") + 1] == "/data/tmp/w-1/job/out"
    assert out.index("--ro-bind", out.index("--bind")) > out.index("--bind")  # ro after rw


def test_paths_are_bound_at_the_path_the_argv_names(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "data"
    link.symlink_to(real)
    out = Sandbox("bwrap").wrap(["ffmpeg"], rw=[link / "."], system=system)
    i = out.index("--bind")
    assert out[i + 1 : i + 3] == [str(real), str(link)]


def test_auto_uses_bwrap_when_it_runs_and_warns_once_otherwise(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert resolve("auto", lambda _: "/usr/bin/bwrap", lambda _: None).bwrap == "/usr/bin/bwrap"
    with caplog.at_level(logging.WARNING, "vod.transcoder"):
        assert resolve("auto", lambda _: None).bwrap is None
        assert resolve("auto", lambda _: "/b", lambda _: "no user namespaces").bwrap is None
    assert len(caplog.records) == 2
    assert "not installed" in caplog.records[0].getMessage()
    assert "no user namespaces" in caplog.records[1].getMessage()
    assert resolve("off", lambda _: "/usr/bin/bwrap").bwrap is None


def test_bwrap_mode_refuses_to_run_unconfined() -> None:
    with pytest.raises(SandboxUnavailable, match="not installed"):
        resolve("bwrap", lambda _: None)
    with pytest.raises(SandboxUnavailable, match="cannot run here"):
        resolve("bwrap", lambda _: "/b", lambda _: "denied")
    with pytest.raises(ValueError, match="ffmpeg_sandbox"):
        resolve("landlock")
