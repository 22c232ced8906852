"""Enclave ingest service."""
