"""Image size and augmentation on the device: whole splits resized once per run, training
batches augmented per step. Pure PyTorch; no Python per image.

Resizing uses area averaging: when shrinking, every source pixel counts (bilinear would read 4
of them and drop thin strokes). Training images are resized once per run (``resize``); the
model's own ``Resize`` (models.py) does the same to the (N, 1, 28, 28) images a logged model is
given, and passes images already at its size through.

Augmentation (``augmentation(hp)``) runs inside the training step on the gathered batch, so it
is recorded in the CUDA graph with the rest of the step; its random numbers come from torch's
default generator, which CUDA graphs advance on each replay (as for dropout).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mnist_tune.tunables import IMAGE_SIZE

RESIZE_MODE = "area"


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 28, 28) uint8 -> (N, size, size): unchanged at 28, else float32 pixels in [0, 255]
    (not rounded back to bytes: what the model's own resize of [0, 1] pixels computes)."""
    if images.shape[-1] == size:
        return images
    resized = F.interpolate(images.unsqueeze(1).float(), size=(size, size), mode=RESIZE_MODE)
    return resized.squeeze(1)


class Augment:
    """``augment(rows) -> rows``: a batch of square images (N, S, S) or flattened (N, S*S),
    uint8 or float, each moved, rotated and scaled at random.

    Shift alone is a whole-pixel translation with zero fill, done by one gather (the bytes
    stay bytes); rotation or scale resample the batch with one affine sampling grid and one
    ``grid_sample`` (bilinear, float pixels out), the shift going into the same affine map.
    """

    def __init__(self, *, shift: int = 0, rotate: float = 0.0, scale: float = 0.0):
        self.shift, self.rotate, self.scale = shift, rotate, scale
        self._index: dict = {}  # per image side and device: gather offsets (shift), pixel centres (resample)

    def describe(self) -> str:
        parts = [f"shift up to {self.shift} px" if self.shift else "",
                 f"rotate up to {self.rotate:g} degrees" if self.rotate else "",
                 f"scale 1 +- {self.scale:g}" if self.scale else ""]
        return ", ".join(p for p in parts if p) + " (training batches only)"

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        side = math.isqrt(rows[0].numel())
        images = rows.reshape(len(rows), side, side)
        if self.rotate or self.scale:
            return self._resample(images).reshape(rows.shape)
        return self._translate(images).reshape(rows.shape)

    def _offsets(self, n: int, device) -> torch.Tensor:
        """(n, 2) whole-pixel moves in [-shift, shift], drawn on the device."""
        return torch.randint(-self.shift, self.shift + 1, (n, 2), device=device)

    def _translate(self, images: torch.Tensor) -> torch.Tensor:
        n, side, s = len(images), images.shape[-1], self.shift
        padded = side + 2 * s
        key = (side, images.device)
        if key not in self._index:
            ys, xs = torch.meshgrid(torch.arange(side, device=images.device),
                                    torch.arange(side, device=images.device), indexing="ij")
            self._index[key] = ((ys + s) * padded + xs + s).flatten()
        # output pixel (y, x) reads padded pixel (y + s - dy, x + s - dx): the image moved by (dy, dx)
        move = self._offsets(n, images.device)
        start = move[:, 0:1] * -padded - move[:, 1:2]
        flat = F.pad(images, (s, s, s, s)).reshape(n, padded * padded)
        return flat.gather(1, self._index[key] + start)

    def _resample(self, images: torch.Tensor) -> torch.Tensor:
        n, side, device = len(images), images.shape[-1], images.device
        angle = torch.rand(n, device=device).mul_(2).sub_(1).mul_(math.radians(self.rotate))
        zoom = torch.rand(n, device=device).mul_(2).sub_(1).mul_(self.scale).add_(1)
        move = self._offsets(n, device).float().mul_(2 / side)  # pixels -> grid units ([-1, 1] spans the image)
        cos, sin = (torch.cos(angle) / zoom)[:, None], (torch.sin(angle) / zoom)[:, None]  # output -> input
        x, y = self._centres(side, device)
        # the sampling grid, (x, y) -> (cos x - sin y - tx, sin x + cos y - ty), written out:
        # F.affine_grid's batched (H*W x 3) @ (3 x 2) products cost 5x this on a CPU
        gx = torch.addcmul(torch.addcmul(-move[:, 1:2], cos, x), sin, y, value=-1)
        gy = torch.addcmul(torch.addcmul(-move[:, 0:1], sin, x), cos, y)
        grid = torch.stack((gx, gy), -1).view(n, side, side, 2)
        return F.grid_sample(images.unsqueeze(1).float(), grid, mode="bilinear", padding_mode="zeros",
                             align_corners=False).squeeze(1)

    def _centres(self, side: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """x and y of each pixel centre in grid units, flattened row by row (align_corners=False)."""
        key = ("centres", side, device)
        if key not in self._index:
            c = torch.arange(side, device=device).mul(2).add(1).div(side).sub(1)
            ys, xs = torch.meshgrid(c, c, indexing="ij")
            self._index[key] = (xs.flatten(), ys.flatten())
        return self._index[key]


def augmentation(hp) -> Augment | None:
    """The training batches' augmentation for a TrainConfig, or None (no op, no random draw)."""
    if not (hp.shift or hp.rotate or hp.scale):
        return None
    return Augment(shift=hp.shift, rotate=hp.rotate, scale=hp.scale)


def augmentation_text(hp) -> str:
    """What the run's data lineage says about augmentation (run.dataset_inputs)."""
    augment = augmentation(hp)
    return "none" if augment is None else augment.describe()


def model_image_size(model) -> int:
    """The side of the images the model's first layer takes (models.py sets ``image_size``)."""
    return getattr(model, "image_size", IMAGE_SIZE)
