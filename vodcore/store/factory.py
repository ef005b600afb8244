"""Which object store a process uses, from its settings.

`make_store(settings)`: S3 (through aiobotocore) when `settings.s3_bucket` is set, else the
filesystem under `settings.store_dir`. Callers that construct a store should release it at
shutdown with `close_store` (S3 holds an HTTP connection pool; the filesystem holds nothing).
"""

from __future__ import annotations

from vodcore.config import Settings
from vodcore.store import ObjectStore
from vodcore.store.fs import FilesystemStore
from vodcore.store.s3 import S3Store


def make_store(settings: Settings) -> ObjectStore:
    if settings.s3_bucket:
        return S3Store(
            settings.s3_bucket,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            prefix=settings.s3_prefix,
        )
    return FilesystemStore(settings.store_dir)


async def close_store(store: ObjectStore) -> None:
    """Release what a store holds (a no-op for stores without `close`)."""
    close = getattr(store, "close", None)
    if close is not None:
        await close()
