"""Flower's robust aggregators with the federation additions (``federation.strategy``).

They replace the weighted mean, so a site that scales or sign-flips its update cannot steer the
global model alone: FedMedian (coordinate-wise median), FedTrimmedAvg (mean without the
``trimmed_beta`` tails), Krum (the one update closest to the others) and Bulyan (Krum selection,
then a trimmed mean; needs at least 4 x ``num_malicious`` + 3 sites). Per-head re-averaging
(:mod:`server.strategy.heads`) does not apply: there is no weight to re-balance.
"""

from __future__ import annotations

from flwr.serverapp.strategy import Bulyan, FedMedian, FedTrimmedAvg, Krum

from server.strategy.federation import FederationMixin


class GliomaFedMedian(FederationMixin, FedMedian):
    """Coordinate-wise median of the screened updates (Yin et al. 2018)."""

    per_head_averaging = False


class GliomaFedTrimmedAvg(FederationMixin, FedTrimmedAvg):
    """Coordinate-wise trimmed mean of the screened updates (Yin et al. 2018)."""

    per_head_averaging = False


class GliomaKrum(FederationMixin, Krum):
    """Krum (Blanchard et al. 2017): the update with the smallest distance to its neighbours."""

    per_head_averaging = False


class GliomaBulyan(FederationMixin, Bulyan):
    """Bulyan (El Mhamdi et al. 2018): Krum selection followed by a trimmed mean."""

    per_head_averaging = False
