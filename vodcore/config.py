"""Settings for every tier: defaults, then a TOML file, then environment variables, then flags.

The TOML file has one table per tier plus top-level keys, e.g.

    data_dir = "./var"
    [ports]
    control = 8000
    edge = 8080
    [edge]
    cache_bytes = 268435456

Environment: VOD_DATA, VOD_CONTROL_PORT, VOD_EDGE_PORT, VOD_SHIELD_PORT, VOD_ORIGIN_PORT,
VOD_DATABASE_URL, VOD_FFMPEG, VOD_PUBLIC_EDGE_URL, VOD_CORS_ORIGINS (comma-separated, like
`cors_origins` in TOML, which may also be a list); and for an S3 object store (`[s3] bucket`,
`endpoint_url`, `region`, `prefix` in TOML) VOD_S3_BUCKET, VOD_S3_ENDPOINT_URL, VOD_S3_REGION,
VOD_S3_PREFIX; per tier VOD_{TIER}_HOST (`[hosts]` in TOML), VOD_PUBLIC_CONTROL_URL,
VOD_NODE_CREDENTIAL, VOD_TIER_SECRET. S3 credentials are not settings: botocore reads
AWS_ACCESS_KEY_ID etc.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

SANDBOX_MODES = ("auto", "bwrap", "off")


class ConfigError(ValueError):
    """A setting has a value no tier can run with."""


DEFAULT_PORTS = {"control": 8000, "edge": 8080, "shield": 8081, "origin": 8082}


@dataclass(frozen=True, slots=True)
class Settings:
    data_dir: Path = Path("./var")
    host: str = "127.0.0.1"
    ports: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))
    database_url: str | None = None  # default: SQLite under data_dir
    ffmpeg: str | None = None  # default: system ffmpeg if VOD_FFMPEG unset -> imageio-ffmpeg
    public_edge_url: str | None = None  # what playback URLs point at; default http://host:edge
    # Disk tier under DATA/cache/{tier}: survives restarts, served by sendfile. 0 turns it off.
    disk_cache_bytes: dict[str, int] = field(
        default_factory=lambda: {"edge": 1024**3, "shield": 4 * 1024**3}
    )
    cache_bytes: dict[str, int] = field(
        default_factory=lambda: {"edge": 256 * 1024 * 1024, "shield": 512 * 1024 * 1024}
    )
    max_object_bytes: int = 64 * 1024 * 1024  # larger objects stream through uncached
    token_ttl_seconds: int = 6 * 3600
    segment_seconds: float = 6.0
    transcoder_slots: int = 1
    ffmpeg_threads: int = 0  # per transcoder slot; 0: ffmpeg decides
    # A job whose worker stops heart-beating for this long is claimed again by another.
    job_lease_seconds: float = 30.0
    # Publish a quick low rung first (playable sooner), then the full ladder as a new version.
    first_playable: bool = True
    # Extra top-of-ladder rungs beside H.264: "", "hevc", "av1" or "hevc,av1".
    extra_codecs: str = ""
    quality_report: bool = True  # VMAF of every rung against the source, after publishing
    # Sources longer than this are encoded as chunks by several jobs (0: never), see
    # transcoder/chunks.py; chunk length is rounded down to whole segments.
    chunk_min_seconds: float = 600.0
    chunk_seconds: float = 120.0
    vmaf_subsample: int = 5  # score every Nth frame
    # Sources the transcoder refuses (size is max_upload_bytes), see transcoder/limits.py.
    max_duration_seconds: float = 6 * 3600.0
    max_side: int = 8192
    max_pixels: int = 8192 * 4320
    min_side: int = 16
    max_upload_bytes: int = 20 * 1024**3
    upload_part_bytes: int = 8 * 1024 * 1024
    upload_ttl_seconds: int = 24 * 3600
    upstream_timeout_seconds: float = 30.0
    # Playback events: the playback_batches table unless a Redis URL is given (Redis Streams).
    redis_url: str | None = None
    # Rate limits (control): token buckets per API key and per client IP, shared by every
    # control process through Redis when `redis_url` is set. A rate of 0 turns one off.
    rate_limit_key_per_second: float = 20.0
    rate_limit_key_burst: int = 100
    rate_limit_ip_per_second: float = 50.0
    rate_limit_ip_burst: int = 200
    search_indexer: bool = True  # this control process follows the log into the search index
    min_watch_seconds: float = 10.0  # a playback session counts one view past this (PeerTube: 10)
    # A cache that has not heard from control's purge stream for this long (3 missed pings)
    # revalidates what it stores instead of serving it blindly.
    purge_blind_seconds: float = 30.0
    # Object store: the filesystem under data_dir unless an S3 bucket is named.
    s3_bucket: str | None = None
    s3_endpoint_url: str | None = None  # MinIO, Ceph, R2, moto; default AWS
    s3_region: str | None = None
    s3_prefix: str = ""
    # Origins whose pages may call the control API (CORS, control/cors.py), e.g.
    # ("https://app.example",); "*" allows any. Empty: no CORS headers at all.
    cors_origins: tuple[str, ...] = ()

    # Trust boundaries (issue 11) ----------------------------------------------------------
    # Every ffmpeg that reads an upload runs in a bubblewrap sandbox (no network, only its work
    # directory): "auto" uses bwrap when installed (a warning when not), "bwrap" requires it,
    # "off" runs ffmpeg bare (the input-format and protocol allow-lists still hold).
    ffmpeg_sandbox: str = "auto"
    # Each tier binds its own address (`[hosts] edge = "0.0.0.0"`, VOD_EDGE_HOST, --host);
    # a tier not named binds `host`. Only the edge and control face players and creators.
    hosts: dict[str, str] = field(default_factory=dict)
    # Base URL clients reach control at (uploadUrl, tus Location); never taken from `Host`.
    public_control_url: str | None = None
    # The credential a node (edge, shield, origin) presents to control's node endpoints
    # (purge stream, acks, cutoffs, registration): `vod nodes create` prints one.
    node_credential: str | None = None
    node_ttl_seconds: float = 7 * 24 * 3600.0  # a node silent this long is dropped
    max_nodes_per_credential: int = 64
    # Shared secret of the serving tiers: when set, shields and origins answer only requests
    # signed with it (edges and shields sign what they send upstream).
    tier_secret: str | None = None
    # Request hygiene on every server: a request head must arrive within this, a body may
    # stall this long between reads, an idle keep-alive connection is closed after this.
    header_timeout_seconds: float = 10.0
    body_timeout_seconds: float = 30.0
    keepalive_timeout_seconds: float = 15.0
    max_connections_per_ip: int = 256  # 0: no cap
    # Playback events count only with a session the playback API issued (control/
    # playback_sessions.py): events per session, new sessions per client IP, per hour.
    playback_events_per_session: int = 5000
    playback_sessions_per_ip: int = 1000
    # Disk and quotas (control): bytes of sources per API key (0: no quota), open upload
    # sessions per key, and free space kept on the upload/store filesystem.
    quota_bytes_per_key: int = 100 * 1024**3
    max_upload_sessions_per_key: int = 20
    min_free_bytes: int = 512 * 1024**2

    # Derived locations -------------------------------------------------------------------
    @property
    def store_dir(self) -> Path:
        return self.data_dir / "store"

    @property
    def uploads_dir(self) -> Path:
        return self.data_dir / "uploads"

    @property
    def keys_dir(self) -> Path:
        return self.data_dir / "keys"

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'vod.db').resolve()}"

    def port(self, tier: str) -> int:
        return self.ports[tier]

    def url(self, tier: str) -> str:
        return f"http://{self.host}:{self.ports[tier]}"

    def bind_host(self, tier: str) -> str:
        """The address `tier` listens on (`[hosts]`, VOD_{TIER}_HOST), else `host`."""
        return self.hosts.get(tier) or self.host

    @property
    def control_url(self) -> str:
        """Control's public base URL, for URLs handed to clients."""
        return (self.public_control_url or self.url("control")).rstrip("/")

    @property
    def edge_url(self) -> str:
        return (self.public_edge_url or self.url("edge")).rstrip("/")


def load(config_file: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    s = Settings()
    if config_file:
        with open(config_file, "rb") as f:
            s = _apply_toml(s, tomllib.load(f))
    s = _apply_env(s, os.environ)
    clean = {k: v for k, v in overrides.items() if v is not None}
    if "data_dir" in clean:
        clean["data_dir"] = Path(clean["data_dir"])
    s = replace(s, **clean)
    if s.ffmpeg_sandbox not in SANDBOX_MODES:
        raise ConfigError(
            f"ffmpeg_sandbox is {s.ffmpeg_sandbox!r}; expected one of {', '.join(SANDBOX_MODES)}"
        )
    return s


def _apply_toml(s: Settings, doc: dict[str, Any]) -> Settings:
    changes: dict[str, Any] = {}
    for key in (
        "host",
        "database_url",
        "ffmpeg",
        "public_edge_url",
        "max_object_bytes",
        "token_ttl_seconds",
        "segment_seconds",
        "transcoder_slots",
        "ffmpeg_threads",
        "job_lease_seconds",
        "first_playable",
        "quality_report",
        "extra_codecs",
        "chunk_min_seconds",
        "chunk_seconds",
        "vmaf_subsample",
        "max_duration_seconds",
        "max_side",
        "max_pixels",
        "min_side",
        "max_upload_bytes",
        "upload_part_bytes",
        "upload_ttl_seconds",
        "upstream_timeout_seconds",
        "purge_blind_seconds",
        "redis_url",
        "min_watch_seconds",
        "search_indexer",
        "rate_limit_key_per_second",
        "rate_limit_key_burst",
        "rate_limit_ip_per_second",
        "rate_limit_ip_burst",
        "public_control_url",
        "ffmpeg_sandbox",
        "playback_events_per_session",
        "playback_sessions_per_ip",
        "node_credential",
        "node_ttl_seconds",
        "max_nodes_per_credential",
        "tier_secret",
        "header_timeout_seconds",
        "body_timeout_seconds",
        "keepalive_timeout_seconds",
        "max_connections_per_ip",
        "quota_bytes_per_key",
        "max_upload_sessions_per_key",
        "min_free_bytes",
    ):
        if key in doc:
            changes[key] = doc[key]
    if "data_dir" in doc:
        changes["data_dir"] = Path(doc["data_dir"])
    if "ports" in doc:
        changes["ports"] = {**s.ports, **{k: int(v) for k, v in doc["ports"].items()}}
    if "hosts" in doc:
        changes["hosts"] = {**s.hosts, **{k: str(v) for k, v in doc["hosts"].items()}}
    cache, disk = dict(s.cache_bytes), dict(s.disk_cache_bytes)
    for tier in ("edge", "shield"):
        table = doc.get(tier)
        if isinstance(table, dict):
            if "cache_bytes" in table:
                cache[tier] = int(table["cache_bytes"])
            if "disk_cache_bytes" in table:
                disk[tier] = int(table["disk_cache_bytes"])
    changes["cache_bytes"] = cache
    changes["disk_cache_bytes"] = disk
    if "cors_origins" in doc:  # a list of origins, or one comma-separated string
        changes["cors_origins"] = _origins(doc["cors_origins"])
    s3 = doc.get("s3")
    if isinstance(s3, dict):
        for key in ("bucket", "endpoint_url", "region", "prefix"):
            if key in s3:
                changes[f"s3_{key}"] = str(s3[key])
    return replace(s, **changes)


def _apply_env(s: Settings, env: os._Environ[str] | dict[str, str]) -> Settings:
    changes: dict[str, Any] = {}
    ports = dict(s.ports)
    for tier in DEFAULT_PORTS:
        v = env.get(f"VOD_{tier.upper()}_PORT")
        if v:
            ports[tier] = int(v)
    changes["ports"] = ports
    hosts = dict(s.hosts)
    for tier in DEFAULT_PORTS:
        v = env.get(f"VOD_{tier.upper()}_HOST")
        if v:
            hosts[tier] = v
    changes["hosts"] = hosts
    for name in ("public_control_url", "node_credential", "tier_secret", "ffmpeg_sandbox"):
        v = env.get(f"VOD_{name.upper()}")
        if v:
            changes[name] = v
    for name, kind in (
        ("header_timeout_seconds", float),
        ("body_timeout_seconds", float),
        ("keepalive_timeout_seconds", float),
        ("max_connections_per_ip", int),
    ):
        v = env.get(f"VOD_{name.upper()}")
        if v:
            try:
                changes[name] = kind(v)
            except ValueError:
                raise ConfigError(f"VOD_{name.upper()} is {v!r}: not a number") from None
    if env.get("VOD_DATA"):
        changes["data_dir"] = Path(env["VOD_DATA"])
    if env.get("VOD_DATABASE_URL"):
        changes["database_url"] = env["VOD_DATABASE_URL"]
    if env.get("VOD_FFMPEG"):
        changes["ffmpeg"] = env["VOD_FFMPEG"]
    if env.get("VOD_REDIS_URL"):
        changes["redis_url"] = env["VOD_REDIS_URL"]
    if env.get("VOD_PUBLIC_EDGE_URL"):
        changes["public_edge_url"] = env["VOD_PUBLIC_EDGE_URL"]
    if env.get("VOD_CORS_ORIGINS"):
        changes["cors_origins"] = _origins(env["VOD_CORS_ORIGINS"])
    for key in ("bucket", "endpoint_url", "region", "prefix"):
        v = env.get(f"VOD_S3_{key.upper()}")
        if v:
            changes[f"s3_{key}"] = v
    return replace(s, **changes)


def _origins(value: str | list[str]) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    return tuple(o.strip() for o in items if o.strip())
