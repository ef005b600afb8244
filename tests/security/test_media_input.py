"""Issue 11, finding 1 (critical): an upload is data, never instructions.

A creator uploads a DASH manifest, an HLS playlist or a concat list (`media_corpus`) whose
entries point at another video's segments in the store, at absolute paths and `file:` URLs on
the host, at a loopback HTTP listener, at `data:`/`subfile:` URLs or at another upload. Before
the fix ffmpeg followed them and the upload went READY with the victim's frames. Now:
- through the real pipeline (the pool, the store of `--backend`), every attack ends FAILED
  with one readable sentence, the listener is never contacted, and nothing the attacker's
  video produced holds a byte of the victim's media;
- the probe alone refuses each of them with the sandbox off (layer 1, the format and
  protocol whitelists, holds by itself);
- bubblewrap alone (no whitelist) keeps ffmpeg from reading the victim (layer 2 holds by
  itself), and has no network;
- an oversized source (100000x100000) fails naming the size limit;
- cancelling a sandboxed ffmpeg leaves no process behind.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.backends import Backend
from tests.integration.test_transcoder import add_video, run_until_done, video_row
from tests.security import media_corpus as mc
from transcoder import ffrun
from transcoder.probe import Unplayable, probe
from transcoder.sandbox import Sandbox, resolve
from transcoder.stages import source_path
from vodcore.config import Settings
from vodcore.ffmpeg import ffmpeg_exe
from vodcore.layout import source_key
from vodcore.store import ObjectStore
from vodcore.store.fs import FilesystemStore

FFMPEG = ffmpeg_exe()
VICTIM = "victimvid"
NESTED = "atk00"  # the first attack (mpd-relative) is what the nested ones point at
BWRAP = shutil.which("bwrap")
needs_bwrap = pytest.mark.skipif(
    BWRAP is None or resolve("auto").bwrap is None, reason="bubblewrap cannot run here"
)


class Listener:
    """A loopback TCP listener that records every connection (and answers nothing)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.contacts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.contacts += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture(scope="module")
def listener() -> Iterator[Listener]:
    lst = Listener()
    yield lst
    lst.close()


@pytest.fixture(scope="module")
def victim(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return mc.make_victim(FFMPEG, tmp_path_factory.mktemp("victim"))


@pytest.fixture(scope="module")
def attacks(
    tmp_path_factory: pytest.TempPathFactory, victim: tuple[Path, Path], listener: Listener
) -> list[mc.Attack]:
    dash, mp4 = victim
    targets = mc.Targets(VICTIM, dash, mp4, f"http://127.0.0.1:{listener.port}/", NESTED)
    return mc.build(FFMPEG, tmp_path_factory.mktemp("attacks"), targets)


def readable(reason: str) -> bool:
    """One sentence a creator can read: no ffmpeg log lines, no stack, not a wall of text."""
    dump = ("\n", "Traceback", " @ 0x", "ffmpeg exited", "Error opening input", "[in#")
    return 0 < len(reason) < 240 and not any(d in reason for d in dump)


# through the real pipeline --------------------------------------------------------------------


@pytest.fixture
def settings(tmp_path: Path, backend: Backend) -> Settings:
    return backend.settings(tmp_path / "data", segment_seconds=2.0, quality_report=False)


async def _bytes(store: ObjectStore, key: str) -> bytes:
    return b"".join([c async for c in store.open_range(key)])


async def test_no_crafted_upload_reaches_another_video(
    settings: Settings,
    engine: AsyncEngine,
    store: ObjectStore,
    attacks: list[mc.Attack],
    victim: tuple[Path, Path],
    listener: Listener,
    tmp_path: Path,
) -> None:
    dash, mp4 = victim
    for seg in sorted(dash.iterdir()):  # the victim's real output, private and taken down
        for prefix in (f"media/{VICTIM}/1/", f"restricted/media/{VICTIM}/1/"):
            await store.put_file(prefix + seg.name, seg)
    ids = {}
    for i, attack in enumerate(attacks):
        vid = f"atk{i:02d}"
        ids[vid] = attack
        path = tmp_path / vid
        path.write_bytes(attack.data)
        await add_video(engine, store, vid, path)
    assert ids[NESTED].name == "mpd-relative"
    await run_until_done(settings, engine, len(attacks), slots=2)

    fingerprints = mc.victim_fingerprints(dash, mp4)
    for vid, attack in ids.items():
        row = await video_row(engine, vid)
        reason = str(row["failure_reason"])
        if attack.expect == mc.FAILED or row["state"] != "READY":
            assert row["state"] == "FAILED", (attack.name, row["state"])
            assert readable(reason), (attack.name, reason)
        else:  # a valid mp4 with a playlist behind it: its own 1 s of silent frames, no more
            assert row["duration_seconds"] is not None
            assert abs(float(str(row["duration_seconds"])) - 1.0) < 0.2, attack.name
            renditions = row["renditions"]
            assert isinstance(renditions, list)
            assert all("mp4a" not in r["codecs"] for r in renditions), attack.name  # no audio
        produced = [k for p in ("media", "work") for k in await store.list(f"{p}/{vid}/")]
        for key in produced:
            data = await _bytes(store, key)
            assert not any(f in data for f in fingerprints), (attack.name, key)
    assert listener.contacts == 0


# the probe alone, each layer alone ------------------------------------------------------------


@pytest.fixture
def layout(tmp_path: Path, victim: tuple[Path, Path]) -> Path:
    """A filesystem store's layout: the victim's segments where a relative attack finds them."""
    dash, _ = victim
    root = tmp_path / "store"
    for prefix in (root / "media" / VICTIM / "1", root / "restricted" / "media" / VICTIM / "1"):
        shutil.copytree(dash, prefix)
    return root


def _place(root: Path, vid: str, data: bytes) -> Path:
    src = root / "source" / vid / "original"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(data)
    return src


@pytest.fixture
def unsandboxed() -> Iterator[None]:
    saved = ffrun.sandbox()
    ffrun._sandbox = Sandbox(None)
    yield
    ffrun._sandbox = saved


@pytest.mark.usefixtures("unsandboxed")
async def test_the_whitelists_alone_refuse_every_attack(
    layout: Path, attacks: list[mc.Attack], listener: Listener
) -> None:
    _place(layout, NESTED, attacks[0].data)  # stored where the nested attacks look
    for i, attack in enumerate(attacks):
        src = _place(layout, f"probe{i:02d}", attack.data)
        try:
            info = await probe(FFMPEG, src)
        except Unplayable as e:
            assert readable(str(e)), (attack.name, str(e))
            continue
        assert attack.expect == mc.OWN_FRAMES, (attack.name, info)
        assert info.audio_index is None and info.duration is not None  # its own silent 1 s
        assert abs(info.duration - 1.0) < 0.2, (attack.name, info)
    assert listener.contacts == 0


@needs_bwrap
def test_the_sandbox_alone_hides_the_victim_and_the_network(
    layout: Path, attacks: list[mc.Attack], listener: Listener
) -> None:
    """Plain `ffmpeg -i` (no whitelist) on the manifests, inside bubblewrap: the relative and
    absolute targets are not there to be read, and the listener is unreachable."""
    sandbox = resolve("bwrap")
    by_name = {a.name: a for a in attacks}
    for name in ("mpd-relative", "mpd-restricted", "mpd-absolute", "mpd-http"):
        src = _place(layout, name, by_name[name].data)
        argv = [FFMPEG, "-hide_banner", "-nostdin", "-i", str(src), "-f", "null", "-"]
        if name != "mpd-http":  # the attack is real: unconfined, ffmpeg plays the victim
            unconfined = subprocess.run(argv, capture_output=True, text=True, timeout=60)
            assert unconfined.returncode == 0, (name, unconfined.stderr[-500:])
            assert "frame=" in unconfined.stderr, name
        confined = subprocess.run(
            sandbox.wrap(argv, ro=[src]), capture_output=True, text=True, timeout=60
        )
        assert confined.returncode != 0, (name, confined.stderr[-500:])
        assert "frame=" not in confined.stderr, name
    assert listener.contacts == 0


async def test_an_oversized_picture_names_the_size_limit(tmp_path: Path) -> None:
    from transcoder.limits import check_picture

    src = tmp_path / "huge.y4m"
    src.write_bytes(b"YUV4MPEG2 W100000 H100000 F30:1 Ip A1:1 C420jpeg\nFRAME\n" + bytes(4096))
    with pytest.raises(Unplayable) as e:
        await probe(FFMPEG, src, check_picture)
    assert str(e.value) == (
        "the picture is 100000x100000 pixels; the limit is 8192 pixels on its longest side"
    )


@needs_bwrap
async def test_a_cancelled_sandboxed_ffmpeg_leaves_no_process(tmp_path: Path) -> None:
    marker = f"testsrc2=size=320x240:rate=30:duration=3600:marker{os.getpid()}"
    argv = [FFMPEG, "-hide_banner", "-nostdin", "-re", "-f", "lavfi", "-i", marker.split(":m")[0]]
    argv += ["-metadata", f"title={marker}", "-c:v", "libx264", "-preset", "ultrafast"]
    argv += ["-progress", "pipe:1", "-f", "mp4", "-y", "out.mp4"]
    saved = ffrun.sandbox()
    ffrun._sandbox = resolve("bwrap")
    started = asyncio.Event()
    try:
        task = asyncio.create_task(ffrun.run_progress(argv, tmp_path, lambda _: started.set()))
        await asyncio.wait_for(started.wait(), 30)
        assert _pids(marker)  # bwrap and the ffmpeg inside it
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        ffrun._sandbox = saved
    for _ in range(50):
        if not _pids(marker):
            break
        await asyncio.sleep(0.1)
    assert _pids(marker) == []


def _pids(needle: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if needle.encode() in cmdline and b"pytest" not in cmdline:
                found.append(int(entry.name))
    return found


# staging ---------------------------------------------------------------------------------------


async def test_the_source_is_staged_into_the_jobs_private_directory(tmp_path: Path) -> None:
    """ffmpeg is handed `workdir/input/source`: a hard link to the stored upload on the same
    file system, a copy across file systems (a tmpfs work directory here)."""
    store = FilesystemStore(tmp_path / "store")
    await store.put_bytes(source_key("v1"), b"not really a video")
    stored = store.local_path(source_key("v1"))
    assert stored is not None
    work = tmp_path / "job"
    work.mkdir(mode=0o700)
    staged = await source_path(store, "v1", work)
    assert staged == work / "input" / "source" and staged.is_absolute()
    assert staged.stat().st_ino == stored.stat().st_ino  # a link, not a copy
    assert await source_path(store, "v1", work) == staged  # staged once per job
    if _another_file_system(SHM, tmp_path):
        with tempfile.TemporaryDirectory(dir=SHM) as other:
            copied = await source_path(store, "v1", Path(other))
            assert copied.read_bytes() == b"not really a video"
            assert copied.stat().st_ino != stored.stat().st_ino


SHM = Path("/dev/shm")


def _another_file_system(a: Path, b: Path) -> bool:
    return a.is_dir() and a.stat().st_dev != b.stat().st_dev
