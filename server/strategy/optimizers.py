"""Flower's server-side optimizers with the federation additions (``federation.strategy``).

They treat the averaged site update as a pseudo-gradient: FedAvgM adds server momentum
(``server_momentum``, server learning rate 1), FedAdam and FedYogi adaptive steps (Reddi et al.
2021; ``server_lr`` is their eta). Per-head re-averaging (:mod:`server.strategy.heads`) is off: it
would replace the heads' optimizer step by a plain average. The optimizer state lives in the
ServerApp process and starts afresh after a resume.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAdam, FedAvgM, FedYogi

from server.strategy.federation import FederationMixin


class GliomaFedAvgM(FederationMixin, FedAvgM):
    """FedAvg with server momentum (Hsu et al. 2019)."""

    per_head_averaging = False


class GliomaFedAdam(FederationMixin, FedAdam):
    """Adam on the server over the averaged update (Reddi et al. 2021)."""

    per_head_averaging = False


class GliomaFedYogi(FederationMixin, FedYogi):
    """Yogi on the server over the averaged update (Reddi et al. 2021)."""

    per_head_averaging = False
