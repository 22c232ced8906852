"""Enclave audit service."""
