"""Playback sessions: the `sessionId` the playback API hands out, and the caps ingest applies to
the events that carry one (issue 11 finding 6: one anonymous request with 500 invented session
ids added 500 views, even to a private video still UPLOADING).

A session id is stateless and signed: `ps1.{issued-at, 8 hex}.{nonce, 11 base64url}.{mac}`,
where mac is the first 16 bytes of HMAC-SHA256(secret, "{videoId}.{issued}.{nonce}") in
unpadded base64url (RFC 4648 §5). Every id has the same length (`SESSION_ID_CHARS`), so the
playback answer's bytes can be made once per second and the id spliced in per request.
`GET /v1/videos/{id}/playback` mints one only after the caller passed the visibility rule
(`control.visibility`), so holding one means "could play this video, at that time": checking
one costs one HMAC, no database read (ingest runs ~20k events/s).

Rules (`SessionSigner.verify`, pure, `now` passed in):
- the id parses, its mac matches for the event's `videoId` (an id minted for another video
  fails), and it was issued at most `SESSION_TTL` ago (and not in the future beyond `SKEW`);
- anything else (a client-made id such as the seed's `ps_44`) is not a session: its events are
  answered 202 but counted in `rejected`, never stored, so they can never count a view.

Caps (`SessionGate`, pure, per control process, `now` passed in), over a window of
`WINDOW_SECONDS` (two generations of counters, so memory is bounded by `MAX_TRACKED` keys):
- at most `MAX_EVENTS_PER_SESSION` events per session (a player heartbeating every 2.5 s for
  the whole window stays far below);
- at most `MAX_SESSIONS_PER_IP` distinct sessions per client IP (a household or a NAT'd office
  plays that many videos an hour at most): a script that fetches many real sessions from one
  address still adds at most that many views.
A session counts one view at most whatever happens (`counted_views` is keyed by it).

The secret: 32 random bytes in `{keys_dir}/playback-sessions.key` (0600), created by the first
control process that needs it and read by the others (they share `keys_dir`, as they share the
signing keys).
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import os
import secrets
from pathlib import Path

PREFIX = "ps1"
SESSION_TTL = 12 * 3600  # events are accepted this long after the playback call
SKEW = 300  # seconds a session may seem to come from the future (clocks of control processes)
MAC_BYTES = 16
NONCE_BYTES = 8  # 11 base64url characters
SESSION_ID_CHARS = len(PREFIX) + 1 + 8 + 1 + 11 + 1 + 22
SECRET_FILE = "playback-sessions.key"

WINDOW_SECONDS = 3600.0
MAX_EVENTS_PER_SESSION = 5000
MAX_SESSIONS_PER_IP = 1000
MAX_TRACKED = 500_000  # sessions (and IPs) remembered per generation at most


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class SessionSigner:
    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the playback session secret is too short")
        self._secret = secret

    @classmethod
    def load_or_create(cls, keys_dir: Path) -> SessionSigner:
        """The shared secret of `keys_dir`, made once (O_EXCL: two processes starting together
        agree on the first one written)."""
        keys_dir.mkdir(parents=True, exist_ok=True)
        path = keys_dir / SECRET_FILE
        with contextlib.suppress(FileExistsError):
            tmp = keys_dir / f".{SECRET_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, secrets.token_bytes(32))
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)  # atomic, and fails if another process got there first
            finally:
                tmp.unlink()
        return cls(path.read_bytes())

    def _mac(self, video_id: str, issued: str, nonce: str) -> str:
        msg = f"{video_id}.{issued}.{nonce}".encode()
        # hmac.digest: one call into OpenSSL (a third of hmac.new(...).digest()'s cost)
        return _b64u(hmac.digest(self._secret, msg, "sha256")[:MAC_BYTES])

    def mint(self, video_id: str, now: int) -> str:
        issued = f"{now & 0xFFFFFFFF:08x}"
        nonce = _b64u(secrets.token_bytes(NONCE_BYTES))
        return f"{PREFIX}.{issued}.{nonce}.{self._mac(video_id, issued, nonce)}"

    def verify(self, session_id: str, video_id: str, now: float) -> bool:
        """Whether `session_id` was minted by a control process for `video_id` less than
        `SESSION_TTL` ago."""
        if len(session_id) != SESSION_ID_CHARS:
            return False
        prefix, issued, nonce, mac = [*session_id.split("."), "", "", ""][:4]
        if prefix != PREFIX or len(issued) != 8:
            return False
        try:
            at = int(issued, 16)
        except ValueError:
            return False
        if not now - SESSION_TTL <= at <= now + SKEW:
            return False
        return hmac.compare_digest(mac, self._mac(video_id, issued, nonce))


class SessionGate:
    """Per-session event caps and per-IP session caps over a sliding pair of windows."""

    def __init__(
        self,
        *,
        max_events_per_session: int = MAX_EVENTS_PER_SESSION,
        max_sessions_per_ip: int = MAX_SESSIONS_PER_IP,
        window_seconds: float = WINDOW_SECONDS,
        max_tracked: int = MAX_TRACKED,
    ) -> None:
        self.max_events = max_events_per_session
        self.max_sessions = max_sessions_per_ip
        self.window = window_seconds
        self.max_tracked = max_tracked
        self._events: dict[str, int] = {}  # session → events admitted (this generation)
        self._old_events: dict[str, int] = {}
        self._ips: dict[str, int] = {}  # ip → new sessions admitted (this generation)
        self._old_ips: dict[str, int] = {}
        self._started = float("-inf")

    def _rotate(self, now: float) -> None:
        if (
            now - self._started >= self.window
            or len(self._events) >= self.max_tracked
            or len(self._ips) >= self.max_tracked
        ):
            self._old_events, self._events = self._events, {}
            self._old_ips, self._ips = self._ips, {}
            self._started = now

    def admit(self, ip: str, session_id: str, events: int, now: float) -> int:
        """How many of a request's `events` of one session are admitted (0..events)."""
        self._rotate(now)
        seen = self._events.get(session_id)
        if seen is None:
            seen = self._old_events.get(session_id)
            if seen is None:  # a new session for this IP
                opened = self._ips.get(ip, 0) + self._old_ips.get(ip, 0)
                if opened >= self.max_sessions:
                    return 0
                self._ips[ip] = self._ips.get(ip, 0) + 1
                seen = 0
        n = max(0, min(events, self.max_events - seen))
        self._events[session_id] = seen + n
        return n
