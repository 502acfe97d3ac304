"""Synthetic overall survival from molecular status and grade: a Weibull proportional-hazards model
with administrative censoring and loss to follow-up.

``S(t | x) = exp(-(t / scale)^SHAPE * HR(x))`` with ``HR(x)`` the product of the hazard ratios
below for the markers a tumor has, relative to the reference group (IDH-wildtype, grade 4, MGMT
unmethylated, 1p/19q intact: glioblastoma treated with radiotherapy and temozolomide). The values
are round numbers inside the ranges reported in the literature, not a fit to any cohort (sources
in docs/synthetic-cohort.md, "Survival"):

* IDH-mutant vs wildtype: HR 0.35. Yan et al., N Engl J Med 2009;360:765-773 (median overall
  survival of IDH-mutant vs wildtype glioblastoma 31 vs 15 months, anaplastic astrocytoma 65 vs 20);
  Eckel-Passow et al., N Engl J Med 2015;372:2499-2508.
* Grade 4 vs grades 2-3 at the same IDH status: HR 2.5 (WHO CNS5, Louis et al., Neuro Oncol
  2021;23:1231-1251; grade stays prognostic within IDH-mutant astrocytoma).
* MGMT promoter methylated vs unmethylated under temozolomide: HR 0.5. Hegi et al., N Engl J Med
  2005;352:997-1003 (median 21.7 vs 12.7 months with temozolomide; methylation an independent
  favourable factor, HR about 0.45).
* 1p/19q codeleted vs intact (IDH-mutant tumors only, the only ones codeleted here): HR 0.5.
  Cairncross et al., J Clin Oncol 2013;31:337-343 (RTOG 9402); Eckel-Passow et al. 2015.

Baseline: the reference group's median is ``BASELINE_MEDIAN_DAYS`` (12.7 months, Hegi et al. 2005,
unmethylated, temozolomide arm; Stupp et al., N Engl J Med 2005;352:987-996 report 14.6 months
for all patients); a Weibull shape above 1 makes the hazard rise with time, as after glioblastoma
treatment. Censoring: follow-up ends uniformly between ``FOLLOW_UP_DAYS`` (administrative), and a
patient is lost to follow-up at ``LOSS_PER_YEAR`` a year; the observed time is the earliest of
death, end of follow-up and loss.
"""

from __future__ import annotations

import math

import numpy as np

from synth.tumor import MolecularStatus

#: Hazard ratio of each marker against the reference group (see the module docstring).
HAZARD_RATIOS: dict[str, float] = {"idh_mutant": 0.35, "hgg": 2.5, "methylated": 0.5, "codeleted": 0.5}
#: Median survival (days) of the reference group: IDH-wildtype grade 4, MGMT unmethylated.
BASELINE_MEDIAN_DAYS = 12.7 * 30.44
WEIBULL_SHAPE = 1.3
#: Administrative censoring: the study's follow-up of a case ends uniformly in this range (days).
FOLLOW_UP_DAYS = (365.0, 6 * 365.0)
#: Rate of loss to follow-up, per year.
LOSS_PER_YEAR = 0.05


def log_hazard_ratio(status: MolecularStatus) -> float:
    """``log HR(x)`` of a tumor against the reference group (the true risk; higher = shorter life)."""
    reference = {"idh_mutant": False, "hgg": True, "methylated": False, "codeleted": False}
    log_hr = 0.0
    for marker, hr in HAZARD_RATIOS.items():
        has = getattr(status, marker)
        if has != reference[marker]:
            log_hr += math.log(hr) if has else -math.log(hr)
    return log_hr


def sample_survival(status: MolecularStatus, rng: np.random.Generator) -> tuple[float, int]:
    """(observed days, event: 1 death observed, 0 censored) of one patient; always three draws
    from ``rng``, so that the draws of the next case do not depend on this one's outcome."""
    u_death, u_follow_up, u_loss = rng.random(3)
    scale = BASELINE_MEDIAN_DAYS / math.log(2.0) ** (1.0 / WEIBULL_SHAPE)
    death = scale * (-math.log(1.0 - u_death) / math.exp(log_hazard_ratio(status))) ** (1.0 / WEIBULL_SHAPE)
    follow_up = FOLLOW_UP_DAYS[0] + u_follow_up * (FOLLOW_UP_DAYS[1] - FOLLOW_UP_DAYS[0])
    loss = -math.log(1.0 - u_loss) * 365.0 / LOSS_PER_YEAR
    censor = min(follow_up, loss)
    return (float(round(death)), 1) if death <= censor else (float(round(censor)), 0)
