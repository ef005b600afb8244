"""Operator commands: `vod purge …`, `vod block|unblock ID` and `vod delete|restore ID`, with a
propagation report; `vod signing rotate|revoke KID` for the playback-token signing keys.

They call control's API (`--api`, default http://127.0.0.1:8000 or $VOD_API) with an operator
key (`--key` or $VOD_API_KEY). `vod purge --wait` and the takedown commands (unless
`--no-wait`) follow `GET /v1/purges/{id}` until every active node following the log (edges,
shields, origins) has applied the log entry (or `--timeout`), then print which nodes applied it
and how long after the entry was created.
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


def report(api: str, purge_id: str, timeout: float, auth: dict[str, str] | None) -> int:
    """Follow a purge until complete; print the per-node report. 0 when complete."""
    deadline = time.monotonic() + timeout
    doc: dict[str, Any] = {}
    while time.monotonic() < deadline:
        doc = requests.get(f"{api}/v1/purges/{purge_id}", headers=auth, timeout=10).json()
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
        print("no edge, shield or origin is connected to control's purge stream")
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
    return report(api, doc["purgeId"], args.timeout, auth) if args.wait else 0


WHAT = {
    "block": "caches purged, older tokens voided and the origin refusing (451) by",
    "unblock": "the origin serving again (older tokens stay void) by",
    "delete": "caches purged, older tokens voided and the origin refusing (410) by",
    "restore": "the origin serving again (older tokens stay void) by",
}


def cmd_takedown(args: argparse.Namespace) -> int:
    """block, unblock, delete, restore: one call, then the propagation report."""
    auth = _auth(args)
    if auth is None:
        return _fail("an operator API key is needed: --key or $VOD_API_KEY", 2)
    api = args.api.rstrip("/")
    action = args.command
    reason = getattr(args, "reason", None)
    body = {"reason": reason} if reason else {}
    url = f"{api}/v1/videos/{args.video_id}"
    if action == "delete":
        r = requests.delete(url, json=body, headers=auth, timeout=300)
    else:
        r = requests.post(f"{url}/{action}", json=body, headers=auth, timeout=300)
    if r.status_code != 200:
        return _fail(f"{action} refused: {api_error(r)}")
    doc = r.json()
    print(f"{doc['videoId']} is {doc['state']}")
    if "objectsMoved" in doc:
        where = "to the restricted prefix" if action == "delete" else "back to media/"
        print(f"{doc['objectsMoved']} object(s) moved {where}")
    print(f"{WHAT[action]} log entry {doc['purgeId']} (seq {doc['seq']})")
    if args.no_wait:
        return 0
    return report(api, doc["purgeId"], args.timeout, auth)


def cmd_signing(args: argparse.Namespace) -> int:
    """Playback-token signing keys: rotate (a new current key; tokens of the old keep playing
    until they expire) or revoke a kid (its tokens are refused at every edge at once)."""
    auth = _auth(args)
    if auth is None:
        return _fail("an operator API key is needed: --key or $VOD_API_KEY", 2)
    api = args.api.rstrip("/")
    try:
        if args.signing_command == "rotate":
            r = requests.post(f"{api}/v1/keys/rotate", headers=auth, timeout=30)
        else:
            r = requests.delete(f"{api}/v1/keys/{args.kid}", headers=auth, timeout=30)
    except requests.RequestException as e:
        return _fail(f"control at {api} is unreachable: {e}")
    if r.status_code != 200:
        return _fail(f"{args.signing_command} refused: {api_error(r)}")
    doc = r.json()
    if args.signing_command == "rotate":
        print(f"signing with {doc['kid']}; published keys: {', '.join(doc['published'])}")
    else:
        print(f"revoked {doc['revoked']}; signing with {doc['signing']}")
    print(f"announced on the purge log at seq {doc['seq']}: edges refetch the key set")
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

    for name, help_, reason in (
        ("block", "take a video down (451): refuse playback, purge, void tokens", "required"),
        ("unblock", "lift a block (new tokens only)", None),
        ("delete", "delete a video (410): like block, and move its media to a restricted "
                   "prefix (restorable; the source is kept)", "required"),
        ("restore", "undo a delete: media moved back, the state before the delete", "optional"),
    ):  # fmt: skip
        t = sub.add_parser(name, help=help_)
        t.add_argument("video_id")
        if reason:
            t.add_argument("--reason", required=reason == "required",
                           help="why (recorded with who and when)")  # fmt: skip
        t.add_argument("--no-wait", action="store_true", help="do not wait for the report")
        common(t)
        t.set_defaults(func=cmd_takedown)

    sg = sub.add_parser("signing", help="playback-token signing keys: rotate, revoke")
    ssub = sg.add_subparsers(dest="signing_command", required=True, metavar="ACTION")
    rot = ssub.add_parser("rotate", help="make a new key current (no downtime)")
    common(rot)
    rot.set_defaults(func=cmd_signing)
    rev = ssub.add_parser("revoke", help="revoke a key id: its tokens are refused everywhere")
    rev.add_argument("kid")
    common(rev)
    rev.set_defaults(func=cmd_signing)
