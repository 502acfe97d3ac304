"""Typed, frozen experiment configuration and its one-way flow.

Hydra composes ``common/configs/`` into a nested mapping; :func:`from_mapping` turns it into the frozen
:class:`ExperimentConfig`; :func:`to_run_config` flattens that into Flower's run-config (scalar
values only, keys ``"section.field"``); :func:`from_run_config` rebuilds the identical dataclass
from ``context.run_config`` on the server and on every site. No other code reads raw config keys.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import OmegaConf

#: The Hydra config tree, shipped inside the package (found without an editable install).
CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# The allowed values of the config's choice fields: the one list each, also used by the modules
# that implement them (fusion, losses, task weighting, strategy) to check constructor arguments.
FUSIONS: tuple[str, ...] = ("weighted", "experts")
CLASSIFIER_POOLINGS: tuple[str, ...] = ("tumor", "global")
#: ``ssl.consistency_view``: "strong" runs the student again on a strong view (CutMix, complementary
#: streams); "shared" uses the supervised pass as the student (Mean Teacher's own set-up: one student
#: pass per step feeds both losses), which halves the step's cost.
CONSISTENCY_VIEWS: tuple[str, ...] = ("strong", "shared")
#: How the classifier's output layers start (``model.classifier_head_init``).
HEAD_INITS: tuple[str, ...] = ("zero", "random")
OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd")
CLS_LOSSES: tuple[str, ...] = ("weighted_ce", "balanced_softmax", "focal")
TASK_WEIGHTINGS: tuple[str, ...] = ("uncertainty", "equal")
STRATEGIES: tuple[str, ...] = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "krum", "bulyan")
UPDATE_BOUNDS: tuple[str, ...] = ("reject", "clip", "off")
QUORUM_ACTIONS: tuple[str, ...] = ("skip", "stop")
SITE_VALIDATIONS: tuple[str, ...] = ("after_reply", "in_train", "message")
WIRE_DTYPES: tuple[str, ...] = ("float32", "float16")
DP_MODES: tuple[str, ...] = ("off", "fixed", "adaptive")
#: The strategies client-level DP works with: its noise is calibrated to a plain average.
DP_STRATEGIES: tuple[str, ...] = ("fedavg", "fedprox")
SECURE_AGGREGATIONS: tuple[str, ...] = ("off", "secaggplus")
#: The strategies SecAgg+ works with: they need only the (weighted) sum of the sites' updates, which
#: is all the protocol reveals; the robust ones (median, trimmed mean, Krum, Bulyan) need each update.
SECURE_STRATEGIES: tuple[str, ...] = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi")
#: SecAgg+'s masking modulus (Flower's default, the largest it allows): the quantized sum of all
#: sites must stay below it.
SECAGG_MODULUS = 2**32

Scalar = bool | int | float | str


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message says which and how to fix it."""


@dataclass(frozen=True)
class ModelConfig:
    """Network size and variants (see :class:`common.model.MultiTaskGliomaNet`)."""

    preset: str = "tiny"
    stem_channels: int = 8  # channels of each per-sequence stem
    base_channels: int = 16  # channels of the first encoder stage (doubled per stage)
    d_model: int = 64  # transformer width at 1/8 resolution
    transformer_layers: int = 2
    heads: int = 4
    dropout: float = 0.2  # classifier dropout (also used for MC-dropout)
    feature_dropout: float = 0.0  # dropout on encoder features (consistency training)
    fusion: str = "weighted"  # "weighted" (GMMAS eq. 1) or "experts" (GMENet DWEFM)
    imputation: bool = False  # generative imputation of missing sequences (GMENet CGGM)
    classifier_hidden: int = 64
    # "tumor": encoder features pooled inside the predicted tumor regions + segmentation
    # descriptors (volumes, fractions, location); "global": whole-volume GAP+GMP (ablation)
    classifier_pooling: str = "tumor"
    # "zero": every output layer of the classifier (each head's last layer, the descriptor paths,
    # the survival head's) starts at zero, so every case starts at logit 0 and the ranking is what
    # training learned. "random": PyTorch's default init (the ablation): in a 6-round demo run the
    # IDH descriptor path moved 0.07 from its random start (norm 0.88), so the start ranked the cases
    # (held-out AUC 0.28, the same in three runs of the same seed)
    classifier_head_init: str = "zero"
    # factor on the classification gradient into the shared encoder: at 1.0 the four heads sent
    # ~95% of the encoder's gradient in the first epoch (grad_share_* metrics); 0.1 measured better
    cls_encoder_grad: float = 0.1
    # a survival head (Cox log hazard ratio, classifier.survival) trained on labels.csv's survival_days/event
    survival_head: bool = True
    # GMMAS's tumor-protect crop (common.model.tumor_crop): 0 = off; G < data.size = the network works
    # on G^3, first on the whole brain, then on a cube around its tumor cut from the data.size^3 grid
    # (up to data.size/G times finer), which the classifier reads
    tumor_crop_size: int = 0
    tumor_crop_margin: float = 0.25  # the cube's margin around the tumor box, a fraction of its extent


@dataclass(frozen=True)
class DataConfig:
    """How cases are loaded and shaped."""

    size: int = 32  # cubic network input size (voxels)
    val_fraction: float = 0.2
    batch_size: int = 2
    num_workers: int = 0
    split_seed: int = 0
    cache: bool = True  # keep preprocessed cases in memory (small sites)
    # at a site: keep validation results and preprocessed cases on disk in its state folder, keyed by
    # each case's file fingerprint (common.data.cache); content hash = SHA-256 of the bytes, not mtime
    site_cache: bool = True
    cache_content_hash: bool = False
    complete_only: bool = False  # train only on cases with all four sequences (ablation baseline)


@dataclass(frozen=True)
class TrainConfig:
    """Local optimisation, shared by site training and the centralized/local baselines."""

    optimizer: str = "adamw"  # "adamw" or "sgd"
    lr: float = 1e-3
    weight_decay: float = 1e-5
    local_epochs: int = 1
    grad_clip: float = 5.0
    # learning-rate factor of the molecular classifier (trunk, heads, descriptor paths): with
    # FedAvg a round moves the heads about as far as one site's steps, not all sites' together.
    # With the zero-started output layers, 10 against 1 on bench-cls's 200 held-out cases (3 seeds,
    # 12 rounds): docs/benchmarks/classification.md
    head_lr_scale: float = 10.0
    # the classifier reads the reference segmentation's tumor regions (pooling weights and
    # descriptors) of the training cases that have one, instead of the still-poor predicted ones;
    # validation, held-out and predict read the predicted regions
    cls_reference_regions: bool = False
    cls_loss: str = "weighted_ce"  # "weighted_ce", "balanced_softmax" or "focal"
    focal_gamma: float = 2.0
    task_weighting: str = "uncertainty"  # "uncertainty" (Kendall) or "equal"
    segmentation: bool = True  # false: classification only (the single-task ablation)
    # Dice over the whole batch (nnU-Net's "batch Dice") instead of per case and averaged: per case,
    # any enhancing-tumor probability in a case without ET (MONAI smooths by only 1e-5) costs most of
    # that case's ET Dice term, which can teach a small network never to predict ET. The default since
    # the sites' validation preferred it in bench-cls (3 seeds) and in the demo (README)
    seg_dice_batch: bool = True
    # keep each site's AdamW state in its state folder between rounds instead of restarting it
    keep_optimizer_state: bool = False
    amp: bool = True  # only takes effect on CUDA
    seed: int = 0
    threads: int = 0  # CPU threads for torch; 0 = all cores
    max_steps: int = 0  # 0 = whole epochs; >0 caps steps per local round (benchmarks)
    progress: bool = True
    # site-level DP-SGD (client.dp_sgd, Opacus): every training case's gradient clipped to
    # dp_sgd_max_grad_norm (replaces grad_clip), Gaussian noise std dp_sgd_noise_multiplier x that
    # norm per step, Poisson-sampled batches; the site's epsilon at dp_sgd_delta accumulates in its
    # state folder over the run and is reported as dp_sgd_epsilon; the site refuses a training
    # message that would take it past dp_sgd_epsilon_budget (0 = no budget)
    dp_sgd: bool = False
    dp_sgd_noise_multiplier: float = 1.0
    dp_sgd_max_grad_norm: float = 1.0
    dp_sgd_delta: float = 1e-5
    dp_sgd_epsilon_budget: float = 0.0


@dataclass(frozen=True)
class ImputationConfig:
    """Self-supervised pre-training of the imputation module (GMENet)."""

    pretrain_rounds: int = 0  # first federated rounds that run imputation pre-training
    pretrain_epochs: int = 1  # epochs for centralized pre-training
    mask_prob: float = 0.5  # probability of masking each sequence of a complete case
    freeze: bool = True  # freeze the imputer after pre-training
    kl_weight: float = 0.1
    cycle_weight: float = 0.5


@dataclass(frozen=True)
class SSLConfig:
    """Local pseudo-labeling and consistency regularization."""

    enabled: bool = False
    warmup_rounds: int = 2  # supervised rounds before pseudo-labeling starts
    tau_c: float = 0.95  # confidence threshold
    tau_u: float = 0.1  # uncertainty threshold (std of MC-dropout probabilities)
    mc_passes: int = 10
    distribution_alignment: bool = True
    consistency: bool = False  # stage 2: EMA teacher, weak/strong augmentation
    consistency_weight: float = 1.0
    ema_decay: float = 0.99
    pseudo_weight: float = 1.0
    cutmix_alpha: float = 1.0  # Beta(a, a) of the student's CutMix boxes; 0 = no CutMix
    complementary_dropout: bool = True  # two student streams with complementary feature masks
    # "strong": the student runs again on a strong view (CutMix, complementary streams); "shared":
    # the supervised pass is the student too (one pass per step; needs cutmix_alpha=0 and
    # complementary_dropout=false)
    consistency_view: str = "strong"
    # in the site's worker (federation.site_worker), a round that precedes a pseudo-labeling round
    # selects that round's pseudo-labels after its reply, with the model it received (one round
    # older than the next round's): the selection is off the round's critical path. Without a
    # worker, or false: the pseudo-labeling round selects them itself, before training.
    select_after_reply: bool = True


@dataclass(frozen=True)
class FederationConfig:
    """Rounds, strategy and the server's bounds."""

    rounds: int = 3
    strategy: str = "fedavg"  # one of STRATEGIES
    proximal_mu: float = 0.01
    min_nodes: int = 2
    node_wait_s: float = 300.0  # give up (clear error) when nodes do not connect in time
    round_timeout_s: float = 3600.0
    evaluate_sites: bool = True  # per-site validation metrics of the global models
    # "after_reply": a site validates the received global model in the same training message, but
    # after it has sent its reply (in its worker, federation.site_worker; without one, before
    # training), and the metrics travel with its next reply: the validation is off the round's
    # critical path, and the server records a global model one round later. "in_train": before
    # training, in the same reply. Both: one message per site per round, and a last evaluate message
    # validates the final model. "message": a separate evaluate message after every round.
    site_validation: str = "after_reply"
    validate_every: int = 1  # with after_reply/in_train: validate the models of every k-th round (and the last)
    # HD95 and the lesion-wise scores in every site validation; false: only in the final model's
    # (the evaluate message after the last round). Model selection reads Dice and AUCs only, and
    # the surface distances were a third of a demo site's validation time.
    site_validation_distances: bool = False
    # the sites run their messages in a long-lived worker process (client.worker): torch, MONAI
    # and the model code are imported once, not per message; a site may refuse it with
    # site-worker="false" in its node config. The worker stops after this long without a message.
    site_worker: bool = True
    site_worker_idle_s: float = 600.0
    # float16: weights travel as float16 both ways (half the bytes); the server averages in float32
    wire_dtype: str = "float32"
    # benchmark floor only: sites reply at once with the weights they received (no data, no training)
    empty_rounds: bool = False
    heldout: str = ""  # absolute path of the held-out center (server side)
    out_dir: str = "runs"  # parent of run folders; made absolute by the launcher
    run_name: str = "demo"
    resume: bool = True  # continue from <run folder>/checkpoints/last.pt when present
    # resume from this checkpoint instead of last.pt: a file name in <run folder>/checkpoints/
    # (round-002.pt) or an absolute path; metrics.json rounds after it are dropped. "" = last.pt
    resume_from: str = ""
    # server-side optimizers on the averaged update: fedavgm (server_momentum, learning rate 1),
    # fedadam / fedyogi (server_lr is their eta)
    server_lr: float = 0.01
    server_momentum: float = 0.9
    # robust aggregation (fedtrimmedavg: fraction cut from each tail; krum/bulyan: sites assumed hostile)
    trimmed_beta: float = 0.2
    num_malicious: int = 0
    # bounded updates: an update farther from the global model than max_update_ratio x the median
    # distance of the other sites' updates is rejected or clipped to that bound ("off": neither)
    update_bound: str = "reject"
    max_update_ratio: float = 5.0
    # num-examples caps: what the site declared (n_train) when first seen, max_examples_ratio x the
    # median of the other sites, and max_examples (0 = no fixed cap)
    max_examples: int = 0
    max_examples_ratio: float = 10.0
    # a round is applied when at least this fraction of the expected sites reply usably in time;
    # below it the round is recorded and the run goes on ("skip") or stops ("stop")
    quorum: float = 0.5
    on_quorum_fail: str = "skip"
    rejoin_wait_s: float = 30.0  # after round 1, how long a phase waits for a missing site
    min_metric_cases: int = 5  # a site sends no metric computed over fewer cases than this
    # JSON {site: node_id} of the keys the coordinator registered (server.strategy.identity); "" = bind at first sight
    registered_sites: str = ""
    # client-level differential privacy of the global models (server.strategy.privacy): each site's
    # update clipped to dp_clipping_norm (adaptive: the initial norm, then following the median
    # update norm), equal-weight average, Gaussian noise std dp_noise_multiplier x norm / sites;
    # epsilon (RDP accountant) at dp_delta per round in metrics.json; the run stops before epsilon
    # would exceed dp_epsilon_budget (0 = no budget)
    dp: str = "off"  # one of DP_MODES
    dp_noise_multiplier: float = 1.0
    dp_clipping_norm: float = 1.0
    dp_delta: float = 1e-5
    dp_epsilon_budget: float = 0.0
    # secure aggregation (server.secure): "secaggplus" sums the sites' updates with Flower's SecAgg+
    # (masked, quantized), so the server sees only the weighted mean update, never one site's. Each
    # site's key is split into secagg_num_shares shares; a round survives dropouts as long as every
    # site keeps secagg_reconstruction_threshold live neighbours. A site sends (cases / secagg_max_weight)
    # x (local - global), clipped to +-secagg_clipping_range and quantized to secagg_quantization_range levels.
    secure_aggregation: str = "off"  # one of SECURE_AGGREGATIONS
    secagg_num_shares: int = 3
    secagg_reconstruction_threshold: int = 2
    secagg_max_weight: float = 1000.0  # Flower's default: sites of up to 1000 training cases
    secagg_clipping_range: float = 8.0  # Flower's default
    # 2**26 (Flower: 2**22): 16x finer steps; the sum of up to SECAGG_MODULUS / 2**26 = 64 sites fits the modulus
    secagg_quantization_range: int = 67108864


@dataclass(frozen=True)
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    imputation: ImputationConfig = field(default_factory=ImputationConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)


_SECTION_TYPES: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "imputation": ImputationConfig,
    "ssl": SSLConfig,
    "federation": FederationConfig,
}


def _coerce(section: str, name: str, ftype: Any, value: Any) -> Scalar:
    """Convert ``value`` to the field's declared scalar type, or raise a ConfigError."""
    key = f"{section}.{name}"
    target = {"bool": bool, "int": int, "float": float, "str": str}.get(str(ftype), ftype)
    if target is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "false"}:
            return value.lower() == "true"
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if target is int:
        if isinstance(value, bool) or not (
            isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        ):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return int(value)
    if target is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if target is str:
        if value is None:
            return ""
        return str(value)
    raise ConfigError(f"{key}: unsupported field type {ftype!r}")


def suggest(name: str, options: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``options``, else `` (known: a, b)``."""
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(sorted(options))})"


def choice_error(what: str, value: str, options: Sequence[str]) -> ValueError:
    """``ValueError("unknown <what> 'x' (did you mean 'y'?)")`` for a value not in ``options``."""
    return ValueError(f"unknown {what} {value!r}{suggest(str(value), options)}")


def from_mapping(mapping: Mapping[str, Any]) -> ExperimentConfig:
    """Build the frozen config from a nested mapping (e.g. a composed Hydra config).

    Unknown sections or keys raise :class:`ConfigError` with a "did you mean" hint; missing keys
    take the dataclass defaults.
    """
    sections: dict[str, Any] = {}
    for sname, values in mapping.items():
        if sname not in _SECTION_TYPES:
            raise ConfigError(f"unknown config section {sname!r}{suggest(sname, list(_SECTION_TYPES))}")
        stype = _SECTION_TYPES[sname]
        known = {f.name: f for f in fields(stype)}
        kwargs: dict[str, Scalar] = {}
        for key, value in (values or {}).items():
            if key not in known:
                raise ConfigError(f"unknown config key {sname}.{key}{suggest(key, list(known))}")
            kwargs[key] = _coerce(sname, key, known[key].type, value)
        sections[sname] = stype(**kwargs)
    cfg = ExperimentConfig(**sections)
    validate(cfg)
    return cfg


def check_consistency_view(ssl: SSLConfig) -> None:
    """``ssl.consistency_view`` is known, and ``shared`` comes without the strong view's options."""
    if ssl.consistency_view not in CONSISTENCY_VIEWS:
        raise ConfigError(f"ssl.consistency_view={ssl.consistency_view!r} is not one of {', '.join(CONSISTENCY_VIEWS)}")
    if ssl.consistency_view == "shared" and (ssl.cutmix_alpha > 0.0 or ssl.complementary_dropout):
        raise ConfigError(
            "ssl.consistency_view=shared reuses the supervised pass on the loader's view as the student, "
            "so it has no strong view to mix or split: set ssl.cutmix_alpha=0 and "
            "ssl.complementary_dropout=false with it, or ssl.consistency_view=strong"
        )


def validate(cfg: ExperimentConfig) -> None:
    """Reject values that are of the right type but make no sense."""
    choices = {
        ("model", "fusion"): FUSIONS,
        ("model", "classifier_pooling"): CLASSIFIER_POOLINGS,
        ("model", "classifier_head_init"): HEAD_INITS,
        ("ssl", "consistency_view"): CONSISTENCY_VIEWS,
        ("train", "optimizer"): OPTIMIZERS,
        ("train", "cls_loss"): CLS_LOSSES,
        ("train", "task_weighting"): TASK_WEIGHTINGS,
        ("federation", "strategy"): STRATEGIES,
        ("federation", "update_bound"): UPDATE_BOUNDS,
        ("federation", "on_quorum_fail"): QUORUM_ACTIONS,
        ("federation", "site_validation"): SITE_VALIDATIONS,
        ("federation", "wire_dtype"): WIRE_DTYPES,
        ("federation", "dp"): DP_MODES,
        ("federation", "secure_aggregation"): SECURE_AGGREGATIONS,
    }
    for (sname, key), allowed in choices.items():
        value = getattr(getattr(cfg, sname), key)
        if value not in allowed:
            raise ConfigError(f"{sname}.{key}={value!r} is not one of {allowed}{suggest(value, list(allowed))}")
    if cfg.data.size % 8:
        raise ConfigError(f"data.size={cfg.data.size} must be a multiple of 8 (the encoder downsamples 3 times)")
    if cfg.model.tumor_crop_size and (cfg.model.tumor_crop_size % 8 or cfg.model.tumor_crop_size < 16
                                      or cfg.model.tumor_crop_size >= cfg.data.size):
        raise ConfigError(
            f"model.tumor_crop_size={cfg.model.tumor_crop_size} must be 0 (no crop) or a multiple of 8, at least 16 and "
            f"below data.size={cfg.data.size} (the fine grid the crop is cut from): e.g. data.size=64 "
            "model.tumor_crop_size=32"
        )
    if not 0.0 <= cfg.model.tumor_crop_margin <= 2.0:
        raise ConfigError(f"model.tumor_crop_margin={cfg.model.tumor_crop_margin} must be in [0, 2] (a fraction of the tumor's extent)")
    if cfg.model.d_model % cfg.model.heads:
        raise ConfigError(f"model.d_model={cfg.model.d_model} must be divisible by model.heads={cfg.model.heads}")
    if not cfg.federation.site_worker_idle_s > 0:
        raise ConfigError(f"federation.site_worker_idle_s={cfg.federation.site_worker_idle_s} must be > 0 seconds")
    if cfg.federation.validate_every < 1:
        raise ConfigError(f"federation.validate_every={cfg.federation.validate_every} must be >= 1")
    if not 0.0 < cfg.federation.quorum <= 1.0:
        raise ConfigError(f"federation.quorum={cfg.federation.quorum} must be in (0, 1] (a fraction of the sites)")
    if cfg.federation.max_update_ratio <= 1.0:
        raise ConfigError(f"federation.max_update_ratio={cfg.federation.max_update_ratio} must be > 1")
    if cfg.federation.strategy == "bulyan" and cfg.federation.min_nodes < 4 * cfg.federation.num_malicious + 3:
        raise ConfigError(
            f"federation.strategy=bulyan with num_malicious={cfg.federation.num_malicious} needs at least "
            f"{4 * cfg.federation.num_malicious + 3} sites (4 x num_malicious + 3); min_nodes is {cfg.federation.min_nodes}"
        )
    if not 0.0 <= cfg.federation.trimmed_beta < 0.5:
        raise ConfigError(f"federation.trimmed_beta={cfg.federation.trimmed_beta} must be in [0, 0.5)")
    if cfg.federation.dp != "off":
        _validate_dp(cfg.federation)
    check_consistency_view(cfg.ssl)
    if cfg.train.head_lr_scale <= 0:
        raise ConfigError(f"train.head_lr_scale={cfg.train.head_lr_scale} must be > 0 (1 = the encoder's learning rate)")
    if cfg.federation.secure_aggregation != "off":
        _validate_secure(cfg.federation)
    if cfg.train.dp_sgd:
        _validate_dp_sgd(cfg)
    if not 0.0 < cfg.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={cfg.data.val_fraction} must be between 0 and 1")


def _validate_dp(federation: FederationConfig) -> None:
    if federation.strategy not in DP_STRATEGIES:
        raise ConfigError(
            f"federation.dp={federation.dp!r} needs federation.strategy in {DP_STRATEGIES}, got "
            f"{federation.strategy!r}: the noise is calibrated to a plain average of clipped updates"
        )
    if federation.dp_noise_multiplier <= 0:
        raise ConfigError(f"federation.dp_noise_multiplier={federation.dp_noise_multiplier} must be > 0 with "
                          "federation.dp (1.0 or more for a meaningful epsilon)")
    if federation.dp_clipping_norm <= 0:
        raise ConfigError(f"federation.dp_clipping_norm={federation.dp_clipping_norm} must be > 0 (an L2 norm)")
    if not 0.0 < federation.dp_delta < 1.0:
        raise ConfigError(f"federation.dp_delta={federation.dp_delta} must be in (0, 1), well below 1/min_nodes")
    if federation.dp_epsilon_budget < 0:
        raise ConfigError(f"federation.dp_epsilon_budget={federation.dp_epsilon_budget} must be >= 0 (0 = no budget)")


def _validate_secure(federation: FederationConfig) -> None:
    """SecAgg+ shows the server only the sum: what needs each site's update in the clear cannot run."""
    mode = f"federation.secure_aggregation={federation.secure_aggregation!r}"
    if federation.strategy not in SECURE_STRATEGIES:
        raise ConfigError(
            f"{mode} needs federation.strategy in {SECURE_STRATEGIES}, got {federation.strategy!r}: a robust "
            "aggregator needs each site's update, which SecAgg+ hides. Choose one of them, or set "
            "federation.secure_aggregation=off"
        )
    if federation.dp != "off":
        raise ConfigError(
            f"{mode} cannot be combined with federation.dp={federation.dp!r}: the server-side DP clips each "
            "site's update, which SecAgg+ hides from the server. Set federation.dp=off or "
            "federation.secure_aggregation=off"
        )
    if federation.update_bound != "off":
        raise ConfigError(
            f"{mode} needs federation.update_bound=off (got {federation.update_bound!r}): update bounds and "
            "weight caps compare each site's update with the others', and a masked update cannot be "
            "screened or clipped by the server. Set federation.update_bound=off"
        )
    if federation.max_examples > 0:
        raise ConfigError(
            f"{mode} cannot cap weights (federation.max_examples={federation.max_examples}): a site weighs its own "
            "update inside its masked vector, out of the server's reach. Set federation.max_examples=0"
        )
    if federation.wire_dtype != "float32":
        raise ConfigError(
            f"{mode} needs federation.wire_dtype=float32 (got {federation.wire_dtype!r}): the sites' updates "
            "travel as quantized integers, and the server adds their mean to the float32 global model the "
            "sites started from. Set federation.wire_dtype=float32"
        )
    shares, threshold = federation.secagg_num_shares, federation.secagg_reconstruction_threshold
    if shares < 3:
        raise ConfigError(f"federation.secagg_num_shares={shares} must be >= 3 (Flower's SecAgg+ minimum)")
    if not 2 <= threshold < shares:
        raise ConfigError(
            f"federation.secagg_reconstruction_threshold={threshold} must be >= 2 and below "
            f"federation.secagg_num_shares={shares}"
        )
    if threshold > federation.min_nodes:
        raise ConfigError(
            f"federation.secagg_reconstruction_threshold={threshold} exceeds federation.min_nodes="
            f"{federation.min_nodes}: no round could be unmasked. Lower the threshold or raise min_nodes"
        )
    if federation.secagg_max_weight <= 0 or federation.secagg_clipping_range <= 0:
        raise ConfigError(
            f"federation.secagg_max_weight={federation.secagg_max_weight} and federation.secagg_clipping_range="
            f"{federation.secagg_clipping_range} must be > 0"
        )
    levels = federation.secagg_quantization_range
    if not 2 <= levels < 2**31 or federation.min_nodes * levels >= SECAGG_MODULUS:
        raise ConfigError(
            f"federation.secagg_quantization_range={levels} must be in [2, 2**31) (a site quantizes to int32) and "
            f"min_nodes x range below the masking modulus 2**32 (got {federation.min_nodes} sites): lower it"
        )


def _validate_dp_sgd(cfg: ExperimentConfig) -> None:
    """train.dp_sgd: positive noise and norm, and only the stages and heads whose loss is a mean
    over cases (each case's gradient can then be clipped on its own; see client.dp_sgd)."""
    train = cfg.train
    if train.dp_sgd_noise_multiplier <= 0:
        raise ConfigError(f"train.dp_sgd_noise_multiplier={train.dp_sgd_noise_multiplier} must be > 0 with "
                          "train.dp_sgd (about 1.0 for a single-digit epsilon over a few rounds)")
    if train.dp_sgd_max_grad_norm <= 0:
        raise ConfigError(f"train.dp_sgd_max_grad_norm={train.dp_sgd_max_grad_norm} must be > 0 "
                          "(the L2 norm each case's gradient is clipped to)")
    if not 0.0 < train.dp_sgd_delta < 1.0:
        raise ConfigError(f"train.dp_sgd_delta={train.dp_sgd_delta} must be in (0, 1), well below "
                          "1 / (training cases of the largest site)")
    if train.dp_sgd_epsilon_budget < 0:
        raise ConfigError(f"train.dp_sgd_epsilon_budget={train.dp_sgd_epsilon_budget} must be >= 0 (0 = no budget)")
    # every stage or head without a per-case loss, named at once (the demo experiment has several)
    conflicts = {
        "model.survival_head=false": (cfg.model.survival_head, "the Cox partial likelihood ranks the cases of a "
                                      "batch against each other, so no case has a gradient of its own to clip"),
        "ssl.enabled=false": (cfg.ssl.enabled, "pseudo-labels with distribution alignment and the consistency "
                              "stage's CutMix mix cases together; DP-SGD covers supervised training only"),
        "imputation.pretrain_rounds=0": (cfg.imputation.pretrain_rounds > 0,
                                         "imputer pre-training has no DP-SGD form"),
        "train.seg_dice_batch=false": (cfg.train.seg_dice_batch, "the batch Dice pools the voxels of all cases "
                                       "of a batch, so one case's gradient depends on the others"),
    }
    found = {fix: why for fix, (bad, why) in conflicts.items() if bad}
    if found:
        raise ConfigError(f"train.dp_sgd needs {' '.join(found)}: " + "; ".join(found.values()))


def to_mapping(cfg: ExperimentConfig) -> dict[str, dict[str, Scalar]]:
    """Nested plain dict (for ``config.yaml`` in the run folder)."""
    return dataclasses.asdict(cfg)


def to_run_config(cfg: ExperimentConfig) -> dict[str, Scalar]:
    """Flatten to Flower's run-config: ``{"model.d_model": 64, ...}``."""
    return {f"{s}.{k}": v for s, section in to_mapping(cfg).items() for k, v in section.items()}


def from_run_config(run_config: Mapping[str, Any]) -> ExperimentConfig:
    """Rebuild the frozen config from a flat run-config; keys not of the form
    ``section.field`` of this config (Flower's own, if any) are ignored."""
    nested: dict[str, dict[str, Any]] = {}
    for key, value in run_config.items():
        if "." not in key:
            continue
        sname, name = key.split(".", 1)
        if sname in _SECTION_TYPES:
            nested.setdefault(sname, {})[name] = value
    return from_mapping(nested)


def compose(overrides: list[str] | None = None, config_name: str = "config") -> ExperimentConfig:
    """Compose ``common/configs/<config_name>.yaml`` with Hydra overrides (``model=demo``,
    ``federation.rounds=5``) and return the frozen config."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        composed = hydra_compose(config_name=config_name, overrides=list(overrides or []))
    return from_mapping(OmegaConf.to_container(composed, resolve=True))  # type: ignore[arg-type]


def replace(cfg: ExperimentConfig, **sections: Mapping[str, Any]) -> ExperimentConfig:
    """Return a copy with some fields of some sections changed: ``replace(cfg, train={"lr": 0.1})``."""
    merged = to_mapping(cfg)
    for sname, values in sections.items():
        merged.setdefault(sname, {}).update(values)
    return from_mapping(merged)
