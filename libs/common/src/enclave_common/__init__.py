"""Enclave shared library: event contract, settings, logging, errors, Kafka plumbing, crypto."""
