"""What ffmpeg may do with an uploaded file: parse it as one media container, and nothing else.

An upload is data, never instructions. ffmpeg guesses a file's format from its bytes, and some
formats are instructions: a DASH manifest, an HLS playlist, a concat list, an IMF package, an SDP
description all tell ffmpeg to open *other* files or URLs. A creator who uploads an MPD whose
BaseURL is `../../media/{victim}/1/` (or `/any/path/on/the/host`, or `http://…`) would otherwise
get another tenant's frames transcoded into their own video. Two independent layers stop that:

1. Input options (`source_input`), on every ffmpeg input that is the upload:
   - `-format_whitelist`: only the demuxers of `SOURCE_FORMATS`, real media containers that read
     their own bytes and open nothing else. Left out on purpose: hls, dash, concat/ffconcat, imf,
     sdp, rtsp/rtp, mxf (no need seen so far), image demuxers (image2, *_pipe: a still is not a
     video), tee and every other demuxer that follows paths or URLs. A file of any other format
     is "not a video container we accept" (`transcoder.probe`).
   - `-protocol_whitelist file`: the one staged file, through the `file` protocol only (no
     `http:`, `data:`, `subfile:`, `concat:`, `pipe:`…); ffmpeg copies both lists into every
     nested open, so nothing a demuxer opens escapes them.
   - mov/mp4 can follow "data references" to external files (`enable_drefs`, and
     `use_absolute_path` on top of it): both are off by default in ffmpeg 9 and never set here.
     They cannot be forced off on the command line (the option only exists for mov inputs: any
     other container would then fail with "Option not found"), which is one reason for layer 2.
   Our own inputs (the `concatf:` list of encoded segments the VMAF run reads, chunk outputs) are
   ours and keep ffmpeg's defaults; outputs (the dash/hls muxers writing segments) likewise.

2. The process (`Sandbox.wrap`): ffmpeg runs under bubblewrap (`bwrap`, Debian's `bubblewrap`
   package, installed by scripts/bootstrap.sh) in new user, mount, pid, network, ipc, uts and
   cgroup namespaces (`--unshare-all`: no network at all). Its file system is an empty tmpfs
   holding only /usr (and the /bin, /lib… links into it, read-only), /proc, a minimal /dev, the
   ffmpeg binary (read-only) and the paths the caller names: the job's work directory
   (writable) and the staged source (read-only). The data directory, other jobs' work
   directories and the rest of the host are not there to be read. `--die-with-parent` kills
   the sandbox if bwrap dies; ffmpeg stays in bwrap's process group (no `--new-session`;
   `transcoder.ffrun` already starts every run in a session of its own, without a terminal), so
   the one `killpg` that stops a cancelled job stops both.

`ffmpeg_sandbox` (setting): "bwrap" requires it (a worker that cannot start it fails every job
loudly rather than run unconfined), "off" never uses it, "auto" (the default) uses it when
`bwrap` is installed and works here, else logs one warning and runs ffmpeg unconfined (layer 1
still holds). Every path handed to bwrap is bound at the path the argv names, so argv is never
rewritten.

Everything here but `probe_bwrap` is pure (argv in, argv out).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass

log = logging.getLogger("vod.transcoder")

# demuxer names as ffmpeg matches them (any name of a demuxer's comma-separated list matches:
# "mov" admits "mov,mp4,m4a,3gp,3g2,mj2", "matroska" admits "matroska,webm")
SOURCE_FORMATS = (
    "mov",  # mp4, m4a, 3gp, 3g2, mj2, QuickTime
    "matroska",  # mkv, webm
    "avi",
    "mpegts",
    "mpeg",  # MPEG program stream (.mpg, .vob)
    "flv",
    "ogg",
    "asf",  # wmv
    "ivf",  # VP8/VP9/AV1 elementary streams
    "yuv4mpegpipe",  # y4m, raw frames
    # audio-only containers: such a source fails with "no video stream (audio only)", which
    # reads better than "not a video container we accept"
    "wav",
    "mp3",
    "aac",  # ADTS
    "flac",
)
SOURCE_PROTOCOLS = ("file",)

MODES = ("auto", "bwrap", "off")


def source_input(src: str | os.PathLike[str]) -> list[str]:
    """The options and `-i` for reading an uploaded file (goes where `-i src` went)."""
    return [
        "-format_whitelist",
        ",".join(SOURCE_FORMATS),
        "-protocol_whitelist",
        ",".join(SOURCE_PROTOCOLS),
        "-i",
        os.fspath(src),
    ]


# the system paths a dynamically linked ffmpeg (and bwrap's own exec) needs, read-only
_SYSTEM_DIRS = ("/usr",)
_SYSTEM_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_SYSTEM_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf")


def _system_entry(path: str) -> str | None:
    """ "->target" for a symbolic link, "dir"/"file" for the rest, None when absent."""
    if os.path.islink(path):
        return "->" + os.readlink(path)
    if os.path.isdir(path):
        return "dir"
    if os.path.isfile(path):
        return "file"
    return None


@dataclass(frozen=True, slots=True)
class Sandbox:
    """How to run ffmpeg: under `bwrap` (its path) or, when None, unconfined."""

    bwrap: str | None = None

    @property
    def enabled(self) -> bool:
        return self.bwrap is not None

    def wrap(
        self,
        argv: Sequence[str],
        *,
        rw: Sequence[str | os.PathLike[str]] = (),
        ro: Sequence[str | os.PathLike[str]] = (),
        cwd: str | os.PathLike[str] | None = None,
        system: Callable[[str], str | None] = _system_entry,
    ) -> list[str]:
        """`argv` as run in the sandbox: `rw` paths writable, `ro` paths (bound after, so a
        read-only path inside a writable one stays read-only) and argv[0] read-only, the
        working directory `cwd`. Each path is bound at its absolute path, so the paths in argv
        must be absolute (or relative to `cwd` where ffmpeg runs)."""
        if self.bwrap is None:
            return list(argv)
        out = [self.bwrap, "--unshare-all", "--die-with-parent", "--clearenv"]
        out += ["--setenv", "PATH", "/usr/bin:/bin"]
        for d in _SYSTEM_DIRS:
            out += ["--ro-bind", d, d]
        for entry in (*_SYSTEM_LINKS, *_SYSTEM_FILES):
            kind = system(entry)
            if kind is None:
                continue
            if kind.startswith("->"):
                out += ["--symlink", kind[2:], entry]
            elif not _under(entry, _SYSTEM_DIRS):
                out += ["--ro-bind", entry, entry]
        out += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
        for p in rw:
            out += ["--bind", *_bind(p)]
        exe = _absolute(argv[0])
        if not _under(exe, _SYSTEM_DIRS):
            out += ["--ro-bind", *_bind(exe)]
        for p in ro:
            out += ["--ro-bind", *_bind(p)]
        if cwd is not None:
            out += ["--chdir", _absolute(cwd)]
        out += ["--", *argv]
        return out


def _absolute(p: str | os.PathLike[str]) -> str:
    return os.path.abspath(os.fspath(p))


def _bind(p: str | os.PathLike[str]) -> tuple[str, str]:
    """(the real thing, the path the argv names): a symbolic link on the way (a data
    directory that is a link) would not exist inside the sandbox."""
    named = _absolute(p)
    return os.path.realpath(named), named


def _under(path: str, roots: Sequence[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def probe_bwrap(bwrap: str, timeout: float = 10.0) -> str | None:
    """None when `bwrap` can start a process here, else why not (e.g. user namespaces are
    disabled, or a container forbids mounts)."""
    argv = Sandbox(bwrap).wrap(["/bin/true"] if os.path.exists("/bin/true") else ["true"])
    try:
        done = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    if done.returncode != 0:
        return done.stderr.decode("utf-8", "replace").strip() or f"exit status {done.returncode}"
    return None


class SandboxUnavailable(RuntimeError):
    """`ffmpeg_sandbox = "bwrap"` but bubblewrap cannot run here."""


def resolve(
    mode: str,
    which: Callable[[str], str | None] = shutil.which,
    check: Callable[[str], str | None] = probe_bwrap,
) -> Sandbox:
    """The sandbox `mode` ("auto" | "bwrap" | "off") gives on this machine."""
    if mode not in MODES:
        raise ValueError(f"ffmpeg_sandbox must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "off":
        return Sandbox(None)
    found = which("bwrap")
    why = "bwrap is not installed (Debian: apt-get install bubblewrap)"
    if found is not None:
        failure = check(found)
        if failure is None:
            return Sandbox(found)
        why = f"bwrap cannot run here: {failure}"
    if mode == "bwrap":
        raise SandboxUnavailable(f"ffmpeg_sandbox=bwrap but {why}")
    log.warning("ffmpeg runs without a sandbox: %s (set ffmpeg_sandbox=off to silence)", why)
    return Sandbox(None)
