"""The multi-task network (:mod:`common.model.network`) and its parts: fusion, expert fusion,
imputation, task weighting; :func:`build_model` builds it from the ``model`` config section."""

from common.model.network import GliomaOutput, MultiTaskGliomaNet, build_model

__all__ = ["GliomaOutput", "MultiTaskGliomaNet", "build_model"]
