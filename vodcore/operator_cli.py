"""Operator commands: `vod purge …` and `vod block|unblock ID`, with a propagation report.

They call control's API (`--api`, default http://127.0.0.1:8000 or $VOD_API) with an operator
key (`--key` or $VOD_API_KEY). With `--wait`, they follow `GET /v1/purges/{id}` until every
active edge and shield has applied the purge (or `--timeout`), then print which nodes applied it
and how long after the purge was created.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import requests

from vodcore.upload_cli import api_error


def _fail(msg: str, code: int = 1) -> int:
    print(f"vod: {msg}", file=sys.stderr)
    return code


def _auth(args: argparse.Namespace) -> dict[str, str] | None:
    key = args.key or os.environ.get("VOD_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else None


def report(api: str, purge_id: str, timeout: float) -> int:
    """Follow a purge until complete; print the per-node report. 0 when complete."""
    deadline = time.monotonic() + timeout
    doc: dict[str, Any] = {}
    while time.monotonic() < deadline:
        doc = requests.get(f"{api}/v1/purges/{purge_id}", timeout=10).json()
        if doc.get("complete"):
            break
        time.sleep(0.05)
    created = float(doc.get("createdAt") or 0)
    for n in sorted(doc.get("nodes", []), key=lambda n: (n["tier"], n["node"])):
        when = (
            f"applied after {(n['appliedAt'] - created) * 1000:.0f} ms"
            if n.get("appliedAt")
            else ("applied" if n.get("applied") else "NOT applied yet")
        )
        print(f"  {n['tier']:6} {n['node']:40} {when}")
    nodes = doc.get("nodes", [])
    if doc.get("complete"):
        slowest = max((n["appliedAt"] or created) for n in nodes) - created
        print(f"complete on {len(nodes)} node(s) in {slowest * 1000:.0f} ms")
        return 0
    if not nodes:
        print("no edge or shield is connected to control's purge stream")
    return _fail(f"purge {purge_id} not complete after {timeout:g} s")


def cmd_purge(args: argparse.Namespace) -> int:
    auth = _auth(args)
    if auth is None:
        return _fail("an operator API key is needed: --key or $VOD_API_KEY", 2)
    body: dict[str, Any] = {"soft": args.soft}
    if args.video:
        body["videoId"] = args.video
    elif args.key_name:
        body["surrogateKeys"] = args.key_name
    elif args.prefix:
        body["prefix"] = args.prefix
    else:
        body["all"] = True
    api = args.api.rstrip("/")
    r = requests.post(f"{api}/v1/purges", json=body, headers=auth, timeout=30)
    if r.status_code != 202:
        return _fail(f"purge refused: {api_error(r)}")
    doc = r.json()
    print(f"purge {doc['purgeId']} (seq {doc['seq']}) accepted")
    return report(api, doc["purgeId"], args.timeout) if args.wait else 0


def cmd_block(args: argparse.Namespace) -> int:
    auth = _auth(args)
    if auth is None:
        return _fail("an operator API key is needed: --key or $VOD_API_KEY", 2)
    api = args.api.rstrip("/")
    action = "block" if args.command == "block" else "unblock"
    body = {"reason": args.reason} if action == "block" else {}
    r = requests.post(f"{api}/v1/videos/{args.video_id}/{action}", json=body, headers=auth,
                      timeout=30)  # fmt: skip
    if r.status_code != 200:
        return _fail(f"{action} refused: {api_error(r)}")
    doc = r.json()
    print(f"{doc['videoId']} is {doc['state']}")
    if action == "block":
        print(f"caches purged and older tokens voided by purge {doc['purgeId']}")
        if not args.no_wait:
            return report(api, doc["purgeId"], args.timeout)
    return 0


def add_operator_parsers(sub: Any) -> None:
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--api", default=os.environ.get("VOD_API", "http://127.0.0.1:8000"),
                       help="control URL (default http://127.0.0.1:8000 or $VOD_API)")  # fmt: skip
        p.add_argument("--key", help="operator API key (default $VOD_API_KEY)")
        p.add_argument("--timeout", type=float, default=30, help="seconds to wait for nodes")

    p = sub.add_parser("purge", help="purge cached objects on every edge and shield")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--video", help="every object of a video")
    target.add_argument("--key-name", "--surrogate-key", dest="key_name", action="append",
                        help="objects with this Surrogate-Key (repeatable)")  # fmt: skip
    target.add_argument("--prefix", action="append", help="cache keys starting with this path")
    target.add_argument("--all", action="store_true", help="everything")
    p.add_argument("--soft", action="store_true", help="mark stale (revalidate) instead")
    p.add_argument("--wait", action="store_true", help="report propagation to every node")
    common(p)
    p.set_defaults(func=cmd_purge)

    b = sub.add_parser("block", help="take a video down: refuse playback, purge, void tokens")
    b.add_argument("video_id")
    b.add_argument("--reason", required=True, help="why (recorded with who and when)")
    b.add_argument("--no-wait", action="store_true", help="do not wait for the report")
    common(b)
    b.set_defaults(func=cmd_block)

    u = sub.add_parser("unblock", help="restore a blocked video (new tokens only)")
    u.add_argument("video_id")
    common(u)
    u.set_defaults(func=cmd_block, no_wait=True)
