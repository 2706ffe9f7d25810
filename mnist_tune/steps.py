"""How ``fit`` runs one optimizer step per batch: launched op by op, or replayed as a CUDA graph.

A training step is dozens (MLP) to hundreds (Mixer) of small kernels. On a GPU, launching them
one by one from Python costs more than running them (measured on an H100, batch 100: a Mixer
patch 7, dim 128, depth 8 epoch took 8.7 s launched op by op, 1.3 s replayed; an MLP epoch
0.38 vs 0.10 s; benchmarks/RESULTS.md). A CUDA graph records the whole step once (batch
gather, forward, backward, AdamW) and then each batch is one replay. What changes between
steps lives in device buffers the graph reads: the batch's indices and the step's row of
optimizer coefficients (``FlatAdamW.schedule_rows``).
"""

from __future__ import annotations

import torch

from mnist_tune.optim import FlatAdamW

GRAPH_WARMUP_STEPS = 3  # PyTorch's advice: run a few steps on a side stream before capturing


class EagerSteps:
    """``steps(batch_indices, step)``: gather, train step, AdamW, each op launched as it comes."""

    def __init__(self, train_step, optimizer: FlatAdamW, inputs, targets, lrs, beta1s, loss_sum, augment=None):
        self.train_step, self.optimizer = train_step, optimizer
        self.augment = augment  # rows -> rows (images.Augment), on the gathered batch: recorded in the graph too
        self.inputs, self.targets, self.lrs, self.beta1s = inputs, targets, lrs, beta1s
        self.loss_sum = loss_sum  # the epoch's summed loss, accumulated on the device

    def _train_on(self, batch: torch.Tensor) -> None:
        """Forward and backward on the batch's rows, its summed loss added to ``loss_sum``."""
        # index_select: a plain gather, measurably cheaper than advanced indexing per step
        rows = self.inputs.index_select(0, batch)
        if self.augment is not None:
            rows = self.augment(rows)
        self.loss_sum += self.train_step(rows, self.targets.index_select(0, batch))

    def __call__(self, batch: torch.Tensor, step: int) -> None:
        self._train_on(batch)
        self.optimizer.step(self.lrs[step], self.beta1s[step])


class GraphedSteps(EagerSteps):
    """The same step with its scalars read from device buffers, recorded as one CUDA graph.

    Full batches replay the graph; a shorter last batch runs the same code eagerly. With
    ``capture=False`` nothing is recorded and every step runs that code eagerly: the CPU tests
    use it to check the buffer-driven step against ``EagerSteps``.
    """

    def __init__(self, train_step, optimizer: FlatAdamW, inputs, targets, lrs, beta1s, loss_sum,
                 batch_size: int, capture: bool = True, augment=None):
        super().__init__(train_step, optimizer, inputs, targets, lrs, beta1s, loss_sum, augment)
        self.rows = optimizer.schedule_rows(lrs, beta1s)
        self.batch = torch.arange(min(batch_size, len(inputs)), device=inputs.device)  # static inputs
        self.row = self.rows[0].clone()
        self.graph = self._capture() if capture else None

    def _step(self, batch: torch.Tensor, row: torch.Tensor) -> None:
        self._train_on(batch)
        self.optimizer.step_with(row)

    def _capture(self) -> torch.cuda.CUDAGraph:
        # Warm-up steps really update the model and optimizer: keep their state and put it back
        # (both models have no other state: no BatchNorm running statistics).
        live = (self.optimizer.flat, self.optimizer.exp_avg, self.optimizer.exp_avg_sq)
        saved = [t.clone() for t in live]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(GRAPH_WARMUP_STEPS):
                self._step(self.batch, self.row)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step(self.batch, self.row)
        for tensor, copy in zip(live, saved):
            tensor.copy_(copy)
        self.loss_sum.zero_()
        return graph

    def __call__(self, batch: torch.Tensor, step: int) -> None:
        if len(batch) != len(self.batch):
            self._step(batch, self.rows[step])
            return
        self.batch.copy_(batch)
        self.row.copy_(self.rows[step])
        if self.graph is None:
            self._step(self.batch, self.row)
        else:
            self.graph.replay()
