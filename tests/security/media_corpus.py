"""A corpus of malicious "media" uploads, made on the spot (issue 11, finding 1).

Each file is an instruction to ffmpeg disguised as a video: a DASH manifest, an HLS playlist or
a concat list whose entries point at another tenant's media (relative to where the upload is
stored, absolute on the host, `file:` URLs), at a local HTTP listener, at `data:` and
`subfile:` URLs, at a second malicious upload (nesting), or a playlist glued to a real mp4
(polyglots). `build(...)` writes them all and returns `Attack`s: the file's bytes and what the
pipeline must make of it.

Targets (a `Targets`):
- `victim_id`: a video whose real DASH output (init + media segments, `victim_dir` on the host)
  the test has put in the store at `media/{victim_id}/1/` and `restricted/media/{victim_id}/1/`;
  an upload sits at `source/{id}/original`, so `../../media/{victim}/1/` reaches it;
- `victim_dir`: the same segments on the host (absolute-path and `file:` attacks);
- `victim_mp4`: a whole private mp4 on the host (concat and `subfile:` attacks);
- `http`: the base URL of a loopback listener that records whether it was contacted;
- `nested_id`: the id under which the test stores the first attack (`mpd-relative`), for the
  nested cases that point at another upload.

Expectation: FAILED with a readable reason, except the polyglot whose mp4 comes first: it *is* a
valid mp4 (trailing bytes are ignored by every player) and may go READY, with its own frames
only. Either way no byte of the victim's media may appear in anything the attacker's video
produced.
"""

from __future__ import annotations

import base64
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

FAILED: Literal["FAILED"] = "FAILED"
OWN_FRAMES: Literal["OWN_FRAMES"] = "OWN_FRAMES"  # READY or FAILED; never the victim's bytes

INIT = "init-$RepresentationID$.m4s"
MEDIA = "seg-$RepresentationID$-$Number%05d$.m4s"


@dataclass(frozen=True, slots=True)
class Targets:
    victim_id: str
    victim_dir: Path
    victim_mp4: Path
    http: str  # e.g. "http://127.0.0.1:PORT/"
    nested_id: str


@dataclass(frozen=True, slots=True)
class Attack:
    name: str
    data: bytes
    expect: Literal["FAILED", "OWN_FRAMES"] = FAILED


def _run(ffmpeg: str, *args: str) -> None:
    subprocess.run(
        [ffmpeg, "-hide_banner", "-nostdin", "-v", "error", "-y", *args], check=True, timeout=60
    )


def make_victim(ffmpeg: str, directory: Path) -> tuple[Path, Path]:
    """(a DASH output directory, an mp4): the victim's media, 2 s of 320x240 H.264 + AAC."""
    directory.mkdir(parents=True, exist_ok=True)
    mp4 = directory / "victim.mp4"
    _run(
        ffmpeg,
        "-f", "lavfi", "-i", "testsrc2=size=320x240:rate=30:duration=2",
        "-f", "lavfi", "-i", "sine=frequency=660:duration=2",
        "-c:v", "libx264", "-preset", "ultrafast", "-g", "30", "-c:a", "aac", "-shortest",
        str(mp4),
    )  # fmt: skip
    dash = directory / "dash"
    dash.mkdir(exist_ok=True)
    _run(
        ffmpeg, "-i", str(mp4), "-c", "copy", "-f", "dash", "-seg_duration", "1",
        "-use_template", "1", "-use_timeline", "0",
        "-init_seg_name", INIT, "-media_seg_name", MEDIA, str(dash / "manifest.mpd"),
    )  # fmt: skip
    return dash, mp4


def make_own_clip(ffmpeg: str, out: Path) -> Path:
    """The attacker's own (harmless) 1 s clip, for the polyglots."""
    _run(
        ffmpeg,
        "-f", "lavfi", "-i", "testsrc=size=320x240:rate=30:duration=1",
        "-c:v", "libx264", "-preset", "ultrafast", str(out),
    )  # fmt: skip
    return out


def _mpd(manifest: str, base_url: str) -> bytes:
    """The victim's own manifest with a BaseURL pointing wherever the attack wants."""
    return manifest.replace("<Period", f"<BaseURL>{base_url}</BaseURL>\n\t<Period", 1).encode()


def _hls(entries: list[str]) -> bytes:
    lines = ["#EXTM3U", "#EXT-X-VERSION:3", "#EXT-X-TARGETDURATION:2", "#EXT-X-MEDIA-SEQUENCE:0"]
    for entry in entries:
        lines += ["#EXTINF:1.0,", entry]
    return ("\n".join([*lines, "#EXT-X-ENDLIST", ""])).encode()


def _hls_fmp4(init: str, segments: list[str]) -> bytes:
    head = ["#EXTM3U", "#EXT-X-VERSION:7", "#EXT-X-TARGETDURATION:2", f'#EXT-X-MAP:URI="{init}"']
    body = [x for s in segments for x in ("#EXTINF:1.0,", s)]
    return ("\n".join([*head, *body, "#EXT-X-ENDLIST", ""])).encode()


def build(ffmpeg: str, directory: Path, t: Targets) -> list[Attack]:
    """Every attack, its bytes made now (the victim's media must already exist)."""
    manifest = (t.victim_dir / "manifest.mpd").read_text()
    seg_names = sorted(p.name for p in t.victim_dir.glob("seg-0-*.m4s"))
    rel = f"../../media/{t.victim_id}/1/"
    restricted = f"../../restricted/media/{t.victim_id}/1/"
    absolute = f"{t.victim_dir}/"
    victim_b64 = base64.b64encode((t.victim_dir / "init-0.m4s").read_bytes()).decode()
    size = t.victim_mp4.stat().st_size
    subfile = f"subfile,,start,0,end,{size},,:{t.victim_mp4}"
    own = make_own_clip(ffmpeg, directory / "own.mp4").read_bytes()
    playlist = _mpd(manifest, rel)

    attacks = [
        Attack("mpd-relative", playlist),
        Attack("mpd-restricted", _mpd(manifest, restricted)),
        Attack("mpd-absolute", _mpd(manifest, absolute)),
        Attack("mpd-file-url", _mpd(manifest, f"file://{absolute}")),
        Attack("mpd-http", _mpd(manifest, t.http)),
        Attack("mpd-data", _mpd(manifest, f"data:application/octet-stream;base64,{victim_b64}#")),
        Attack("mpd-subfile", _mpd(manifest, f"subfile,,start,0,end,0,,:{absolute}")),
        Attack("hls-relative", _hls_fmp4(rel + "init-0.m4s", [rel + s for s in seg_names])),
        Attack(
            "hls-absolute",
            _hls_fmp4(absolute + "init-0.m4s", [absolute + s for s in seg_names]),
        ),
        Attack("hls-file-url", _hls([f"file://{t.victim_mp4}"])),
        Attack("hls-http", _hls([f"{t.http}seg.ts"])),
        Attack("hls-data", _hls([f"data:video/mp2t;base64,{victim_b64}"])),
        Attack("hls-subfile", _hls([subfile])),
        Attack("concat-absolute", f"ffconcat version 1.0\nfile '{t.victim_mp4}'\n".encode()),
        Attack(
            "concat-relative",
            f"ffconcat version 1.0\nfile '{rel}init-0.m4s'\n".encode(),
        ),
        Attack("concat-subfile", f"ffconcat version 1.0\nfile '{subfile}'\n".encode()),
        Attack("concat-http", f"ffconcat version 1.0\nfile '{t.http}v.mp4'\n".encode()),
        # nested: a list pointing at another upload which is itself a manifest
        Attack(
            "nested-concat-to-mpd",
            f"ffconcat version 1.0\nfile '../{t.nested_id}/original'\n".encode(),
        ),
        Attack("nested-hls-to-mpd", _hls([f"../{t.nested_id}/original"])),
        Attack("nested-mpd-to-upload", _mpd(manifest, f"../{t.nested_id}/")),
        # polyglots: a playlist in front of a real mp4, a real mp4 with a playlist behind it
        Attack("polyglot-playlist-then-mp4", playlist + b"\n" + own),
        Attack("polyglot-mp4-then-playlist", own + playlist, OWN_FRAMES),
    ]
    return attacks


def victim_fingerprints(victim_dir: Path, victim_mp4: Path, length: int = 64) -> list[bytes]:
    """Distinctive runs of the victim's media bytes (from the middle of each media segment and
    of the mp4): finding any of them in the attacker's outputs means a leak."""
    out = []
    for p in [*sorted(victim_dir.glob("seg-*.m4s")), victim_mp4]:
        data = p.read_bytes()
        mid = len(data) // 2
        out.append(data[mid : mid + length])
    return out
