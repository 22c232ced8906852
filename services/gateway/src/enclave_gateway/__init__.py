"""Enclave gateway service."""
