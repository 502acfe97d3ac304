"""Errors that stop a federation; each message names the sites or processes involved and the fix."""

from __future__ import annotations


class FederationError(RuntimeError):
    """The federation cannot continue (a site, a Flower process or a CLI call failed); the message
    names the sites or processes involved and the fix."""


class NodeWaitTimeout(FederationError):
    """Too few sites connected within ``federation.node_wait_s``."""
