"""Batch APIs: jobs of handle_batch over item lists, files and NDJSON (docs/batch.md)."""
