"""Tables of the search read model (derived data: `control.search` fills them from the event log).

- `search_docs`: one row per *searchable* video (READY and public), keyed by `video_id`, with an
  integer `doc_id` that is the row id of the document in the SQLite FTS5 table;
- SQLite: `search_fts`, an FTS5 virtual table (`unicode61 remove_diacritics 2`, so "cafe" finds
  "Café"), created by raw DDL after `search_docs` (and again, idempotently, by the indexer at
  start); its rowid is `search_docs.doc_id`;
- PostgreSQL: `search_docs.tsv`, a `tsvector` kept by the indexer (title weight A, description
  weight B, configuration `simple`: no stemming, so titles in any language tokenize alike),
  with a GIN index. On SQLite the column is an unused nullable TEXT and the GIN index is not
  created.

Nothing here is the source of truth: `vod reindex` drops every row and replays the log.
"""

from __future__ import annotations

from sqlalchemy import DDL, Column, Float, Index, Integer, String, Table, Text, event
from sqlalchemy.dialects.postgresql import TSVECTOR

from vodcore.db.schema import metadata

FTS_TABLE = "search_fts"
FTS_DDL = (
    f"CREATE VIRTUAL TABLE IF NOT EXISTS {FTS_TABLE} USING fts5("
    "title, description, tokenize = 'unicode61 remove_diacritics 2')"
)

search_docs = Table(
    "search_docs",
    metadata,
    Column("doc_id", Integer, primary_key=True, autoincrement=True),
    Column("video_id", String(40), nullable=False, unique=True),
    Column("title", Text, nullable=False),
    Column("description", Text, nullable=False, default=""),
    Column("tsv", Text().with_variant(TSVECTOR(), "postgresql"), nullable=True),
    Column("indexed_at", Float, nullable=False),
)

Index("ix_search_docs_tsv", search_docs.c.tsv, postgresql_using="gin").ddl_if(dialect="postgresql")

event.listen(
    search_docs,
    "after_create",
    DDL(FTS_DDL).execute_if(dialect="sqlite"),  # type: ignore[no-untyped-call]
)
event.listen(
    search_docs,
    "after_drop",
    DDL(f"DROP TABLE IF EXISTS {FTS_TABLE}").execute_if(dialect="sqlite"),  # type: ignore[no-untyped-call]
)
