"""Uploads into S3 multipart uploads: the pieces `control/uploads.py` uses when the object store
is a `MultipartStore` (S3), both for direct-to-S3 uploads and for tus on S3.

Direct-to-S3 (`POST /v1/uploads {…, "method": "s3-multipart"}`): the session's multipart upload
of `source/{videoId}/original` is created at once and the answer lists one presigned UploadPart
URL per part, so the bytes go from the client to S3 and never through a control process.
`POST /v1/uploads/{id}/complete {parts: [{partNumber, etag}], sha256?}` finishes it.

Rules:
1. Part size is `max(5 MiB, settings.upload_part_bytes)` (S3's minimum for all parts but the
   last), grown in whole MiB if the upload would need more than 10,000 parts (S3's maximum);
   the part count is `ceil(size / part size)`. Every part but the last is exactly the part size.
2. A complete body names every part exactly once, numbers 1..count in ascending order, each with
   a well-formed ETag (32 hex digits, quoted or not); anything else is a 422 naming the part,
   before S3 is asked anything.
3. The control plane checks the ETags and sizes against S3's ListParts before it completes: a part
   not uploaded, an ETag that is not S3's (a part's ETag is the MD5 of its bytes, so a client that
   sends the MD5 it computed locally gets per-part verification end to end), or part sizes that do
   not add up to the declared size are a 422 and nothing is changed: the session stays open and
   the client may PUT the part again and retry. S3's own refusals of CompleteMultipartUpload
   (`InvalidPart`, `InvalidPartOrder`, `EntityTooSmall`) are 422 as well; `NoSuchUpload` is 409.
4. After completion the object's size (HEAD) must be the declared size and, when the body gives
   `sha256` (hex or base64 of the whole file), the object read back must hash to it; otherwise
   the object is deleted, the session abandoned (its video too) and the answer is 422.
   Per-part `x-amz-checksum-sha256` / `Content-MD5` on the presigned PUTs are verified by AWS S3
   when a client sends them (they are not part of the signature); moto, which the tests use,
   accepts and ignores both, so the ETag comparison of rule 3 is what the tests rely on.

tus on S3: PATCH bodies are written and checked exactly as on the filesystem (under the session's
lock, `control/upload_files.py`), into a local buffer `{sid}.{base:020d}.s3buf` holding bytes
[base, offset), and the offset is moved by its compare-and-set. As soon as the buffer holds a
whole part it is uploaded as the next part, recorded in the session's state file
`{sid}.s3.json` (atomic rename), and only then the buffer is cut (a new buffer named by the new
base, the old one removed). A crash anywhere leaves a state that `settle_buffer` repairs: a
newer base without its buffer is rebuilt from the older buffer's tail. What S3 and the buffer
hold together (`base + buffer length`) is the resumable offset; a database offset ahead of it
(a crash between the CAS and the append) is moved back. The last byte uploads the remainder as
the last part and completes the multipart upload into `source/{videoId}/original`: no full local
copy ever exists. Termination and expiry abort the multipart upload (S3 buckets should also have
an `AbortIncompleteMultipartUpload` lifecycle rule for uploads a crash orphaned).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vodcore.errors import VALIDATION, ApiError
from vodcore.store import PartInfo

MiB = 1024 * 1024
MIN_PART = 5 * MiB
MAX_PARTS = 10_000
MAX_PRESIGN_SECONDS = 7 * 24 * 3600  # SigV4's limit
METHOD_TUS, METHOD_S3 = "tus", "s3-multipart"
METHODS = (METHOD_TUS, METHOD_S3)
_ETAG = re.compile(r'^"?([0-9a-fA-F]{32})"?$')
_BUF_NAME = re.compile(r"\.(\d{20})\.s3buf$")


# --- part plan and the complete body (pure) ----------------------------------------------------


def part_size(configured: int, size: int) -> int:
    """Rule 1: the part size for an upload of `size` bytes."""
    part = max(MIN_PART, configured)
    if math.ceil(size / part) > MAX_PARTS:
        part = math.ceil(math.ceil(size / MAX_PARTS) / MiB) * MiB
    return part


def part_count(size: int, part: int) -> int:
    return max(1, math.ceil(size / part))


def normalize_etag(value: Any) -> str | None:
    """A part ETag in S3's quoted lowercase form, or None if malformed."""
    if not isinstance(value, str):
        return None
    m = _ETAG.match(value.strip())
    return f'"{m.group(1).lower()}"' if m else None


@dataclass(frozen=True, slots=True)
class CompleteRequest:
    parts: list[tuple[int, str]] | None  # None: no parts given (a tus upload)
    sha256: bytes | None


def _err(field_name: str, why: str) -> ApiError:
    return ApiError(VALIDATION, f"{field_name}: {why}", extra={"field": field_name})


def parse_sha256(value: Any) -> bytes:
    if isinstance(value, str):
        v = value.strip()
        if re.fullmatch(r"[0-9a-fA-F]{64}", v):
            return bytes.fromhex(v)
        with contextlib.suppress(ValueError, binascii.Error):
            raw = base64.b64decode(v, validate=True)
            if len(raw) == 32:
                return raw
    raise _err("sha256", "must be the SHA-256 of the whole file, in hex or base64")


def complete_request(doc: Any) -> CompleteRequest:
    """The body of `POST /v1/uploads/{id}/complete` (may be absent: `doc` None)."""
    if doc is None:
        return CompleteRequest(None, None)
    if not isinstance(doc, dict):
        raise ApiError(VALIDATION, "the body must be a JSON object")
    sha = parse_sha256(doc["sha256"]) if doc.get("sha256") is not None else None
    raw = doc.get("parts")
    if raw is None:
        return CompleteRequest(None, sha)
    if not isinstance(raw, list) or not raw:
        raise _err("parts", "must be a non-empty list of {partNumber, etag}")
    parts: list[tuple[int, str]] = []
    for i, p in enumerate(raw):
        if not isinstance(p, dict):
            raise _err(f"parts[{i}]", "must be an object {partNumber, etag}")
        n = p.get("partNumber")
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_PARTS:
            raise _err(f"parts[{i}].partNumber", f"must be an integer in 1..{MAX_PARTS}")
        etag = normalize_etag(p.get("etag"))
        if etag is None:
            raise _err(f"parts[{i}].etag", "must be the part's ETag as S3 returned it")
        if parts and n <= parts[-1][0]:
            raise _err(f"parts[{i}].partNumber", "parts must be in ascending order, each once")
        parts.append((n, etag))
    return CompleteRequest(parts, sha)


def check_parts(parts: list[tuple[int, str]], count: int) -> None:
    """Rule 2: exactly parts 1..count (already ascending and unique)."""
    numbers = [n for n, _ in parts]
    for expected in range(1, count + 1):
        if expected not in numbers:
            raise _err("parts", f"part {expected} is missing (the upload has {count} parts)")
    if len(numbers) != count:
        raise _err("parts", f"the upload has {count} parts; part {numbers[-1]} is not one")


def check_against_store(parts: list[tuple[int, str]], held: list[PartInfo], size: int) -> None:
    """Rule 3: every named part is stored with that ETag, and the sizes add up."""
    by_number = {p.number: p for p in held}
    for n, etag in parts:
        stored = by_number.get(n)
        if stored is None:
            raise _err("parts", f"part {n} was not uploaded")
        if normalize_etag(stored.etag) != etag:
            raise _err("parts", f"part {n}'s ETag does not match the part S3 holds")
    total = sum(by_number[n].size for n, _ in parts)
    if total != size:
        raise ApiError(
            VALIDATION,
            f"the parts hold {total} bytes but the upload declared {size}",
            extra={"field": "parts", "receivedBytes": total, "sizeBytes": size},
        )


# --- the session's state file ------------------------------------------------------------------


@dataclass(slots=True)
class MultipartState:
    method: str
    key: str  # the store key (source/{videoId}/original)
    upload_id: str
    part_size: int
    parts: list[PartInfo] = field(default_factory=list)  # tus: parts uploaded so far
    store: dict[str, str | None] = field(default_factory=dict)  # to abort without the app

    @property
    def base(self) -> int:
        """Bytes held by the uploaded parts."""
        return sum(p.size for p in self.parts)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @staticmethod
    def from_json(data: bytes) -> MultipartState:
        d = json.loads(data)
        return MultipartState(
            method=str(d["method"]),
            key=str(d["key"]),
            upload_id=str(d["upload_id"]),
            part_size=int(d["part_size"]),
            parts=[PartInfo(int(p["number"]), str(p["etag"]), int(p["size"])) for p in d["parts"]],
            store=dict(d.get("store") or {}),
        )


def state_path(uploads_dir: Path, session_id: str) -> Path:
    return uploads_dir / f"{session_id}.s3.json"


def load_state(uploads_dir: Path, session_id: str) -> MultipartState | None:
    try:
        return MultipartState.from_json(state_path(uploads_dir, session_id).read_bytes())
    except FileNotFoundError:
        return None


def save_state(uploads_dir: Path, session_id: str, state: MultipartState) -> None:
    """Atomic: a reader sees the old state or the new one."""
    path = state_path(uploads_dir, session_id)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(state.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk: the old state stands, no partial file stays
        tmp.unlink(missing_ok=True)
        raise


# --- the local buffer (bytes [base, offset)) ---------------------------------------------------


def buffer_path(uploads_dir: Path, session_id: str, base: int) -> Path:
    return uploads_dir / f"{session_id}.{base:020d}.s3buf"


def _buffers(uploads_dir: Path, session_id: str) -> list[tuple[int, Path]]:
    out = []
    for p in uploads_dir.glob(f"{session_id}.*.s3buf"):
        m = _BUF_NAME.search(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def settle_buffer(uploads_dir: Path, session_id: str, base: int) -> int:
    """Make `{sid}.{base}.s3buf` the one buffer (rebuilding it from an older buffer's tail if a
    crash came between recording a part and cutting the buffer); returns its length."""
    live = buffer_path(uploads_dir, session_id, base)
    older = [(b, p) for b, p in _buffers(uploads_dir, session_id) if b != base]
    if not live.exists():
        src = next(((b, p) for b, p in reversed(older) if b < base), None)
        tmp = live.with_name(live.name + ".tmp")
        try:
            with open(tmp, "wb") as out:
                if src is not None:
                    with open(src[1], "rb") as f:
                        f.seek(base - src[0])
                        while data := f.read(MiB):
                            out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, live)
        except BaseException:  # a full disk: the older buffer stays the truth
            tmp.unlink(missing_ok=True)
            raise
    for _, p in older:
        p.unlink(missing_ok=True)
    return live.stat().st_size


def read_head(buffer: Path, n: int) -> bytes:
    with open(buffer, "rb") as f:
        return f.read(n)
