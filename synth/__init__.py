"""Synthetic multi-center glioma cohort (``fedglioma synth``): real MNI152 anatomy, tumors grown by
reaction-diffusion whose look depends on the molecular status, site-specific scanners, file
naming, missing sequences and missing labels. See docs/synthetic-cohort.md."""

from synth.cohort import PRESETS, CohortError, Preset, generate_cohort

__all__ = ["PRESETS", "CohortError", "Preset", "generate_cohort"]
