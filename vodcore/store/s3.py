"""S3 object store through aiobotocore: AWS S3, MinIO, Ceph RGW, R2, moto.

Lifecycle: one aiobotocore client (one HTTP connection pool) per store. It is created by
`await store.open()` or lazily by the first call, on the running event loop, and released by
`await store.close()`; `async with S3Store(...) as store:` does both. A store is bound to the
loop that opened it (aiohttp's rule for its sessions), which is the server's one loop.

Credentials come from botocore's standard chain: `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`
/ `AWS_SESSION_TOKEN` env vars, `~/.aws`, instance roles. `endpoint_url` points at a
non-AWS server; `prefix` puts every key under `{prefix}/` so a bucket can be shared.

Mapping to the `ObjectStore` contract:
- `stat` is HEAD; the ETag is S3's own (already a quoted strong tag per RFC 9110 §8.8.3, an MD5
  for simple uploads, "md5-N" for multipart ones), Last-Modified is S3's.
- `open_range` is one ranged GET (`Range: bytes=a-b`, RFC 9110 §14.1.2) whose body is streamed
  in chunks, never read whole; closing the iterator early closes the HTTP response.
- Writes are atomic because S3 is: an object appears only when `PutObject` or
  `CompleteMultipartUpload` succeeds. Files above `MULTIPART_THRESHOLD` go up in parts
  (`PART_SIZE`, S3's minimum part is 5 MiB) and a failed upload is aborted, so no parts are
  left behind to be billed.
- `MultipartStore` (the capability direct-to-S3 uploads and tus-on-S3 use): CreateMultipartUpload,
  presigned UploadPart URLs (the client PUTs bytes to S3, never through a vodstack process),
  UploadPart, ListParts (paginated: up to 10,000 parts), CompleteMultipartUpload and
  AbortMultipartUpload. S3's refusals come back as `MultipartError(code)`; aborting an upload
  that is already gone (completed or aborted) is not an error.
- `move` is CopyObject (server side, no bytes through this process) then DeleteObject. S3 has no
  rename: a crash between the two leaves the object under both keys, and moving it again
  finishes the job. CopyObject takes objects up to 5 GiB, far above any segment or manifest.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import Any

from aiobotocore.session import AioSession, get_session
from botocore.exceptions import ClientError

from vodcore.paths import check_key
from vodcore.store import MultipartError, ObjectInfo, ObjectNotFound, PartInfo

MULTIPART_THRESHOLD = 8 * 1024 * 1024
PART_SIZE = 8 * 1024 * 1024  # >= 5 MiB, S3's minimum for every part but the last
_NOT_FOUND = frozenset({"404", "NoSuchKey", "NotFound"})


_session: AioSession | None = None


def _shared_session() -> AioSession:
    # One botocore session per process: it loads the (large) S3 service model once, and it
    # holds no connections (each client, bound to its loop, has its own pool).
    global _session
    if _session is None:
        _session = get_session()
    return _session


def _code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def _quoted(etag: str) -> str:
    return etag if etag.startswith('"') or etag.startswith("W/") else f'"{etag}"'


class S3Store:
    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        prefix: str = "",
    ) -> None:
        self.bucket = bucket
        self.endpoint_url = endpoint_url
        self.region = region
        p = prefix.strip("/")
        if p:
            check_key(p)
        self.prefix = p + "/" if p else ""
        self._client: Any = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._lock = asyncio.Lock()

    # --- lifecycle -----------------------------------------------------------------------------
    async def open(self) -> S3Store:
        async with self._lock:
            if self._client is None:
                stack = contextlib.AsyncExitStack()
                self._client = await stack.enter_async_context(
                    _shared_session().create_client(
                        "s3", region_name=self.region, endpoint_url=self.endpoint_url
                    )
                )
                self._stack = stack
        return self

    async def close(self) -> None:
        async with self._lock:
            stack, self._stack, self._client = self._stack, None, None
            if stack is not None:
                await stack.aclose()

    async def __aenter__(self) -> S3Store:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _c(self) -> Any:
        if self._client is None:
            await self.open()
        return self._client

    def _k(self, key: str) -> str:
        return self.prefix + check_key(key)

    # --- ObjectStore ---------------------------------------------------------------------------
    def local_path(self, key: str) -> Path | None:
        return None

    async def stat(self, key: str) -> ObjectInfo:
        client = await self._c()
        try:
            r = await client.head_object(Bucket=self.bucket, Key=self._k(key))
        except ClientError as e:
            if _code(e) in _NOT_FOUND:
                raise ObjectNotFound(key) from None
            raise
        return ObjectInfo(
            key=key,
            size=int(r["ContentLength"]),
            mtime=r["LastModified"].timestamp(),
            etag=_quoted(r["ETag"]),
        )

    async def exists(self, key: str) -> bool:
        try:
            await self.stat(key)
        except ObjectNotFound:
            return False
        return True

    async def open_range(
        self, key: str, start: int = 0, length: int | None = None, chunk: int = 256 * 1024
    ) -> AsyncIterator[bytes]:
        full_key = self._k(key)  # validate before the first await
        if length == 0:
            return
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": full_key}
        if length is not None:
            args["Range"] = f"bytes={start}-{start + length - 1}"  # RFC 9110 §14.1.2
        elif start:
            args["Range"] = f"bytes={start}-"
        client = await self._c()
        try:
            r = await client.get_object(**args)
        except ClientError as e:
            if _code(e) in _NOT_FOUND:
                raise ObjectNotFound(key) from None
            if _code(e) == "InvalidRange":
                return  # start at or past the end: nothing to read, like a file
            raise
        body = r["Body"]
        try:
            remaining = length
            while remaining is None or remaining > 0:
                data = await body.read(chunk if remaining is None else min(chunk, remaining))
                if not data:
                    break
                if remaining is not None:
                    remaining -= len(data)
                yield data
        finally:
            body.close()  # early exit (client gone) must not leave the connection half-read

    async def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        client = await self._c()
        await client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data)
        return await self.stat(key)

    async def put_file(self, key: str, src: Path, *, move: bool = False) -> ObjectInfo:
        full_key = self._k(key)
        src = Path(src)
        size = (await asyncio.to_thread(src.stat)).st_size
        if size <= MULTIPART_THRESHOLD:
            data = await asyncio.to_thread(src.read_bytes)
            client = await self._c()
            await client.put_object(Bucket=self.bucket, Key=full_key, Body=data)
        else:
            await self._put_multipart(full_key, src, size)
        info = await self.stat(key)
        if move:
            await asyncio.to_thread(src.unlink, True)
        return info

    async def _put_multipart(self, full_key: str, src: Path, size: int) -> None:
        client = await self._c()
        up = await client.create_multipart_upload(Bucket=self.bucket, Key=full_key)
        upload_id = up["UploadId"]
        try:
            parts = []
            with open(src, "rb") as f:  # noqa: ASYNC230 - reads below run in a thread
                for number, offset in enumerate(range(0, size, PART_SIZE), start=1):
                    n = min(PART_SIZE, size - offset)
                    data = await asyncio.to_thread(os.pread, f.fileno(), n, offset)
                    if len(data) != n:
                        raise OSError(f"{src} changed while being uploaded")
                    etag = await self._upload_part(full_key, upload_id, number, data)
                    parts.append({"ETag": etag, "PartNumber": number})
            await client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=full_key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
        except BaseException:
            # Until Complete succeeds the object does not exist; abort frees the parts.
            with contextlib.suppress(Exception):
                await asyncio.shield(
                    client.abort_multipart_upload(
                        Bucket=self.bucket, Key=full_key, UploadId=upload_id
                    )
                )
            raise

    async def _upload_part(self, full_key: str, upload_id: str, number: int, data: bytes) -> str:
        client = await self._c()
        r = await client.upload_part(
            Bucket=self.bucket, Key=full_key, UploadId=upload_id, PartNumber=number, Body=data
        )
        return str(r["ETag"])

    # --- MultipartStore ----------------------------------------------------------------------
    async def create_multipart(self, key: str) -> str:
        client = await self._c()
        r = await client.create_multipart_upload(Bucket=self.bucket, Key=self._k(key))
        return str(r["UploadId"])

    async def presign_part(self, key: str, upload_id: str, number: int, expires_in: int) -> str:
        client = await self._c()
        url = await client.generate_presigned_url(
            "upload_part",
            Params={
                "Bucket": self.bucket,
                "Key": self._k(key),
                "UploadId": upload_id,
                "PartNumber": number,
            },
            ExpiresIn=expires_in,
        )
        return str(url)

    async def upload_part(self, key: str, upload_id: str, number: int, data: bytes) -> str:
        try:
            return _quoted(await self._upload_part(self._k(key), upload_id, number, data))
        except ClientError as e:
            raise MultipartError(_code(e), str(e)) from None

    async def list_parts(self, key: str, upload_id: str) -> list[PartInfo]:
        client = await self._c()
        out: list[PartInfo] = []
        try:
            async for page in client.get_paginator("list_parts").paginate(
                Bucket=self.bucket, Key=self._k(key), UploadId=upload_id
            ):
                for p in page.get("Parts", ()):
                    out.append(PartInfo(int(p["PartNumber"]), _quoted(p["ETag"]), int(p["Size"])))
        except ClientError as e:
            raise MultipartError(_code(e), str(e)) from None
        return sorted(out, key=lambda p: p.number)

    async def complete_multipart(
        self, key: str, upload_id: str, parts: list[tuple[int, str]]
    ) -> ObjectInfo:
        client = await self._c()
        try:
            await client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=self._k(key),
                UploadId=upload_id,
                MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e in parts]},
            )
        except ClientError as e:
            raise MultipartError(_code(e), str(e)) from None
        return await self.stat(key)

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        client = await self._c()
        try:
            await client.abort_multipart_upload(
                Bucket=self.bucket, Key=self._k(key), UploadId=upload_id
            )
        except ClientError as e:
            if _code(e) not in ("NoSuchUpload", "404"):
                raise

    async def list(self, prefix: str) -> list[str]:
        p = prefix.rstrip("/")
        if p:
            check_key(p)
        full = self.prefix + (p + "/" if p else "")
        client = await self._c()
        out: list[str] = []
        async for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=full
        ):
            for obj in page.get("Contents", ()):
                out.append(obj["Key"][len(self.prefix) :])
        return sorted(out)

    async def delete(self, key: str) -> None:
        client = await self._c()
        await client.delete_object(Bucket=self.bucket, Key=self._k(key))

    async def move(self, src_key: str, dst_key: str) -> None:
        src, dst = self._k(src_key), self._k(dst_key)
        client = await self._c()
        try:
            await client.copy_object(
                Bucket=self.bucket, Key=dst, CopySource={"Bucket": self.bucket, "Key": src}
            )
        except ClientError as e:
            if _code(e) in _NOT_FOUND:
                raise ObjectNotFound(src_key) from None
            raise
        await client.delete_object(Bucket=self.bucket, Key=src)
