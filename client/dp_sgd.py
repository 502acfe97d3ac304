"""Site-level DP-SGD (``train.dp_sgd``): each training case's gradient clipped, noise per step.

What it guarantees: the weights a site sends are (epsilon, delta)-differentially private with
respect to adding or removing one training case of that site (RDP accountant of the Poisson-
subsampled Gaussian mechanism, Opacus). Epsilon accumulates over every step this site trains in a
run; the accountant's history lives in the site's state folder (:data:`ACCOUNTANT_FILE`).

Opacus pieces used: :class:`opacus.optimizers.DPOptimizer` clips each case's gradient to
``dp_sgd_max_grad_norm``, sums, adds Gaussian noise of std ``noise_multiplier x max_grad_norm``
and divides by the expected batch size; :class:`opacus.utils.uniform_sampler.UniformWithReplacementSampler`
draws Poisson batches (each case in each step independently with probability q = batch/N, what the
accountant assumes; a batch may be empty and still costs a noised step);
:class:`opacus.accountants.RDPAccountant` counts the steps (DPOptimizer's step hook).

Why not ``PrivacyEngine.make_private`` / :class:`opacus.GradSampleModule`: its per-layer hooks
cannot give this network per-case gradients (checked on the ``tiny`` model with Opacus 1.5.4):

* ``nn.MultiheadAttention`` inside ``nn.TransformerEncoderLayer`` is rejected by
  ``ModuleValidator.validate``; ``ModuleValidator.fix`` swaps in ``DPMultiheadAttention`` (the only
  layer it flags: instance norm without running statistics and LayerNorm are accepted, there is no
  BatchNorm to replace with GroupNorm);
* MONAI's ``ResBlock`` adds the skip in place (``x += identity``) on a hooked module's output,
  which autograd refuses under the backward hooks (as does ``LeakyReLU(inplace=True)``);
* raw parameters outside a supported layer: the fusion weights (``WeightedFusion``, two-argument
  forward: Opacus' functorch fallback calls it with one), the transformer's position embedding,
  and the uncertainty weights (``UncertaintyWeighting``), which are used in the *loss*, not in any
  forward, so no hook ever sees them;
* the stems run only the cases that have their sequence (``image[cases, s]``), so their per-layer
  "per-sample" gradients have fewer rows than the batch;
* the loss is not a mean of per-case losses: Dice+CE over the cases with a segmentation,
  classification divided by the labelled cases of each task, the uncertainty regulariser once per
  batch. Hooks assume ``loss = mean_i l_i`` and would mis-scale each case's share.

So each case's gradient is the gradient of the *whole* training loss (segmentation, all tasks'
classification, uncertainty weighting, FedProx term) computed on that case alone, as if it were a
batch of one (:func:`per_sample_gradients`; on the CPU the case twice, :func:`case_copies`); it is
exact for any code path of the model, and is
handed to DPOptimizer as ``p.grad_sample``, where Opacus' own clipping, noise and accounting take
over. The cost is one forward/backward per case instead of one per batch (measured:
docs/benchmarks/privacy.md). The Cox survival loss ranks cases against each other and has no
per-case gradient: ``train.dp_sgd`` requires ``model.survival_head=false`` (common.config).

Randomness: the noise and the Poisson sampling draw from generators seeded by the operating
system's entropy, not ``train.seed``: the run config (and so the seed) is known to the server,
which could otherwise regenerate the noise and subtract it. DP-SGD runs therefore do not repeat
exactly. Opacus' ``secure_mode`` (floating-point attack hardening) needs torchcsprng and is off.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from copy import deepcopy
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from monai.data import DataLoader
from opacus.accountants import RDPAccountant
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn

from client.state import RoundTag, read_state_file
from common.config import ConfigError, TrainConfig
from common.io import atomic_write
from common.runtime import Batch

#: File name of the site's DP-SGD accountant (its RDP history) inside the site's state folder.
ACCOUNTANT_FILE = "dp_sgd_accountant.pt"

#: ``(batch of one case) -> scalar loss``: the whole training loss of that case alone.
SampleLoss = Callable[[Batch], torch.Tensor]


class PrivacyBudgetError(ConfigError):
    """Training this message would take the site past ``train.dp_sgd_epsilon_budget``."""


def secret_generator() -> torch.Generator:
    """A generator seeded from the operating system's entropy (see the module docstring)."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))


def poisson_sample_rate(num_cases: int, batch_size: int) -> float:
    """q = batch_size / N (at most 1): each case's probability of entering one step's batch."""
    if num_cases < 1:
        raise ValueError("DP-SGD needs at least one training case")
    return min(1.0, batch_size / num_cases)


def _collate_or_none(collate: Callable[[list[Any]], Batch], samples: list[Any]) -> Batch | None:
    """The loader's own collate, or None for an empty Poisson batch (collate functions cannot
    build a batch of zero cases; the step still happens, with noise only)."""
    return collate(samples) if samples else None


def poisson_loader(loader: DataLoader) -> DataLoader:
    """``loader``'s dataset, collate and augmentation seed, with Poisson batches instead of a
    shuffled partition: ``int(1 / q)`` batches per epoch, each case in each independently with
    probability q (:func:`poisson_sample_rate`). Empty batches come out as None."""
    n = len(loader.dataset)
    sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=poisson_sample_rate(n, loader.batch_size),
                                            generator=secret_generator())
    return DataLoader(loader.dataset, batch_sampler=sampler, num_workers=loader.num_workers,
                      collate_fn=partial(_collate_or_none, loader.collate_fn), generator=loader.generator)


def case_copies(device: torch.device) -> int:
    """How many copies of a case make up its own batch (:func:`per_sample_gradients`) on ``device``.

    On the CPU, 2: for a batch of one small volume PyTorch's convolution takes its slow reference
    kernel (``slow_conv3d``; ATen's ``use_mkldnn`` wants a batch of 2 or more, or a large input),
    measured 8x slower than oneDNN's for an 8-channel 32^3 input. The same case twice takes oneDNN
    and halves a case's forward/backward on the ``tiny`` model, with the same loss and gradient:
    every term of the training loss is a mean over the batch's cases (only dropout draws differ
    between the copies, and both are the same case's). Elsewhere 1."""
    return 2 if device.type == "cpu" else 1


def case_of(batch: Batch, index: int, copies: int = 1) -> Batch:
    """Case ``index`` of ``batch`` as a batch of ``copies`` copies of it (tensors and lists taken
    on dimension 0)."""
    out: Batch = {}
    for key, value in batch.items():
        if torch.is_tensor(value):
            out[key] = value[index : index + 1].expand(copies, *value.shape[1:]).contiguous()
        elif isinstance(value, (list, tuple)):
            out[key] = [value[index]] * copies  # type: ignore[assignment]
        else:
            out[key] = value
    return out


def batch_size(batch: Batch) -> int:
    """Number of cases in ``batch`` (the length of its image tensor)."""
    return int(batch["image"].shape[0])


def per_sample_gradients(params: Sequence[nn.Parameter], batch: Batch | None, sample_loss: SampleLoss,
                         copies: int = 1) -> None:
    """Set ``p.grad_sample`` (n, *p.shape) for every parameter: row i is the gradient of
    ``sample_loss`` on case i alone, as a batch of ``copies`` copies of it (:func:`case_copies`;
    zero for a parameter that case does not reach). ``batch`` None (an empty Poisson batch) gives
    zero rows, which DPOptimizer turns into a noise-only step."""
    n = 0 if batch is None else batch_size(batch)
    rows = [torch.zeros((n, *p.shape), dtype=p.dtype, device=p.device) for p in params]
    for i in range(n):
        loss = sample_loss(case_of(batch, i, copies))  # type: ignore[arg-type] - n > 0: batch is not None
        grads = torch.autograd.grad(loss, list(params), allow_unused=True)
        for row, grad in zip(rows, grads):
            if grad is not None:
                row[i] = grad
    for p, row in zip(params, rows):
        p.grad_sample = row


@dataclass
class SiteAccountant:
    """This site's RDP accountant for one run and the parameters of its DP-SGD (``train.dp_sgd_*``)."""

    accountant: RDPAccountant
    noise_multiplier: float
    max_grad_norm: float
    delta: float
    epsilon_budget: float = 0.0

    @classmethod
    def for_round(cls, folder: Path, train: TrainConfig, tag: RoundTag) -> SiteAccountant:
        """The accountant the site's earlier messages of ``tag``'s run left in ``folder``
        (:func:`load_accountant`), with the config's noise, norm, delta and budget."""
        return cls(load_accountant(folder, tag), train.dp_sgd_noise_multiplier, train.dp_sgd_max_grad_norm,
                   train.dp_sgd_delta, train.dp_sgd_epsilon_budget)

    @property
    def steps(self) -> int:
        """Noised steps accounted so far in this run."""
        return int(sum(n for _, _, n in self.accountant.history))

    def epsilon(self) -> float:
        """Epsilon spent so far at ``delta`` (0 before the first step)."""
        return float(self.accountant.get_epsilon(self.delta))

    def projected_epsilon(self, sample_rate: float, steps: int) -> float:
        """Epsilon after ``steps`` more steps at ``sample_rate`` (the accountant itself unchanged)."""
        future = deepcopy(self.accountant)
        for _ in range(steps):
            future.step(noise_multiplier=self.noise_multiplier, sample_rate=sample_rate)
        return float(future.get_epsilon(self.delta))

    def check_budget(self, sample_rate: float, steps: int) -> None:
        """Raise :class:`PrivacyBudgetError` when ``steps`` more steps would exceed the budget (the
        ClientApp's error reply puts the site's name in front of the message)."""
        if self.epsilon_budget <= 0:
            return
        after = self.projected_epsilon(sample_rate, steps)
        if after > self.epsilon_budget:
            raise PrivacyBudgetError(
                f"DP-SGD budget reached: epsilon {self.epsilon():.3g} spent in {self.steps} steps of this run; "
                f"this message's {steps} steps would bring it to {after:.3g} > train.dp_sgd_epsilon_budget="
                f"{self.epsilon_budget:g} (delta {self.delta:g}). The site trains no further in this run: raise "
                "the budget or train.dp_sgd_noise_multiplier, or fewer rounds / local epochs"
            )

    def private(self, optimizer: torch.optim.Optimizer, loader: DataLoader, *, epochs: int, max_steps: int = 0
                ) -> tuple[DPOptimizer, DataLoader]:
        """(``optimizer`` wrapped in DPOptimizer, Poisson loader over ``loader``'s cases) for
        ``epochs`` epochs (at most ``max_steps`` steps when > 0), after :meth:`check_budget`.
        Every optimizer step is counted by this accountant."""
        poisson = poisson_loader(loader)
        sample_rate = poisson.batch_sampler.sample_rate
        planned = epochs * len(poisson)
        self.check_budget(sample_rate, min(planned, max_steps) if max_steps else planned)
        # the mean divides by the *expected* batch size q N (as Opacus' make_private does), never by
        # the drawn one: how many cases a step drew must not show in the update
        expected = max(1, round(len(loader.dataset) * sample_rate))
        dp = DPOptimizer(optimizer, noise_multiplier=self.noise_multiplier, max_grad_norm=self.max_grad_norm,
                         expected_batch_size=expected, generator=secret_generator())
        dp.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
        return dp, poisson

    def metrics(self) -> dict[str, float]:
        """Scalars for the reply: epsilon so far at delta, and the steps it covers."""
        return {"dp_sgd_epsilon": self.epsilon(), "dp_sgd_delta": self.delta, "dp_sgd_steps": float(self.steps)}

    def save(self, folder: Path, tag: RoundTag) -> dict[str, float]:
        """Keep the accountant in ``folder`` for the run's next message (:func:`save_accountant`), at
        once after training; returns :meth:`metrics` to report."""
        save_accountant(self.accountant, folder, tag)
        return self.metrics()


def load_accountant(folder: Path, tag: RoundTag) -> RDPAccountant:
    """The accountant saved in ``folder`` by an earlier message of the run ``tag`` belongs to, else
    a fresh one (no file, another run's, or round 1: a new run under the same name restarts at
    global round 1, as :class:`client.state.RoundTag` describes).

    Unlike the other site state it also continues when the saved round is not before ``tag``'s
    (a round retried, or a run resumed from an earlier checkpoint with ``federation.resume_from``):
    those messages train on the same cases again, and counting them on top over-states epsilon,
    which is safe, where starting afresh would under-state it. A damaged file is an error naming
    it, never a silent restart."""
    path = Path(folder) / ACCOUNTANT_FILE
    accountant = RDPAccountant()
    if not path.exists():
        return accountant

    def parse(payload: dict) -> tuple[RoundTag, list[tuple[float, float, int]]]:
        return RoundTag.from_dict(payload), [(float(z), float(q), int(n)) for z, q, n in payload["history"]]

    saved, history = read_state_file(path, "the DP-SGD accountant", "a fresh accountant (epsilon 0: only right "
                                     "for a new run)", parse)
    if saved.run_name == tag.run_name and (saved.precedes(tag) or tag.global_round > 1):
        accountant.history = history
    return accountant


def save_accountant(accountant: RDPAccountant, folder: Path, tag: RoundTag) -> None:
    """Keep the accountant's history (noise multiplier, sample rate, steps) for the run's next message."""
    payload = {**tag.as_dict(), "history": [[z, q, n] for z, q, n in accountant.history]}
    atomic_write(Path(folder) / ACCOUNTANT_FILE, lambda tmp: torch.save(payload, tmp))
