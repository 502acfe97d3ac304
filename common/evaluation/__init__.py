"""Metrics, the evaluation loop and MC-dropout uncertainty."""
