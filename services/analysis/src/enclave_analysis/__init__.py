"""Enclave analysis service."""
