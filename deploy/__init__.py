"""Certificates and keys, the local TLS federation, the demo and the in-process federation."""
