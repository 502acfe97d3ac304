"""The server's strategies: one file per strategy, the shared federation additions and reply screening.

``build_strategy`` picks one by ``federation.strategy``.
"""

from __future__ import annotations

from typing import Any

from common.config import STRATEGIES, choice_error
from server.errors import FederationError, NodeWaitTimeout
from server.schedule import RoundSchedule
from server.strategy.fedavg import GliomaFedAvg
from server.strategy.federation import FederationMixin
from server.strategy.fedprox import GliomaFedProx

__all__ = ["FederationError", "FederationMixin", "GliomaFedAvg", "GliomaFedProx", "NodeWaitTimeout", "build_strategy"]


def build_strategy(name: str, *, schedule: RoundSchedule, min_nodes: int, node_wait_s: float, proximal_mu: float) -> FederationMixin:
    common: dict[str, Any] = dict(
        schedule=schedule,
        node_wait_s=node_wait_s,
        min_train_nodes=min_nodes,
        min_evaluate_nodes=min_nodes if schedule.evaluate_sites else 0,
        min_available_nodes=min_nodes,
        fraction_evaluate=1.0 if schedule.evaluate_sites else 0.0,
        weighted_by_key="num-examples",
    )
    if name == "fedprox":
        return GliomaFedProx(proximal_mu=proximal_mu, **common)
    if name == "fedavg":
        return GliomaFedAvg(**common)
    raise choice_error("strategy (federation.strategy)", name, STRATEGIES)
