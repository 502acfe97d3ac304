"""Which stage each federated round runs, and the config sent with it.

Rounds are numbered globally (1, 2, ...) across resumes: a run resumed after round 4 calls the
strategy's round 1 but this schedule maps it to global round 5 (``offset=4``).

Stages (in order):
  1. ``pretrain_imputer`` for the first ``imputation.pretrain_rounds`` rounds when the model has
     an imputer (GMENet self-supervised pre-training; sites without complete cases skip it);
  2. ``supervised`` rounds; after ``ssl.warmup_rounds`` of them, pseudo-labeling is switched on
     (``pseudo-label=True``) when ``ssl.enabled``.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.config import ExperimentConfig


@dataclass(frozen=True)
class RoundSchedule:
    cfg: ExperimentConfig
    offset: int = 0  # rounds already completed before this process started (resume)

    @property
    def evaluate_sites(self) -> bool:
        return self.cfg.federation.evaluate_sites

    def global_round(self, server_round: int) -> int:
        return self.offset + server_round

    def stage(self, global_round: int) -> str:
        if self.cfg.model.imputation and global_round <= self.cfg.imputation.pretrain_rounds:
            return "pretrain_imputer"
        return "supervised"

    def pseudo_labeling(self, global_round: int) -> bool:
        if not self.cfg.ssl.enabled:
            return False
        first_supervised = (self.cfg.imputation.pretrain_rounds if self.cfg.model.imputation else 0) + 1
        return global_round >= first_supervised + self.cfg.ssl.warmup_rounds

    def train_config(self, server_round: int) -> dict[str, bool | int | float | str]:
        g = self.global_round(server_round)
        stage = self.stage(g)
        epochs = self.cfg.imputation.pretrain_epochs if stage == "pretrain_imputer" else self.cfg.train.local_epochs
        return {
            "global-round": g,
            "stage": stage,
            "lr": float(self.cfg.train.lr),
            "local-epochs": int(epochs),
            "pseudo-label": self.pseudo_labeling(g),
            "freeze-imputer": bool(
                self.cfg.model.imputation and self.cfg.imputation.freeze and stage != "pretrain_imputer"
                and self.cfg.imputation.pretrain_rounds > 0
            ),
        }

    def evaluate_config(self, server_round: int) -> dict[str, bool | int | float | str]:
        return {"global-round": self.global_round(server_round)}
