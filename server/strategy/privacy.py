"""Client-level differential privacy of the global models (``federation.dp``: fixed | adaptive).

What one site's participation can change in a released global model is bounded and masked:

* every site's update ``w_site - w_global`` (its floating-point arrays as one vector) is clipped
  to the L2 norm C (``dp_clipping_norm``; ``adaptive``: C then follows the median update norm,
  Andrew et al. 2021, https://arxiv.org/abs/1905.03871, starting from ``dp_clipping_norm``);
* the clipped updates are averaged with equal weights (a weight by case count would give a large
  site an influence above C/N) and Gaussian noise of std z*C/N is added (z =
  ``dp_noise_multiplier``, N = the sites averaged this round);
* each release is composed in Flower's RDP accountant (``flwr.serverapp.RdpAccountant``, from
  ``flwr[dp]``): client-level, add-or-remove-one site, no sampling amplification (every connected
  site takes part); epsilon is reported at ``dp_delta``.

The server clips, with Flower's ``compute_clip_model_update``, after the federation's screening
(:mod:`server.strategy.federation`); the noise, the equal-weight FedAvg and the adaptive norm are
Flower's wrappers for pre-clipped updates (``DifferentialPrivacyClientSide{Fixed,Adaptive}Clipping``
around Flower's ``FedAvg``; no client mod is needed: a site that skipped its mod would go
unclipped). Flower's server-side wrappers do not fit as they are:

* ``validate_replies`` skips the whole aggregation when any reply is an error (all wrappers):
  the screening has already dropped failed and rejected sites;
* their clipping divides by the update's norm (``ZeroDivisionError`` for a site that returns the
  model it received, which any site could do to stop the federation) and scales every array in
  place (``array *= factor`` fails on integer arrays): here a zero update is left as it is and
  only the floating-point arrays are clipped, the others keep the global model's values;
* the noise's N is the wrapper's ``num_sampled_clients``: it is set to the replies averaged;
* the wrappers' own accountant needs the wrapped strategy's ``aggregate_train`` to be FedAvg's
  and every sampled site to reply: the accountant is used here directly (same class, same events).

Two things of Flower 1.41's adaptive wrappers are mended in :class:`AdaptiveClipping`; see there.
The accountant's state (and the adaptive clipping norm) is kept in the run folder
(``privacy.json``, written atomically after every release), so a resumed run continues the
accounting; a resume from an earlier checkpoint gives no budget back (its releases happened).

Only the weights are protected: the scalar metrics in the replies (losses, validation scores,
case counts) are not noised and not accounted. No torch here; arrays are numpy.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp import PrivacyConfig, RdpAccountant
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    FedAvg,
)
from flwr.supercore import log
from flwr.supercore.differential_privacy import KEY_NORM_BIT, compute_clip_model_update
from flwr.supercore.privacy_accounting import GaussianPrivacyEvent, NeighboringRelation, SamplingMethod

from common.config import DP_MODES, choice_error
from common.io import atomic_write
from server.strategy.bounds import update_distance

#: The metric every averaged reply is weighted by under DP: 1 for each site (equal weights).
EQUAL_WEIGHT_KEY = "dp-weight"
#: Schema of privacy.json.
STATE_VERSION = 1


class AdaptiveClipping(DifferentialPrivacyClientSideAdaptiveClipping):
    """Flower's adaptive clipping, with the norm update after the noise and towards the target.

    Flower 1.41 (``serverapp/strategy/dp_adaptive_clipping.py``, both wrappers) counts the
    *clipped* updates (``norm_bit``: ``scaling_factor < 1`` in ``adaptive_clip_inputs_inplace``)
    but applies Andrew et al.'s rule for the *unclipped* fraction, ``C <- C exp(-lr (fraction -
    target))``: C shrinks when every update is clipped and grows when none is. It also updates C
    before adding the noise, so the noise is scaled to the next round's norm rather than to the
    one the updates were clipped to (less noise than z*C/N whenever C shrinks). Here the update
    gets the unclipped fraction and waits until the noise is added.
    """

    _fraction: float | None = None

    def _geometric_update(self, clipped_fraction: float) -> None:
        self._fraction = clipped_fraction  # applied in aggregate_train, after the noise

    def aggregate_train(
        self, server_round: int, replies: Any
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self._fraction = None
        out = super().aggregate_train(server_round, replies)
        if self._fraction is not None:
            super()._geometric_update(1.0 - self._fraction)
        return out


class PrivateAveraging:
    """Clipped, equally weighted, noised averaging of screened replies, with accounting.

    Args:
        mode: ``fixed`` or ``adaptive`` (:data:`common.config.DP_MODES` without ``off``).
        noise_multiplier: z; the noise std on the average is z*C/N.
        clipping_norm: C (``adaptive``: the initial C).
        delta: the delta epsilon is reported at.
        epsilon_budget: the epsilon no run may exceed (0: no budget).
        sites: the federation's size (the accountant's population; min_nodes).
        state: where the accountant's state persists (privacy.json in the run folder); None keeps
            it in memory.
    """

    def __init__(
        self,
        mode: str,
        *,
        noise_multiplier: float,
        clipping_norm: float,
        delta: float,
        epsilon_budget: float = 0.0,
        sites: int,
        state: Path | None = None,
    ) -> None:
        if mode not in DP_MODES or mode == "off":
            raise choice_error("DP mode (federation.dp)", mode, [m for m in DP_MODES if m != "off"])
        self.mode = mode
        self.epsilon_budget = epsilon_budget
        self.sites = sites
        self.state = state
        # Flower's FedAvg, weighted equally: EQUAL_WEIGHT_KEY is 1 in every reply
        averaging = FedAvg(weighted_by_key=EQUAL_WEIGHT_KEY)
        self.wrapper: DifferentialPrivacyClientSideFixedClipping | AdaptiveClipping
        if mode == "fixed":
            self.wrapper = DifferentialPrivacyClientSideFixedClipping(averaging, noise_multiplier, clipping_norm, sites)
            self.accounted_multiplier = noise_multiplier
        else:
            # Flower's default count noise (sites/20) would be far below z for a few sites (and is
            # refused when z >= sites/10); 2z leaves the arrays most of the noise: Flower gives them
            # (z^-2 - (2 sigma_b)^-2)^-1/2 = 1.03 z.
            self.wrapper = AdaptiveClipping(averaging, noise_multiplier, sites, initial_clipping_norm=clipping_norm,
                                            clipped_count_stddev=2.0 * noise_multiplier)
            # Flower's split follows Andrew et al.'s Theorem 1, which counts bits centred at 1/2
            # (sensitivity 1/2); the wrapper noises the raw count of clipped updates, which adding or
            # removing one site changes by 1: the release is accounted as one Gaussian mechanism
            # with (z_arrays^-2 + sigma_b^-2)^-1/2 = 0.92 z (conservative).
            sigma_b = self.wrapper.clipped_count_stddev
            self.accounted_multiplier = (self.wrapper.noise_multiplier ** -2 + sigma_b ** -2) ** -0.5
        self.noise_multiplier = noise_multiplier
        self.accountant = RdpAccountant(PrivacyConfig(
            target_delta=delta,
            population_size=sites,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        ))
        self.releases: list[dict[str, Any]] = []  # one entry per noised global model
        self.clipped: dict[str, str] = {}  # the round's clipped sites and their update norms
        self._load()

    # ------------------------------------------------------------ accounting
    @property
    def clipping_norm(self) -> float:
        """The clipping norm of the next release (adaptive: after the last update)."""
        return float(self.wrapper.clipping_norm)

    def event(self) -> GaussianPrivacyEvent:
        """One release: a Gaussian mechanism over all sites (no amplification by sampling; the
        sample size is only reported, so it is the federation's size)."""
        return GaussianPrivacyEvent(noise_multiplier=self.accounted_multiplier, sample_size=self.sites,
                                    population_size=self.sites)

    @property
    def epsilon(self) -> float:
        return self.epsilon_after(0)

    def epsilon_after(self, releases: int) -> float:
        """The epsilon spent after ``releases`` more releases (0: now)."""
        if releases == 0:
            return float(self.accountant.get_privacy_spent().epsilon) if self.accountant.num_releases else 0.0
        projected = RdpAccountant(self.accountant.config)
        projected.load_state_dict(self.accountant.state_dict())
        projected.compose(self.event(), releases)
        return float(projected.get_privacy_spent().epsilon)

    def releases_within_budget(self, wanted: int) -> int:
        """How many of ``wanted`` further releases keep epsilon within ``epsilon_budget``."""
        if self.epsilon_budget <= 0:
            return wanted
        allowed = 0
        while allowed < wanted and not self.accountant.would_exceed(self.event(), self.epsilon_budget, allowed + 1):
            allowed += 1
        return allowed

    def record(self) -> dict[str, Any]:
        """What metrics.json keeps per round: the privacy spent so far and the mechanism."""
        return {
            "epsilon": self.epsilon,
            "delta": self.accountant.config.target_delta,
            "releases": self.accountant.num_releases,
            "mode": self.mode,
            "noise_multiplier": self.noise_multiplier,
            "accounted_noise_multiplier": self.accounted_multiplier,
            "clipping_norm": self.releases[-1]["clipping_norm"] if self.releases else self.clipping_norm,
            "noise_std": self.releases[-1]["noise_std"] if self.releases else None,
            "epsilon_budget": self.epsilon_budget,
        }

    # ------------------------------------------------------------- averaging
    def aggregate(
        self, global_round: int, replies: Sequence[tuple[str, Message]], current: ArrayRecord
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The noised equal-weight average of the screened ``replies`` (site name, reply with one
        ArrayRecord and one MetricRecord) around the global model ``current``; the release is
        composed and saved. Non-floating-point arrays keep ``current``'s values. The sites whose
        update was clipped are in :attr:`clipped`."""
        if self.epsilon_budget > 0 and self.accountant.would_exceed(self.event(), self.epsilon_budget):
            raise PrivacyBudgetExhausted(
                f"round {global_round} would bring epsilon from {self.epsilon:.3g} to {self.epsilon_after(1):.3g}, "
                f"beyond federation.dp_epsilon_budget={self.epsilon_budget:g}; the round is not applied"
            )
        floats = [k for k in current.keys() if np.issubdtype(current[k].numpy().dtype, np.floating)]
        reference = [current[k].numpy() for k in floats]
        norm = self.clipping_norm
        self.clipped = {}
        for name, reply in replies:
            key = next(iter(reply.content.array_records))
            arrays = reply.content.array_records[key]
            values = [arrays[k].numpy() for k in floats]
            distance = update_distance(arrays, current)
            if distance > norm:
                self.clipped[name] = f"update norm {distance:.3g} clipped to {norm:.3g} (federation.dp_clipping_norm)"
            if distance > 0:  # Flower's clipping divides by the norm; a zero update is within it
                compute_clip_model_update(values, reference, norm)
            reply.content[key] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in zip(floats, values)})
            metrics = next(iter(reply.content.metric_records.values()))
            metrics[EQUAL_WEIGHT_KEY] = 1.0
            if self.mode == "adaptive":
                metrics[KEY_NORM_BIT] = float(distance > norm)  # what the adaptive wrapper counts
        self.wrapper.num_sampled_clients = len(replies)
        with _fresh_entropy():
            averaged, metrics = self.wrapper.aggregate_train(global_round, [reply for _, reply in replies])
        if averaged is None:
            return None, metrics
        out = ArrayRecord()
        for key in current.keys():  # the global model's key order; integer arrays unchanged
            out[key] = averaged[key] if key in floats else current[key]
        self.accountant.compose(self.event())
        self.releases.append({
            "round": global_round,
            "sites": len(replies),
            "clipping_norm": norm,
            "noise_std": self.noise_std(norm, len(replies)),
        })
        self._save()
        log(INFO, "round %d: privacy spent epsilon=%.4g at delta=%g after %d releases (clipping norm %.3g, "
            "noise std %.3g)", global_round, self.epsilon, self.accountant.config.target_delta,
            self.accountant.num_releases, norm, self.releases[-1]["noise_std"])
        return out, metrics

    def noise_std(self, clipping_norm: float, averaged: int) -> float:
        """The std of the noise on each coordinate of an average of ``averaged`` clipped updates."""
        return float(self.wrapper.noise_multiplier * clipping_norm / averaged)

    # ------------------------------------------------------------- the state
    def _save(self) -> None:
        if self.state is None:
            return
        text = json.dumps({
            "version": STATE_VERSION,
            "accountant": self.accountant.state_dict(),
            "clipping_norm": self.clipping_norm,
            "mode": self.mode,
            "releases": self.releases,
        }, indent=1)
        atomic_write(self.state, lambda tmp: tmp.write_text(text))

    def _load(self) -> None:
        if self.state is None or not self.state.exists():
            return
        fix = ("Resume with the same federation.dp_delta and federation.min_nodes, or start a new run "
               "(federation.run_name=...); never delete it to start the accounting afresh")
        try:
            saved = json.loads(self.state.read_text())
            if saved.get("version") != STATE_VERSION:
                raise ValueError(f"version {saved.get('version')!r}, expected {STATE_VERSION}")
            self.accountant.load_state_dict(saved["accountant"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise PrivacyStateError(f"{self.state} cannot continue this run's privacy accounting ({exc}). {fix}.") from None
        self.releases = list(saved.get("releases", []))
        if self.mode == "adaptive" and saved.get("mode") == "adaptive":
            self.wrapper.clipping_norm = float(saved["clipping_norm"])
        log(INFO, "privacy accounting continues from %s: %d releases, epsilon=%.4g", self.state,
            self.accountant.num_releases, self.epsilon)

    def plan(self, first_round: int, wanted: int) -> tuple[int, str | None]:
        """(rounds from ``first_round`` on whose releases keep epsilon within the budget, at most
        ``wanted``; why the run stops early, or None when all ``wanted`` fit)."""
        allowed = self.releases_within_budget(wanted)
        if allowed >= wanted:
            return wanted, None
        last = first_round + allowed - 1
        return allowed, (
            f"federation.dp_epsilon_budget={self.epsilon_budget:g}: round {last + 1} would bring epsilon to "
            f"{self.epsilon_after(allowed + 1):.3g} (after round {last}: {self.epsilon_after(allowed):.3g}, "
            f"delta={self.accountant.config.target_delta:g}, noise multiplier {self.noise_multiplier:g}); the run stops "
            f"after round {last} instead of {first_round + wanted - 1}, finished rounds are kept. To train further, "
            "resume with a larger budget or noise multiplier (the accounting continues from privacy.json)."
        )


class PrivacyStateError(RuntimeError):
    """privacy.json cannot be continued; the message names the file and the fix."""


@contextmanager
def _fresh_entropy() -> Iterator[None]:
    """Flower draws the noise from numpy's global generator, which a site's training seeds from
    ``train.seed`` (MONAI's set_determinism) when it shares the process: reseed it from the OS for
    the noise, then give the seeded stream back."""
    saved = np.random.get_state()
    np.random.seed(None)
    try:
        yield
    finally:
        np.random.set_state(saved)

