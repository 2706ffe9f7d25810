"""The seed project's training pipeline, kept as the baseline every benchmark compares to.

torchvision ``MNIST`` + ``ToTensor`` + ``DataLoader`` (per-sample transforms in Python),
Adam lr 1e-3, batch 100, all 60k images. The model is mnist_tune's own (the seed's MLP
architecture, with its missing flatten fixed) with torch's ``nn.Dropout`` put back
(``seed_model``), so the baseline runs the layers the seed ran.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, transforms


def seed_model(model: nn.Module) -> nn.Module:
    """``model`` with each of mnist_tune's dropout layers replaced by ``nn.Dropout`` (same p)."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.Dropout) and type(child) is not nn.Dropout:
                setattr(module, name, nn.Dropout(child.p))
    return model


def seed_loaders(data_root: str, batch_size: int = 100):
    """``data_root`` holds torchvision's ``MNIST/raw`` layout (what mnist_tune.data fetches)."""
    to_tensor = transforms.ToTensor()
    train = datasets.MNIST(data_root, train=True, download=False, transform=to_tensor)
    test = datasets.MNIST(data_root, train=False, download=False, transform=to_tensor)
    return (DataLoader(train, batch_size=batch_size, shuffle=True),
            DataLoader(test, batch_size=batch_size))


def seed_train_epoch(model, loader, optimizer) -> float:
    """One epoch of the seed's loop; returns its wall time in seconds."""
    started = time.perf_counter()
    model.train()
    for images, labels in loader:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
    if next(model.parameters()).is_cuda:
        torch.cuda.synchronize()  # the epoch ends when the GPU's queued work does
    return time.perf_counter() - started


@torch.no_grad()
def seed_test_accuracy(model, loader) -> float:
    model.eval()
    correct = total = 0
    for images, labels in loader:
        correct += (model(images).argmax(1) == labels).sum().item()
        total += len(labels)
    return correct / total
