"""Trial packs: K trials of one shape group trained at once as one fused model. No Optuna, no MLflow.

On a GPU one trial's step is a few hundred microseconds of kernel launches around far less
arithmetic (benchmarks/RESULTS.md), so K trials whose tensors have the same shapes are stacked
along a leading member axis and trained by the same kernels: the MLP with batched matmuls
(bmm/baddbmm, its hand-written backward as mlp_step.py), any other model with
``torch.func.vmap`` over ``functional_call`` and autograd. Members may differ in what does not
change a shape (``PER_MEMBER``: lr, weight decay, schedule, dropout, seed); those are device
tensors, a (steps, K, 4) table of AdamW coefficients included, so the whole pack step is one
CUDA graph as a single trial's is (steps.GraphedSteps runs both).

Every member is what its single trial would be: its weights are initialised by the same seed
and builder, it sees its own data order (its seed's shuffle), and ``member_model(k)`` returns
an ordinary ``build_model(...)`` module holding its weights, for test accuracy and export.
Only its dropout masks come from a different draw of the RNG (one draw for the pack).

    pack = Pack("mlp", [{"dropout": 0.1}, {"dropout": 0.3}], [TrainConfig(lr=1e-3), TrainConfig(lr=3e-3)], n, dev)
    steps = pack.steps(train_x, train_y)
    for epoch: order = pack.epoch_order(); for s: steps(pack.batch(order, s), pack.step); pack.step += 1
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from mnist_tune.models import MLP, MNIST_MEAN, MNIST_STD, NUM_CLASSES, Dropout, as_input, build_model
from mnist_tune.optim import BETA2, EPS, adamw_row, schedule_table
from mnist_tune.shims import relu_backward
from mnist_tune.steps import GraphedSteps
from mnist_tune.train import EVAL_BATCH, TrainConfig, seed_everything

PER_MEMBER = ("lr", "weight_decay", "schedule", "dropout", "seed")  # what members of one pack may differ in


def shape_key(model_name: str, hp: dict) -> tuple:
    """Trials with equal keys can share a pack: every hyperparameter but ``PER_MEMBER`` (batch
    size, widths, depth, Mixer dims, epochs, amp...) is part of it."""
    return (model_name, *sorted((k, tuple(v) if isinstance(v, list) else v)
                                for k, v in hp.items() if k not in PER_MEMBER))


def packable(hp: TrainConfig) -> str | None:
    """Why trials with these settings cannot be packed, or None."""
    if hp.amp or hp.compile:
        return "trial packs train in float32 without torch.compile (amp and compile must be off)"
    return None


class PackAdamW:
    """AdamW over a (K, P) buffer, one row of parameters per member: ``FlatAdamW.step_with``'s
    maths with a (K, 4) row of coefficients, so every member has its own lr, beta1, weight
    decay and bias corrections (the table comes from ``schedule_rows``)."""

    def __init__(self, flat: torch.Tensor, weight_decays: list[float]):
        self.flat = flat
        self.weight_decays = list(weight_decays)
        self.starts = [0] * len(weight_decays)  # the pack step at which each member joined
        self.grad = torch.zeros_like(flat)
        self.exp_avg = torch.zeros_like(flat)
        self.exp_avg_sq = torch.zeros_like(flat)

    def schedule_rows(self, lrs: list[list[float]], beta1s: list[list[float]]) -> torch.Tensor:
        """(pack steps, K, 4): each member's (lr, beta1) schedule as ``adamw_row`` coefficients,
        from the step it joined (zeros outside its run: no update)."""
        length = max(start + len(member_lrs) for start, member_lrs in zip(self.starts, lrs))
        rows = []
        for start, member_lrs, member_beta1s, wd in zip(self.starts, lrs, beta1s, self.weight_decays):
            own = [adamw_row(lr, beta1, t, wd) for t, (lr, beta1) in enumerate(zip(member_lrs, member_beta1s), 1)]
            rows.append([(0.0,) * 4] * start + own + [(0.0,) * 4] * (length - start - len(own)))
        return torch.tensor(rows, dtype=torch.float32, device=self.flat.device).transpose(0, 1).contiguous()

    @torch.no_grad()
    def step_with(self, row: torch.Tensor) -> None:
        neg_lr_wd, one_minus_beta1, step_size, inv_bias_correction2 = row.t().unsqueeze(-1)  # each (K, 1)
        self.flat.addcmul_(self.flat, neg_lr_wd)
        self.exp_avg.lerp_(self.grad, one_minus_beta1)
        self.exp_avg_sq.mul_(BETA2).addcmul_(self.grad, self.grad, value=1 - BETA2)
        denom = self.exp_avg_sq.sqrt().mul_(inv_bias_correction2).add_(EPS)
        self.flat.add_(self.exp_avg.div(denom).mul_(step_size))

    def keep(self, index: torch.Tensor) -> None:
        """Only the members at ``index`` stay (compaction after pruning)."""
        self.flat, self.grad = self.flat[index], self.grad[index]
        self.exp_avg, self.exp_avg_sq = self.exp_avg[index], self.exp_avg_sq[index]
        self.weight_decays = [self.weight_decays[i] for i in index.tolist()]
        self.starts = [self.starts[i] for i in index.tolist()]

    def add(self, flat: torch.Tensor, weight_decays: list[float], start: int) -> None:
        """New members (refill), fresh AdamW state, their schedules starting at pack step ``start``."""
        self.flat = torch.cat([self.flat, flat])
        for name in ("grad", "exp_avg", "exp_avg_sq"):
            setattr(self, name, torch.cat([getattr(self, name), torch.zeros_like(flat)]))
        self.weight_decays += weight_decays
        self.starts += [start] * len(weight_decays)


def _views(flat: torch.Tensor, shapes: list[torch.Size]) -> list[torch.Tensor]:
    """(K, *shape) views of a (K, P) buffer, one per parameter."""
    views, offset = [], 0
    for shape in shapes:
        n = math.prod(shape)
        views.append(flat[:, offset:offset + n].view(-1, *shape))
        offset += n
    return views


class StackedMLPStep:
    """The MLP step of mlp_step.ExplicitMLPStep for K members at once: (K, B, width) activations,
    bmm/baddbmm with (K, out, in) weights, per-member dropout from a (K,) keep-probability.
    ``step(rows, onehot) -> (K,) summed losses``; writes each member's mean-loss gradients into
    the optimizer's (K, P) ``grad``. ``masks`` keeps the last step's scaled dropout masks (tests)."""

    def __init__(self, pack: Pack):
        self.pack = pack
        self.shift = torch.tensor(-MNIST_MEAN / MNIST_STD, device=pack.device)

    def prepare(self, images_u8: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return images_u8.flatten(1), F.one_hot(labels, NUM_CLASSES).float()

    def _layers(self, flat: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        views = _views(flat, self.pack.shapes)
        return list(zip(views[0::2], views[1::2]))  # (weight, bias) per Linear, in order

    @torch.no_grad()
    def __call__(self, rows: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        k = self.pack.size
        h = rows.view(k, -1, rows.shape[-1]).float()
        h = torch.add(self.shift, h, alpha=1 / (255 * MNIST_STD))
        onehot = onehot.view(k, -1, NUM_CLASSES)
        layers, grads = self._layers(self.pack.optimizer.flat), self._layers(self.pack.optimizer.grad)
        keep = self.pack.keep.view(k, 1, 1)
        inputs, self.masks = [], []
        for weight, bias in layers[:-1]:
            inputs.append(h)
            h = torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2)).relu_()
            # inverted dropout, 0 or 1/keep; keep = 1 (no dropout) gives all ones
            mask = torch.rand_like(h).lt_(keep).div_(keep)
            self.masks.append(mask)
            h.mul_(mask)
        weight, bias = layers[-1]
        inputs.append(h)
        log_probs = torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2)).log_softmax(2)
        loss_sums = -(log_probs * onehot).sum((1, 2))

        grad = log_probs.exp_().sub_(onehot).mul_(1.0 / h.shape[1])  # d(mean loss)/d(logits), per member
        for i in range(len(layers) - 1, -1, -1):
            (weight, _), (weight_grad, bias_grad), h = layers[i], grads[i], inputs[i]
            weight_grad.copy_(torch.bmm(grad.transpose(1, 2), h))
            bias_grad.copy_(grad.sum(1))
            if i > 0:  # through dropout (h = relu(z) * mask: zero where either stopped it) and ReLU
                grad = relu_backward(torch.bmm(grad, weight), h).mul_(self.masks[i - 1])
        return loss_sums

    @torch.no_grad()
    def logits(self, images_u8: torch.Tensor) -> torch.Tensor:
        """(K, N, 10) for the same images, dropout off."""
        h = as_input(images_u8).flatten(1).sub_(MNIST_MEAN).mul_(1 / MNIST_STD)
        layers = self._layers(self.pack.optimizer.flat)
        h = h.expand(self.pack.size, *h.shape)
        for weight, bias in layers[:-1]:
            h = torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2)).relu_()
        weight, bias = layers[-1]
        return torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))


class MemberDropout(nn.Module):
    """models.Dropout with its keep-probability in a buffer, so that under vmap every member
    has its own; the mask is drawn as models.Dropout draws it on the CPU (uniform < keep)."""

    def __init__(self, drawn: list):
        super().__init__()
        self.register_buffer("keep", torch.ones(()))
        self.drawn = drawn  # the step's masks, in the order drawn (VmappedStep returns them)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        mask = torch.rand_like(x, memory_format=torch.contiguous_format).lt(self.keep).div(self.keep)
        self.drawn.append(mask)
        return x * mask


class VmappedStep:
    """Any model's step for K members: ``vmap`` of the module's ``functional_call`` over the
    members' parameter views, autograd for the gradients (one backward for the sum of the
    members' mean losses: members share no parameter, so each gets its own gradient)."""

    def __init__(self, pack: Pack):
        self.pack = pack
        self.net = copy.deepcopy(pack.template)
        self.drawn: list[torch.Tensor] = []
        for module in list(self.net.modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, Dropout):
                    setattr(module, child_name, MemberDropout(self.drawn))
        self.names = [name for name, _ in self.net.named_parameters()]
        self.keep_names = [name for name, _ in self.net.named_buffers() if name.endswith("keep")]
        self.net.to(pack.device)

    def prepare(self, images_u8: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return images_u8, labels

    def _member_logits(self, params: dict, keep: torch.Tensor, images_u8: torch.Tensor) -> torch.Tensor:
        tensors = {**params, **{name: keep for name in self.keep_names}}
        return functional_call(self.net, tensors, (as_input(images_u8),))

    def _params(self, flat: torch.Tensor) -> dict:
        return dict(zip(self.names, _views(flat, self.pack.shapes)))

    def __call__(self, rows: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        k = self.pack.size
        rows, labels = rows.view(k, -1, *rows.shape[1:]), labels.view(k, -1)
        flat = self.pack.optimizer.flat.detach().requires_grad_()  # a leaf on the buffer AdamW updates in place

        def member_loss(params, keep, x, y):
            self.drawn.clear()
            loss = F.cross_entropy(self._member_logits(params, keep, x).float(), y)
            return loss, tuple(self.drawn)  # the masks leave vmap as (K, ...) tensors

        self.net.train()
        losses, masks = vmap(member_loss, randomness="different")(self._params(flat), self.pack.keep, rows, labels)
        self.masks = [mask.detach() for mask in masks]  # the step's dropout masks (tests)
        self.pack.optimizer.grad.copy_(torch.autograd.grad(losses.sum(), flat)[0])
        return losses.detach() * rows.shape[1]

    @torch.no_grad()
    def logits(self, images_u8: torch.Tensor) -> torch.Tensor:
        self.net.eval()
        try:
            return vmap(self._member_logits, in_dims=(0, 0, None))(
                self._params(self.pack.optimizer.flat), self.pack.keep, images_u8)
        finally:
            self.net.train()


class Pack:
    """K members of one shape group: their stacked parameters, AdamW state, schedules, dropout,
    data orders and summed epoch losses, all with a leading member axis."""

    def __init__(self, model_name: str, model_hps: list[dict], hps: list[TrainConfig], n_train: int,
                 device: torch.device):
        if not hps:
            raise ValueError("a pack needs at least one member")
        self.model_name, self.model_hps, self.hps = model_name, list(model_hps), list(hps)
        self.device, self.n_train = device, n_train
        self.batch_size, self.epochs = hps[0].batch_size, hps[0].epochs
        self.steps_per_epoch = math.ceil(n_train / self.batch_size)
        flat, self.keep, models = self._members(model_hps, hps)
        self.template = models[0]
        self.shapes = [p.shape for p in self.template.parameters()]
        self.optimizer = PackAdamW(flat, [hp.weight_decay for hp in hps])
        self.shuffles = [torch.Generator(device=device).manual_seed(hp.seed) for hp in hps]
        self.loss_sum = torch.zeros(len(hps), device=device)
        self.train_step = StackedMLPStep(self) if type(self.template) is MLP else VmappedStep(self)
        self.step = 0  # pack steps taken; a member that joined later has taken fewer (optimizer.starts)

    def _members(self, model_hps: list[dict], hps: list[TrainConfig]):
        """(K, P) initial parameters, (K,) keep-probabilities and the models they come from."""
        models = []
        for model_hp, hp in zip(model_hps, hps):
            seed_everything(hp.seed)  # each member's weights are its single trial's
            models.append(build_model(self.model_name, **model_hp))
        flat = torch.stack([torch.cat([p.detach().reshape(-1) for p in m.parameters()]) for m in models])
        # each member's keep-probability, from its model (the builders have their own default dropout)
        keep = torch.tensor([1.0 - next((m.p for m in model.modules() if isinstance(m, nn.Dropout)), 0.0)
                             for model in models])
        return flat.to(self.device), keep.to(self.device), models

    @property
    def size(self) -> int:
        return len(self.hps)

    def schedule(self) -> tuple[list[list[float]], list[list[float]]]:
        total = self.epochs * self.steps_per_epoch
        tables = [schedule_table(hp.schedule, hp.lr, total) for hp in self.hps]
        return [lrs for lrs, _ in tables], [beta1s for _, beta1s in tables]

    def steps(self, train_x: torch.Tensor, train_y: torch.Tensor, capture: bool | None = None) -> GraphedSteps:
        """``steps(batch, step)``: one pack step, replayed as one CUDA graph on CUDA (the whole
        step: gather, forward, backward, AdamW). Make a new one after ``keep_members``."""
        inputs, targets = self.train_step.prepare(train_x, train_y)
        lrs, beta1s = self.schedule()
        rows = self.size * min(self.batch_size, len(inputs))
        # the graph's static batch is K blocks of B rows from the data: K * B must not exceed it
        capture = self.device.type == "cuda" and rows <= len(inputs) if capture is None else capture
        steps = GraphedSteps(self.train_step, self.optimizer, inputs, targets, lrs, beta1s, self.loss_sum,
                             rows, capture=capture)
        return steps

    def epoch_order(self) -> torch.Tensor:
        """(K, n): each member's shuffle for the next epoch, drawn as ``train.fit`` draws it."""
        return torch.stack([torch.randperm(self.n_train, device=self.device, generator=g) for g in self.shuffles])

    def batch(self, order: torch.Tensor, index: int) -> torch.Tensor:
        """The flat (K * B,) row indices of batch ``index``: member k's rows are block k."""
        return order[:, index * self.batch_size:(index + 1) * self.batch_size].reshape(-1)

    def run_epoch(self, steps: GraphedSteps, train_x: torch.Tensor, stop_check=None) -> torch.Tensor:
        """One epoch for every member; returns each one's mean training loss (K,), on the host."""
        order = self.epoch_order()
        self.loss_sum.zero_()
        for index in range(self.steps_per_epoch):
            if stop_check is not None:
                stop_check()
            steps(self.batch(order, index), self.step)
            self.step += 1
        return self.loss_sum.cpu() / self.n_train

    @torch.no_grad()
    def evaluate(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[list[float], list[float]]:
        """Each member's mean cross-entropy and accuracy on a split (as train.evaluate)."""
        loss_sum = torch.zeros(self.size, device=self.device)
        correct = torch.zeros(self.size, device=self.device, dtype=torch.long)
        chunk = max(100, EVAL_BATCH // self.size)  # K members' activations at once
        for start in range(0, len(images), chunk):
            logits = self.train_step.logits(images[start:start + chunk])
            target = labels[start:start + chunk].expand(self.size, -1)
            loss_sum += F.cross_entropy(logits.transpose(1, 2), target, reduction="none").sum(1)
            correct += (logits.argmax(2) == target).sum(1)
        n = len(images)
        return (loss_sum / n).tolist(), (correct.double() / n).tolist()

    def member_model(self, k: int) -> nn.Module:
        """Member k as the ordinary model its single trial trains (same builder, its weights)."""
        model = build_model(self.model_name, **self.model_hps[k]).to(self.device)
        with torch.no_grad():
            for param, view in zip(model.parameters(), _views(self.optimizer.flat[k:k + 1], self.shapes)):
                param.copy_(view[0])
        return model

    def keep_members(self, members: list[int]) -> None:
        """Compact the pack to ``members`` (by index): the others stop costing compute."""
        index = torch.tensor(members, device=self.device, dtype=torch.long)
        self.optimizer.keep(index)
        self.keep, self.loss_sum = self.keep[index], self.loss_sum[index].clone()
        self.model_hps = [self.model_hps[i] for i in members]
        self.hps = [self.hps[i] for i in members]
        self.shuffles = [self.shuffles[i] for i in members]

    def add_members(self, model_hps: list[dict], hps: list[TrainConfig]) -> None:
        """Refill: members of the same shape group join at the current step (an epoch boundary),
        initialised as their single trials; their schedules and epochs count from here."""
        if not hps:
            return
        flat, keep, _ = self._members(model_hps, hps)
        self.optimizer.add(flat, [hp.weight_decay for hp in hps], self.step)
        self.keep = torch.cat([self.keep, keep])
        self.loss_sum = torch.zeros(len(self.hps) + len(hps), device=self.device)
        self.model_hps += model_hps
        self.hps += hps
        self.shuffles += [torch.Generator(device=self.device).manual_seed(hp.seed) for hp in hps]
