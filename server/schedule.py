"""Which stage each federated round runs, and the config sent with it.

Rounds are numbered globally (1, 2, ...) across resumes: a run resumed after round 4 calls the
strategy's round 1 but this schedule maps it to global round 5 (``offset=4``).

Stages (in order):
  1. ``pretrain_imputer`` for the first ``imputation.pretrain_rounds`` rounds when the model has
     an imputer (GMENet self-supervised pre-training; sites without complete cases skip it);
  2. ``supervised`` rounds; after ``ssl.warmup_rounds`` of them, pseudo-labeling is switched on
     (``pseudo-label=True``) when ``ssl.enabled``.

Site validation of the global models (``federation.evaluate_sites``): a site validates the model it
receives inside round g's training message (``validate=True`` in the round config), for the models
of every ``validate_every``-th round; the final model is validated by one evaluate message after
the last round. With ``federation.site_validation=in_train`` it validates before training and
round g's replies carry the validation of global model g-1 (:attr:`RoundSchedule.validation_lag`
1); with ``after_reply`` it validates after sending its reply, off the round's critical path, and
its next reply carries it: model g-1's validation arrives with round g+1's replies, or with the
evaluate message after the last round (lag 2). Every reply tags its validation with the model's
global round. With ``message`` every round has an evaluate message, as Flower's strategies do by
default.
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

    @property
    def final_round(self) -> int:
        return self.cfg.federation.rounds

    @property
    def in_train_validation(self) -> bool:
        """The sites validate the received models inside the training messages (not in evaluate messages)."""
        return self.evaluate_sites and self.cfg.federation.site_validation in {"in_train", "after_reply"}

    @property
    def validation_lag(self) -> int:
        """Round g's training replies bring the validation of the model of round g - lag at the latest."""
        return 2 if self.cfg.federation.site_validation == "after_reply" else 1

    def model_validated(self, global_round: int) -> bool:
        """Whether the sites validate the global model of ``global_round`` (0: the initial one)."""
        if not self.evaluate_sites:
            return False
        return (not self.in_train_validation or global_round % self.cfg.federation.validate_every == 0
                or global_round == self.final_round)

    def validated_in_train(self, global_round: int) -> bool:
        """Whether the model of ``global_round`` is validated inside the next round's training message."""
        return self.in_train_validation and global_round < self.final_round and self.model_validated(global_round)

    def evaluate_message(self, server_round: int) -> bool:
        """Whether round ``server_round`` ends with an evaluate message to the sites."""
        if not self.evaluate_sites:
            return False
        return not self.in_train_validation or self.global_round(server_round) == self.final_round

    def global_round(self, server_round: int) -> int:
        return self.offset + server_round

    def stage(self, global_round: int) -> str:
        if self.cfg.model.imputation and global_round <= self.cfg.imputation.pretrain_rounds:
            return "pretrain_imputer"
        return "supervised"

    def stage_name(self, global_round: int) -> str:
        """What metrics.json, the report and the progress call the round: its stage, with the
        supervised rounds that (re)select pseudo-labels named ``pseudo_label``."""
        if global_round == 0:
            return "initial"
        stage = self.stage(global_round)
        return "pseudo_label" if stage == "supervised" and self.pseudo_labeling(global_round) else stage

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
            # the next round re-selects pseudo-labels: a site's worker may select them after this reply
            "select-after-reply": g < self.final_round and self.pseudo_labeling(g + 1),
            # after a resume the received model (round `offset`) was validated before the restart
            "validate": self.validated_in_train(g - 1) and not (server_round == 1 and self.offset > 0),
            "freeze-imputer": bool(
                self.cfg.model.imputation and self.cfg.imputation.freeze and stage != "pretrain_imputer"
                and self.cfg.imputation.pretrain_rounds > 0
            ),
        }

    def evaluate_config(self, server_round: int) -> dict[str, bool | int | float | str]:
        return {"global-round": self.global_round(server_round)}
