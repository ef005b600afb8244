"""What bubblewrap costs: the probe and the ladder encode of one clip, sandboxed and not.

    .venv/bin/python bench/ffmpeg_sandbox.py [--seconds 4] [--size 640x360] [--reps 5]

The clip (lavfi testsrc2 + sine, H.264 + AAC) is made once; then, alternating on/off each
repetition, `transcoder.probe.probe` (header report, first-frame decode, packet listings: 4-5
short ffmpeg runs, where a per-process cost shows most) and the one-process ladder encode
(`transcoder.command.build_argv` run through `transcoder.ffrun.run_progress`) are timed.
Prints the medians and the overhead of "bwrap" over "off".
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from transcoder import ffrun
from transcoder.command import build_argv
from transcoder.ladder import plan_ladder
from transcoder.probe import probe
from transcoder.sandbox import resolve
from vodcore.ffmpeg import ffmpeg_exe


async def one(ffmpeg: str, clip: Path, work: Path) -> tuple[float, float]:
    t0 = time.perf_counter()
    info = await probe(ffmpeg, clip)
    t1 = time.perf_counter()
    ladder = plan_ladder(info.width, info.height, fps=info.fps, has_audio=True)
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    plan = build_argv(ffmpeg, str(clip), info, ladder, 2.0)
    rc, tail = await ffrun.run_progress(plan.argv, out, ro=[clip])
    assert rc == 0, tail
    return t1 - t0, time.perf_counter() - t1


def make_clip(ffmpeg: str, clip: Path, seconds: float, size: str) -> Path:
    subprocess.run(
        [ffmpeg, "-hide_banner", "-v", "error", "-y",
         "-f", "lavfi", "-i", f"testsrc2=size={size}:rate=30:duration={seconds}",
         "-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}",
         "-c:v", "libx264", "-preset", "veryfast", "-c:a", "aac", "-shortest", str(clip)],
        check=True,
    )  # fmt: skip
    return clip


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=4)
    ap.add_argument("--size", default="640x360")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    ffmpeg = ffmpeg_exe()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        clip = await asyncio.to_thread(
            make_clip, ffmpeg, work / "clip.mp4", args.seconds, args.size
        )
        modes = {"off": resolve("off"), "bwrap": resolve("bwrap")}
        times: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
        for rep in range(args.reps):
            order = list(modes) if rep % 2 == 0 else list(reversed(modes))
            for mode in order:
                ffrun._sandbox = modes[mode]
                times[mode].append(await one(ffmpeg, clip, work))
    med = {
        m: (statistics.median(p for p, _ in t), statistics.median(e for _, e in t))
        for m, t in times.items()
    }
    print(f"clip {args.size} {args.seconds:g} s, {args.reps} reps each, medians:")
    for m, (p, e) in med.items():
        print(f"  {m:5}  probe {p * 1000:7.1f} ms   encode {e:6.3f} s")
    (po, eo), (pb, eb) = med["off"], med["bwrap"]
    print(
        f"  bwrap overhead: probe +{(pb - po) * 1000:.1f} ms ({pb / po - 1:+.1%}), "
        f"encode +{(eb - eo) * 1000:.1f} ms ({eb / eo - 1:+.1%})"
    )


if __name__ == "__main__":
    asyncio.run(main())
