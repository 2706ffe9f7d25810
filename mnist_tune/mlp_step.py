"""The MLP's training step written out by hand: forward, cross-entropy and backward, no autograd.

Why: at batch 100 an MLP epoch is 550 steps whose matmuls take ~0.45 ms each on this CPU, and
autograd's graph building plus the per-module dispatch cost about half as much again. Written
out, a step is a few matmuls and a handful of in-place element-wise ops, with the gradients
written straight into the optimizer's buffer. Given the same dropout masks it computes what
autograd computes for ``cross_entropy(model(x), y)`` (tests/test_train.py compares the loss
and every gradient), so it is an implementation detail of ``fit``, not a different model: the
trained ``MLP`` is used, evaluated and exported as usual. The masks are drawn as
``rand < q``: the same Bernoulli(q) as ``nn.Dropout``, half the cost of its ``bernoulli_`` on
this CPU, but a different draw from the RNG stream, so a seed gives a different (equally good)
run than the autograd path.

Per hidden layer (z = h W^T + b, then ReLU, then inverted dropout with keep-probability q):

    forward   h' = relu(z) * mask / q          mask ~ Bernoulli(q), drawn from torch's RNG
    backward  dW = g^T h,  db = sum(g),  g_prev = (g W) * [h' > 0] / q
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mnist_tune.models import MLP, MNIST_MEAN, MNIST_STD, NUM_CLASSES


class ExplicitMLPStep:
    """Callable ``step(rows, onehot) -> summed loss`` for one MLP; fills each parameter's ``.grad``.

    ``rows`` and ``onehot`` are gathered from what ``prepare(images_u8, labels)`` returns:
    uint8 images flattened to (N, 784) and float one-hot targets. The ``.grad`` tensors must
    exist (FlatAdamW presets them) and are overwritten, not added to.
    """

    def __init__(self, model: MLP):
        modules = list(model)
        self.linears = [m for m in modules if isinstance(m, nn.Linear)]
        dropouts = [m.p for m in modules if isinstance(m, nn.Dropout)]
        self.keep = [1.0 - p for p in dropouts]  # one per hidden layer
        self.scale = [1.0 / q if q > 0 else 0.0 for q in self.keep]  # inverted dropout (p = 1: all zero)
        if any(linear.weight.grad is None or linear.bias.grad is None for linear in self.linears):
            raise ValueError("ExplicitMLPStep writes into preset .grad tensors: create FlatAdamW first")
        self.batch = torch.empty(0)  # reused input buffer: no fresh 300 kB allocation per step

    @staticmethod
    def supports(model: nn.Module) -> bool:
        return type(model) is MLP

    def prepare(self, images_u8: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 784) uint8 view (batches are normalised as they are used), float one-hot targets."""
        return images_u8.flatten(1), F.one_hot(labels, NUM_CLASSES).float()

    @torch.no_grad()
    def __call__(self, rows: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        if len(self.batch) < len(rows) or self.batch.device != rows.device:
            self.batch = torch.empty(rows.shape, device=rows.device)
        # Normalize's (x / 255 - mean) / std as two in-place ops on the reused buffer
        h = torch.sub(rows, 255 * MNIST_MEAN, out=self.batch[:len(rows)]).mul_(1 / (255 * MNIST_STD))
        inputs = []  # each layer's input, kept for its weight gradient
        for linear, keep, scale in zip(self.linears[:-1], self.keep, self.scale):
            inputs.append(h)
            h = torch.addmm(linear.bias, h, linear.weight.t()).relu_()
            if keep < 1.0:
                h.mul_(torch.rand_like(h).lt_(keep)).mul_(scale)
        last = self.linears[-1]
        inputs.append(h)
        log_probs = torch.addmm(last.bias, h, last.weight.t()).log_softmax(1)
        loss_sum = -(log_probs * onehot).sum()

        grad = log_probs.exp_().sub_(onehot).mul_(1.0 / len(rows))  # d(mean loss)/d(logits)
        for i in range(len(self.linears) - 1, -1, -1):
            linear, h = self.linears[i], inputs[i]
            torch.mm(grad.t(), h, out=linear.weight.grad)
            torch.sum(grad, 0, out=linear.bias.grad)
            if i > 0:  # through the previous layer's dropout and ReLU (h > 0 exactly where both let it)
                grad = torch.ops.aten.threshold_backward(torch.mm(grad, linear.weight), h, 0)
                if self.keep[i - 1] < 1.0:
                    grad.mul_(self.scale[i - 1])
        return loss_sum
