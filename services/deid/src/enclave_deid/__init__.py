"""Enclave deid service."""
