"""Upload a finished version and publish it: the only way a video becomes READY.

Rules (DESIGN.md "Video lifecycle"):
- every output file goes to `media/{videoId}/{version}/{file}`; manifests are uploaded last so
  a reader of a half-uploaded version finds no manifest rather than a dangling one;
- publish first *reads the manifests back from the store* and walks every reference: master
  playlist → media playlists → EXT-X-MAP and segment URIs (RFC 8216 §4.3.2.5, §4.3.2.1); the
  MPD's SegmentTemplates → init and media segment names. Each must `exist` in the store;
- only then does the publish stage (`transcoder.stages.publish_stage`) complete its job and
  move the video to READY with the new `current_version`, in one transaction. A missing file
  raises `PublishError` and nothing changes, so a published version is never one with holes.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from transcoder.command import MANIFEST_MPD, MASTER_M3U8, POSTER
from transcoder.manifests import mpd_files, parse_master, parse_media_playlist, parse_mpd
from vodcore.store import ObjectNotFound, ObjectStore

MANIFESTS = (MASTER_M3U8, MANIFEST_MPD)


class PublishError(Exception):
    """The version cannot be published (a referenced file is missing, a manifest is bad)."""


class LeaseLost(Exception):
    """Another worker holds this job now; stop without touching the video."""


async def upload_dir(store: ObjectStore, outdir: Path, prefix: str) -> list[str]:
    files = await asyncio.to_thread(lambda: sorted(p for p in outdir.iterdir() if p.is_file()))
    # segments and playlists first, the two entry manifests last (see module rules)
    files.sort(key=lambda p: p.name in MANIFESTS)
    keys = []
    for p in files:
        key = prefix + p.name
        await store.put_file(key, p, move=True)
        keys.append(key)
    return keys


async def read_text(store: ObjectStore, key: str) -> str:
    chunks = [c async for c in store.open_range(key)]
    return b"".join(chunks).decode("utf-8")


async def referenced_keys(store: ObjectStore, prefix: str) -> list[str]:
    """Every key the version's manifests reference, manifests included (read from the store)."""
    keys = [prefix + MASTER_M3U8, prefix + MANIFEST_MPD, prefix + POSTER]
    try:
        playlists = parse_master(await read_text(store, prefix + MASTER_M3U8))
        for uri in playlists:
            keys.append(prefix + uri)
            media = parse_media_playlist(await read_text(store, prefix + uri))
            keys += [prefix + u for u in media.uris()]
        keys += [
            prefix + f for f in mpd_files(parse_mpd(await read_text(store, prefix + MANIFEST_MPD)))
        ]
    except ObjectNotFound as e:
        raise PublishError(f"manifest missing from the store: {e.args[0]}") from None
    return list(dict.fromkeys(keys))


async def missing_keys(store: ObjectStore, prefix: str) -> list[str]:
    return [k for k in await referenced_keys(store, prefix) if not await store.exists(k)]
