"""What a site may disclose: aggregate scalars over enough cases, and errors without case details.

Only weights and aggregate metrics leave a site. Two things break that without looking like it:

* a metric over one or two cases *is* those cases (a validation AUC over 2 cases, the mean
  confidence of a single accepted pseudo-label): every group of metrics computed over fewer than
  ``federation.min_metric_cases`` cases is left out of the reply, and a validation split that small
  sends no metric at all (its reply has weight 0; the server records it as skipped);
* an exception's text names case IDs, files and the site's paths: error replies carry the error
  class and counts only (:func:`public_reason`); the full text goes to the site's own log
  (:func:`site_logger`), which stays at the site.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from common.config import ConfigError
from common.contract import SEG_METRIC_KEYS, TASKS
from common.data.site import NoUsableCaseError
from common.wire import WireFormatError

LOG_FILE = "site.log"  # in the site's state folder

#: exceptions whose text is written to be shown off-site (counts, config keys, group names)
PUBLIC_TEXT: tuple[type[BaseException], ...] = (NoUsableCaseError, ConfigError, WireFormatError)


def withhold_small_groups(metrics: Mapping[str, float], n_seg: int, min_cases: int) -> dict[str, float]:
    """``metrics`` (one site's validation) without the groups computed over < ``min_cases`` cases:
    a task's metrics (``*_<task>``, calibration statistics ``cal_*_<task>`` included) when it has
    fewer labeled cases (``n_<task>``), the segmentation metrics when fewer cases have a reference
    segmentation (``n_seg``), the C-index when fewer cases have a known survival (``n_survival``), and
    everything when the split itself is that small."""
    out = dict(metrics)
    if float(out.get("n_cases", out.get("num-examples", 0.0))) < min_cases:
        return {"num-examples": 0.0, "n_cases": 0.0, "withheld": 1.0}
    for task in TASKS:
        if float(out.get(f"n_{task}", 0.0)) < min_cases:
            for key in [k for k in out if k.endswith(f"_{task}") and k != f"n_{task}"]:
                del out[key]
    if n_seg < min_cases:
        for key in SEG_METRIC_KEYS:
            out.pop(key, None)
    if float(out.get("n_survival", 0.0)) < min_cases:
        out.pop("cindex", None)
    return out


def withhold_small_pseudo_label_groups(metrics: Mapping[str, float], min_cases: int) -> dict[str, float]:
    """Pseudo-label metrics without the confidences of fewer than ``min_cases`` accepted (or
    candidate) cases; the counts themselves stay (they are counts, not case outputs)."""
    out = dict(metrics)
    for task in TASKS:
        if float(out.get(f"pseudo_{task}_accepted", 0.0)) < min_cases:
            out.pop(f"pseudo_{task}_confidence", None)
            out.pop(f"pseudo_{task}_majority_share", None)
        if float(out.get(f"pseudo_{task}_candidates", 0.0)) < min_cases:
            out.pop(f"pseudo_{task}_candidate_confidence", None)
    return out


def public_reason(exc: BaseException, stage: str, secrets: Iterable[str] = ()) -> str:
    """The text an error reply may carry: the error class, and its message only for the exceptions
    written for it (:data:`PUBLIC_TEXT`); anything in ``secrets`` (paths, case IDs, file names) is
    redacted from it in any case."""
    if isinstance(exc, PUBLIC_TEXT):
        text = f"{type(exc).__name__}: {exc}"
    else:
        text = f"{type(exc).__name__} during {stage} at the site"
    for secret in sorted({s for s in secrets if s and len(s) > 2}, key=len, reverse=True):
        text = text.replace(secret, "<redacted>")
    # any absolute path left over (e.g. inside a library's message)
    text = re.sub(r"(?<![\w<])/(?:[\w.\-]+/)+[\w.\-]*", "<path>", text)
    return f"{text} (details in the site's log)"


def site_logger(state_dir: Path | None) -> logging.Logger:
    """The site's local log: stderr (the SuperNode's console) and ``<state folder>/site.log``."""
    logger = logging.getLogger("fedglioma.site")
    logger.setLevel(logging.INFO)
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) for h in logger.handlers):
        logger.addHandler(logging.StreamHandler())
    if state_dir is not None:
        path = (state_dir / LOG_FILE).resolve()
        if not any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path for h in logger.handlers):
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                handler = logging.FileHandler(path)
                handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
                logger.addHandler(handler)
            except OSError:
                logger.warning("cannot write the site log in %s; logging to stderr only", path.parent)
    return logger
