"""AdamW over one flat parameter buffer, and the lr / momentum schedules as per-step tables.

Why not ``torch.optim.AdamW`` + an ``lr_scheduler``: an MLP step is so short that their
per-call Python bookkeeping is a sizeable part of it (benchmarks/RESULTS.md). Here the
parameters live in one buffer, so a step is one call of the same fused kernel
``AdamW(fused=True)`` runs (shims.fused_adamw_), and the schedule is a table computed before
training (the values of torch's ``CosineAnnealingLR`` / ``OneCycleLR``, checked in
tests/test_optim.py).

    optimizer = FlatAdamW(model.parameters(), weight_decay=0.01)
    lrs, beta1s = schedule_table("onecycle", lr=1e-3, total_steps=5500)
    ... loss.backward(); optimizer.step(lrs[t], beta1s[t]); optimizer.zero_grad()
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from mnist_tune.shims import fused_adamw_
from mnist_tune.tunables import SCHEDULES

BETA1, BETA2, EPS = 0.9, 0.999, 1e-8  # torch's Adam defaults, as the seed used them
# OneCycleLR's defaults: warm up over 30 % of the steps from lr/25, anneal to lr/25/1e4, and
# cycle Adam's beta1 between 0.95 and 0.85 inversely to the lr.
ONECYCLE_WARMUP, ONECYCLE_DIV, ONECYCLE_FINAL_DIV = 0.3, 25.0, 1e4
ONECYCLE_BETA1 = (0.95, 0.85)


class FlatAdamW:
    """AdamW whose parameters and gradients are views into two contiguous buffers.

    The model keeps working as usual (its parameters are views of ``flat``); autograd
    accumulates into ``grad`` in place because every parameter's ``.grad`` is preset to its
    view. ``release()`` gives the parameters their own storage again when training ends, so a
    saved model holds only its own tensors.

    Weight decay is applied as torch applies it on each device. The fused CPU kernel (like
    torch's default foreach AdamW) multiplies by a float32 ``1 - lr*wd``, so a per-step decay
    below ~3e-8 rounds to none there and larger ones are quantised to steps of ~6e-8 (4e-8
    becomes 6e-8); either way < 4e-4 of shrinkage over a 5500-step run, nothing a sweep could
    tell apart. CUDA's kernel and ``step_with`` subtract ``lr*wd*param``.
    """

    def __init__(self, params: Iterable[nn.Parameter], weight_decay: float = 0.0, fused: bool | None = None):
        self.params = [p for p in params if p.requires_grad]
        self.weight_decay = weight_decay
        with torch.no_grad():
            self.flat = torch.cat([p.reshape(-1) for p in self.params])
        # torch's fused AdamW kernel covers CPU, CUDA and MPS; elsewhere the same update in plain ops.
        self.fused = self.flat.device.type in ("cpu", "cuda", "mps") if fused is None else fused
        self.grad = torch.zeros_like(self.flat)
        self.exp_avg = torch.zeros_like(self.flat)
        self.exp_avg_sq = torch.zeros_like(self.flat)
        self.steps = torch.zeros((), dtype=torch.float32, device=self.flat.device)  # the kernel wants a tensor
        self.step_count = 0  # the same count on the host: no device read-back per step
        offset = 0
        for p in self.params:
            n = p.numel()
            p.data = self.flat[offset:offset + n].view_as(p)
            p.grad = self.grad[offset:offset + n].view_as(p)
            offset += n

    def zero_grad(self) -> None:
        self.grad.zero_()

    def step(self, lr: float, beta1: float = BETA1) -> None:
        self.step_count += 1
        if self.fused:
            self.steps += 1
            fused_adamw_([self.flat], [self.grad], [self.exp_avg], [self.exp_avg_sq], [self.steps],
                         lr=lr, beta1=beta1, beta2=BETA2, weight_decay=self.weight_decay, eps=EPS)
            return
        # the same update in plain ops: one place for the maths (step_with), this step's row
        self.step_with(torch.tensor(self._row(lr, beta1, self.step_count), device=self.flat.device))

    def _row(self, lr: float, beta1: float, t: int) -> tuple[float, float, float, float]:
        return adamw_row(lr, beta1, t, self.weight_decay)

    def schedule_rows(self, lrs: list[float], beta1s: list[float]) -> torch.Tensor:
        """The whole schedule as one device tensor, a row of step coefficients per step, for
        ``step_with``: an update that reads its scalars from the device (a CUDA graph replays
        the same kernels every step, so the per-step lr, beta1 and bias corrections cannot be
        host numbers baked into the launch). Row k is for the k-th step after the ones taken so
        far with ``step`` (its bias corrections count from there); ``step_with`` does not
        advance that count, so use one or the other for a run, not both."""
        rows = [self._row(lr, beta1, t) for t, (lr, beta1) in enumerate(zip(lrs, beta1s), start=self.step_count + 1)]
        return torch.tensor(rows, dtype=torch.float32, device=self.flat.device)

    def step_with(self, row: torch.Tensor) -> None:
        """The AdamW update with its scalars taken from a ``schedule_rows`` row."""
        neg_lr_wd, one_minus_beta1, step_size, inv_bias_correction2 = row.unbind()
        # flat -= lr*wd*flat, as CUDA's fused kernel does: a float32 factor (1 - lr*wd) would
        # round small decays (lr*wd < ~3e-8) away entirely and quantise the others
        self.flat.addcmul_(self.flat, neg_lr_wd)
        self.exp_avg.lerp_(self.grad, one_minus_beta1)
        self.exp_avg_sq.mul_(BETA2).addcmul_(self.grad, self.grad, value=1 - BETA2)
        denom = self.exp_avg_sq.sqrt().mul_(inv_bias_correction2).add_(EPS)
        self.flat.add_(self.exp_avg.div(denom).mul_(step_size))

    def release(self) -> None:
        for p in self.params:
            p.data = p.data.clone()
            p.grad = None


def adamw_row(lr: float, beta1: float, t: int, weight_decay: float) -> tuple[float, float, float, float]:
    """Step t's coefficients for ``step_with``: -lr*wd, 1 - beta1, -lr / bias correction 1,
    1 / sqrt(bias correction 2) (also the rows of a trial pack's per-member table, pack.py)."""
    return -lr * weight_decay, 1 - beta1, -lr / (1 - beta1 ** t), 1 / math.sqrt(1 - BETA2 ** t)


def schedule_table(schedule: str, lr: float, total_steps: int) -> tuple[list[float], list[float]]:
    """(lr, beta1) for every optimizer step: constant, cosine (to 0) or one-cycle."""
    if schedule not in _TABLES:
        raise ValueError(f"unknown schedule {schedule!r}")
    return _TABLES[schedule](lr, total_steps)


def _constant(lr: float, total_steps: int) -> tuple[list[float], list[float]]:
    return [lr] * total_steps, [BETA1] * total_steps


def _cosine(lr: float, total_steps: int) -> tuple[list[float], list[float]]:
    """CosineAnnealingLR(T_max=total_steps, eta_min=0)."""
    return [lr * (1 + math.cos(math.pi * t / total_steps)) / 2 for t in range(total_steps)], [BETA1] * total_steps


def _anneal(start: float, end: float, pct: float) -> float:
    return end + (start - end) / 2 * (math.cos(math.pi * pct) + 1)


def _onecycle(max_lr: float, total_steps: int) -> tuple[list[float], list[float]]:
    """OneCycleLR(max_lr, total_steps) with its defaults (cosine annealing, two phases)."""
    start_lr = max_lr / ONECYCLE_DIV
    end_lr = start_lr / ONECYCLE_FINAL_DIV
    peak = float(ONECYCLE_WARMUP * total_steps) - 1
    last = total_steps - 1
    high, low = ONECYCLE_BETA1
    lrs, beta1s = [], []
    for t in range(total_steps):
        if t <= peak:  # warm-up (peak is never 0: 0.3 * an integer - 1)
            pct = t / peak
            lrs.append(_anneal(start_lr, max_lr, pct))
            beta1s.append(_anneal(high, low, pct))
        else:
            pct = (t - peak) / (last - peak)
            lrs.append(_anneal(max_lr, end_lr, pct))
            beta1s.append(_anneal(low, high, pct))
    return lrs, beta1s


# tunables.SCHEDULES names them (for sweep files and the command line), in this order
_TABLES = dict(zip(SCHEDULES, (_constant, _cosine, _onecycle), strict=True))
