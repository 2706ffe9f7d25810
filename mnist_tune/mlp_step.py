"""The MLP's training step written out by hand: forward, cross-entropy and backward, no autograd.

Why: an MLP step's matmuls are small, and autograd's graph building plus the per-module
dispatch cost about half as much again (benchmarks/step_breakdown.py). Written out, a step is
a few matmuls and a handful of in-place element-wise ops, with the gradients written straight
into the optimizer's buffer. Given the same dropout masks it computes what autograd computes for
``cross_entropy(model(x), y)`` (tests/test_train.py compares the loss and every gradient), so
it is an implementation detail of ``fit``, not a different model: the trained ``MLP`` is used,
evaluated and exported as usual. The masks are drawn as ``rand < q``, layer by layer, as the
model's own ``Dropout`` draws them on the CPU (models.py), so there a seed gives the autograd
path's run (off the CPU the model uses nn.Dropout's kernel; with p = 1 neither draws).

Per hidden layer (z = h W^T + b, then ReLU, then inverted dropout with keep-probability q),
where the layer's output is a / q:

    forward   a = relu(z) * mask               mask ~ Bernoulli(q), drawn from torch's RNG
    backward  dW = g^T h,  db = sum(g),  g_prev = (g W) * [a > 0] / q

Only ``a`` is stored: the 1/q goes into the ``alpha`` of the matmuls that read it (a free
BLAS argument), which saves two element-wise passes per hidden layer and step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mnist_tune.models import MLP, MNIST_MEAN, MNIST_STD, NUM_CLASSES
from mnist_tune.shims import relu_backward


class ExplicitMLPStep:
    """Callable ``step(rows, onehot) -> the batch's summed loss`` for one MLP; fills each
    parameter's ``.grad`` with the gradient of the mean loss (what ``loss.backward()`` gives).

    ``rows`` and ``onehot`` are gathered from what ``prepare(images_u8, labels)`` returns:
    uint8 images flattened to (N, 784) and float one-hot targets. The ``.grad`` tensors must
    exist (FlatAdamW presets them) and are overwritten, not added to.
    """

    def __init__(self, model: MLP):
        modules = list(model)
        self.linears = [m for m in modules if isinstance(m, nn.Linear)]
        dropouts = [m.p for m in modules if isinstance(m, nn.Dropout)]
        self.keep = [1.0 - p for p in dropouts]  # one per hidden layer
        # inverted dropout's 1/q (p = 1: all zero), as the alpha of the matmuls that read the layer's output
        self.alpha = [1.0] + [1.0 / q if q > 0 else 0.0 for q in self.keep]
        device = self.linears[0].weight.device
        self.keep_t = [torch.tensor(q, device=device) for q in self.keep]  # 0-dim: no scalar wrapping per op
        self.shift = torch.tensor(-MNIST_MEAN / MNIST_STD, device=device)
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
        # Normalize's (x / 255 - mean) / std: convert into the reused buffer, then one fused pass
        h = self.batch[:len(rows)].copy_(rows)
        torch.add(self.shift, h, alpha=1 / (255 * MNIST_STD), out=h)
        inputs = []  # each layer's input (dropout masks applied, 1/q not), kept for its weight gradient
        for i, linear in enumerate(self.linears[:-1]):
            inputs.append(h)
            h = torch.addmm(linear.bias, h, linear.weight.t(), alpha=self.alpha[i]).relu_()
            # p = 1 draws nothing, as nn.Dropout: the alpha 0 of what reads h already zeroes it
            if 0.0 < self.keep[i] < 1.0:
                h.mul_(torch.rand_like(h).lt_(self.keep_t[i]))
        last = self.linears[-1]
        inputs.append(h)
        log_probs = torch.addmm(last.bias, h, last.weight.t(), alpha=self.alpha[-1]).log_softmax(1)
        loss_sum = -(log_probs * onehot).sum()

        grad = log_probs.exp_().sub_(onehot).mul_(1.0 / len(rows))  # d(mean loss)/d(logits)
        for i in range(len(self.linears) - 1, -1, -1):
            linear, h, alpha = self.linears[i], inputs[i], self.alpha[i]
            linear.weight.grad.addmm_(grad.t(), h, beta=0, alpha=alpha)
            torch.sum(grad, 0, out=linear.bias.grad)
            if i > 0:  # through the previous layer's dropout and ReLU (h > 0 exactly where both let it)
                # beta=0: addmm ignores its first argument (h, for the shape), only to take alpha
                grad = relu_backward(torch.addmm(h, grad, linear.weight, beta=0, alpha=alpha), h)
        return loss_sum
