"""The server's strategies: one file per strategy, the shared federation additions, reply
screening, bounds, site identities and client-level differential privacy.

``build_strategy`` picks one by ``federation.strategy``; ``build_privacy`` the DP averaging of
``federation.dp``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.config import STRATEGIES, FederationConfig, choice_error
from server.errors import FederationError, NodeWaitTimeout
from server.schedule import RoundSchedule
from server.strategy.bounds import UpdateBounds
from server.strategy.fedavg import GliomaFedAvg
from server.strategy.federation import FederationMixin
from server.strategy.fedprox import GliomaFedProx
from server.strategy.identity import SiteRegistry, read_registered_sites
from server.strategy.optimizers import GliomaFedAdam, GliomaFedAvgM, GliomaFedYogi
from server.strategy.privacy import PrivateAveraging
from server.strategy.robust import (
    GliomaBulyan,
    GliomaFedMedian,
    GliomaFedTrimmedAvg,
    GliomaKrum,
)

__all__ = ["FederationError", "FederationMixin", "GliomaFedAvg", "GliomaFedProx", "NodeWaitTimeout",
           "PrivateAveraging", "build_privacy", "build_strategy"]


def build_privacy(federation: FederationConfig, state: Path | None = None) -> PrivateAveraging | None:
    """The client-level DP averaging of ``federation.dp`` (None when off); ``state``: where its
    accounting persists (the run folder's privacy.json), None to keep it in memory."""
    if federation.dp == "off":
        return None
    return PrivateAveraging(
        federation.dp,
        noise_multiplier=federation.dp_noise_multiplier,
        clipping_norm=federation.dp_clipping_norm,
        delta=federation.dp_delta,
        epsilon_budget=federation.dp_epsilon_budget,
        sites=federation.min_nodes,
        state=state,
    )


def build_strategy(
    federation: FederationConfig,
    *,
    schedule: RoundSchedule,
    identities: Path | None = None,
    privacy: PrivateAveraging | None = None,
) -> FederationMixin:
    """The strategy ``federation.strategy`` with the bounds, quorum and waits of ``federation``;
    ``identities``: where site-name bindings persist (the run folder), None to keep them in memory;
    ``privacy``: the DP averaging (:func:`build_privacy`) that replaces the bounds and the weighted
    average, None for none."""
    common: dict[str, Any] = dict(
        schedule=schedule,
        node_wait_s=federation.node_wait_s,
        rejoin_wait_s=federation.rejoin_wait_s,
        quorum=federation.quorum,
        on_quorum_fail=federation.on_quorum_fail,
        bounds=UpdateBounds(
            mode=federation.update_bound,
            max_update_ratio=federation.max_update_ratio,
            max_examples=federation.max_examples,
            max_examples_ratio=federation.max_examples_ratio,
        ),
        registry=SiteRegistry(identities, read_registered_sites(Path(federation.registered_sites))
                              if federation.registered_sites else None),
        wire_dtype=federation.wire_dtype,
        privacy=privacy,
        min_train_nodes=federation.min_nodes,
        min_evaluate_nodes=federation.min_nodes if schedule.evaluate_sites else 0,
        min_available_nodes=federation.min_nodes,
        fraction_evaluate=1.0 if schedule.evaluate_sites else 0.0,
        weighted_by_key="num-examples",
    )
    name = federation.strategy
    if name == "fedprox":
        return GliomaFedProx(proximal_mu=federation.proximal_mu, **common)
    if name == "fedavg":
        return GliomaFedAvg(**common)
    if name == "fedavgm":
        return GliomaFedAvgM(server_learning_rate=1.0, server_momentum=federation.server_momentum, **common)
    if name == "fedadam":
        return GliomaFedAdam(eta=federation.server_lr, **common)
    if name == "fedyogi":
        return GliomaFedYogi(eta=federation.server_lr, **common)
    if name == "fedmedian":
        return GliomaFedMedian(**common)
    if name == "fedtrimmedavg":
        return GliomaFedTrimmedAvg(beta=federation.trimmed_beta, **common)
    if name == "krum":
        return GliomaKrum(num_malicious_nodes=federation.num_malicious, **common)
    if name == "bulyan":
        return GliomaBulyan(num_malicious_nodes=federation.num_malicious, **common)
    raise choice_error("strategy (federation.strategy)", name, STRATEGIES)
