"""FedProx with the federation additions of :mod:`server.strategy.federation`."""

from __future__ import annotations

from flwr.serverapp.strategy import FedProx

from server.strategy.federation import FederationMixin


class GliomaFedProx(FederationMixin, FedProx):
    """FedProx (Li et al.): FedAvg plus ``proximal-mu`` in the round config for the sites."""
