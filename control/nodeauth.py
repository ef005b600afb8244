"""Authentication of the nodes (edges, shields, origins) on control's node endpoints.

Filled in by issue 11's node-plane work: `install` guards the purge stream, the acks, the
cutoffs and node registration with a per-node credential."""

from __future__ import annotations

from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from vodcore.config import Settings


def install(app: web.Application, engine: AsyncEngine, settings: Settings) -> None:
    """Guard the node endpoints of `app` (control)."""
