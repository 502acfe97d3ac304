"""FedAvg weighted by training cases, with the federation additions of :mod:`server.strategy.federation`."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg

from server.strategy.federation import FederationMixin


class GliomaFedAvg(FederationMixin, FedAvg):
    """FedAvg (McMahan et al.) weighted by training cases, with the federation additions."""
