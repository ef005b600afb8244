"""Metadata store: SQLAlchemy 2 Core tables whose queries run unchanged on SQLite and
PostgreSQL. The job queue (`jobs.py`) and the event log (`events` table, an outbox written in
the same transaction as the change it records) live here too."""
