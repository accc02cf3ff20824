"""Ingestion: run logs into the store, exactly once, with run status decided on the way."""

from __future__ import annotations

from gradwatch.ingest.ingester import Ingester, ingest_pending
from gradwatch.ingest.liveness import DEFAULT_STALE_AFTER_S
from gradwatch.ingest.report import Batch, IngestReport

__all__ = ["DEFAULT_STALE_AFTER_S", "Batch", "IngestReport", "Ingester", "ingest_pending"]
