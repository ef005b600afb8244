"""`vod upload FILE`: create an upload, send the bytes with tus (tuspy), resume after a drop
or a restart, show progress, and with --wait follow processing until the video plays.

Resume state lives in ~/.cache/vodstack/uploads.json keyed by the file's absolute path, size
and mtime, so running the same command again after an interruption continues where the server
says the upload stands (a tus HEAD), instead of starting over.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import requests

RESUME_FILE = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vodstack" / "uploads.json"
)


def _fingerprint(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def _load_resume() -> dict[str, Any]:
    try:
        data = json.loads(RESUME_FILE.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_resume(data: dict[str, Any]) -> None:
    RESUME_FILE.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESUME_FILE.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(RESUME_FILE)


def api_error(resp: requests.Response) -> str:
    try:
        err = resp.json()["error"]
        return f"{resp.status_code} {err['code']}: {err['message']}"
    except (ValueError, KeyError, TypeError):
        return f"{resp.status_code} {resp.text[:200]}"


def _session_alive(api: str, session_id: str, auth: dict[str, str]) -> bool:
    try:
        head = requests.head(
            f"{api}/v1/tus/{session_id}", headers={**auth, "Tus-Resumable": "1.0.0"}, timeout=30
        )
    except requests.RequestException:
        return False
    return head.status_code == 200


def cmd_upload(args: argparse.Namespace) -> int:
    from tqdm import tqdm
    from tusclient import client as tus_client
    from tusclient.exceptions import TusCommunicationError, TusUploadFailed

    key = args.key or os.environ.get("VOD_API_KEY")
    if not key:
        print(
            "vod upload: an API key is needed: pass --key or set VOD_API_KEY "
            "(create one with: vod keys create --data DIR --role creator)",
            file=sys.stderr,
        )
        return 2
    path = Path(args.file)
    if not path.is_file():
        print(f"vod upload: no such file: {path}", file=sys.stderr)
        return 2
    api = args.api.rstrip("/")
    auth = {"Authorization": f"Bearer {key}"}
    size = path.stat().st_size
    fp = _fingerprint(path)
    resume = _load_resume()
    entry = resume.get(fp)

    if entry and not _session_alive(api, entry["uploadSessionId"], auth):
        entry = None
    if not entry:
        r = requests.post(
            f"{api}/v1/uploads",
            headers=auth,
            json={
                "title": args.title or path.stem,
                "description": args.description or "",
                "visibility": args.visibility,
                "contentType": "video/mp4",
                "sizeBytes": size,
            },
            timeout=30,
        )
        if r.status_code != 201:
            print(f"vod upload: could not create the upload: {api_error(r)}", file=sys.stderr)
            return 1
        entry = {"videoId": r.json()["videoId"], "uploadSessionId": r.json()["uploadSessionId"]}
        resume[fp] = entry
        _save_resume(resume)
    else:
        print(f"resuming upload of {entry['videoId']}", file=sys.stderr)

    video_id = entry["videoId"]
    tc = tus_client.TusClient(f"{api}/v1/tus/", headers=auth)
    # The URL is rebuilt from --api: the server's absolute uploadUrl names the host the
    # upload was created through, which may not be the one used now.
    uploader = tc.uploader(
        str(path),
        url=f"{api}/v1/tus/{entry['uploadSessionId']}",
        chunk_size=args.chunk_mib * 2**20,
        retries=args.retries,
        retry_delay=2,
    )
    with tqdm(
        total=size,
        initial=uploader.offset,
        unit="B",
        unit_scale=True,
        desc="upload",
        disable=args.quiet,
    ) as bar:
        while uploader.offset < size:
            before = uploader.offset
            try:
                uploader.upload_chunk()  # type: ignore[no-untyped-call]
            except (TusCommunicationError, TusUploadFailed, requests.RequestException) as e:
                bar.close()
                print(
                    f"vod upload: interrupted at {uploader.offset} of {size} bytes ({e}); "
                    "run the same command again to resume",
                    file=sys.stderr,
                )
                return 1
            bar.update(uploader.offset - before)
    r = requests.post(
        f"{api}/v1/uploads/{entry['uploadSessionId']}/complete", headers=auth, timeout=30
    )
    if r.status_code != 202:
        # kept for a rerun: a 507 (the server's disk is full) leaves every byte committed,
        # and the same command finishes the upload once there is room
        hint = "; run the same command again later" if r.status_code == 507 else ""
        print(f"vod upload: complete failed: {api_error(r)}{hint}", file=sys.stderr)
        return 1
    resume.pop(fp, None)
    _save_resume(resume)
    print(f"uploaded: videoId {video_id}", file=sys.stderr)
    if not args.wait:
        print(video_id)
        return 0
    return _wait(api, video_id, args.timeout, quiet=args.quiet)


def _wait(api: str, video_id: str, timeout: float, *, quiet: bool) -> int:
    from tqdm import tqdm

    deadline = time.monotonic() + timeout
    with tqdm(
        total=100,
        unit="%",
        desc="processing",
        disable=quiet,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}",
    ) as bar:
        while time.monotonic() < deadline:
            r = requests.get(f"{api}/v1/videos/{video_id}", timeout=30)
            if r.status_code in (404, 410, 451):  # unknown or taken down: it will not be READY
                bar.close()
                print(f"vod upload: {api_error(r)}", file=sys.stderr)
                return 1
            v = r.json()
            state = v.get("state")
            progress = float(v.get("progress") or 0)
            bar.n = min(100.0, progress)
            bar.set_postfix_str(str(state))
            if state == "READY":
                bar.n = 100
                bar.refresh()
                break
            if state == "FAILED":
                bar.close()
                print(f"vod upload: processing failed: {v.get('failureReason')}", file=sys.stderr)
                return 1
            time.sleep(0.5)
        else:
            print("vod upload: timed out waiting for READY", file=sys.stderr)
            return 1
    r = requests.get(f"{api}/v1/videos/{video_id}/playback", timeout=30)
    if r.status_code != 200:
        print(f"vod upload: playback: {api_error(r)}", file=sys.stderr)
        return 1
    print(r.json()["manifestUrl"])
    return 0


def add_upload_parser(sub: Any) -> None:
    up = sub.add_parser("upload", help="upload a video resumably (tus) and optionally wait")
    up.add_argument("file", help="video file to upload")
    up.add_argument("--title", help="title (default: the file name)")
    up.add_argument("--description", help="description")
    up.add_argument("--visibility", choices=("public", "unlisted", "private"), default="public")
    up.add_argument("--wait", action="store_true", help="wait for READY, print the HLS URL")
    up.add_argument("--timeout", type=float, default=3600, help="seconds to wait with --wait")
    up.add_argument(
        "--api",
        default=os.environ.get("VOD_API", "http://127.0.0.1:8000"),
        help="control URL (default http://127.0.0.1:8000 or $VOD_API)",
    )
    up.add_argument("--key", help="API key (default $VOD_API_KEY)")
    up.add_argument("--chunk-mib", type=int, default=8, help="PATCH size in MiB")
    up.add_argument(
        "--retries", type=int, default=5,
        help="retries of a failed PATCH before giving up (running again resumes)",
    )  # fmt: skip
    up.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    up.set_defaults(func=cmd_upload)
