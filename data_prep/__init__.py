"""Offline conversion of raw datasets into WebDataset shards + manifest.parquet."""
