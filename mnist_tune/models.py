"""The two architectures. Pure PyTorch + einops: no Optuna, no MLflow.

Every model takes images shaped (N, 1, 28, 28) with pixels in [0, 1] and normalises them
itself, so a logged model needs no preprocessing code from this package to be used.

    model = build_model("mlp", dropout=0.2)
    model = build_model("mixer", patch_size=7, dim=128, depth=4)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops.layers.torch import Rearrange, Reduce
from torch import nn

from mnist_tune.errors import MnistTuneError
from mnist_tune.tunables import IMAGE_SIZE, MODEL_NAMES, divides_problems

NUM_CLASSES = 10
# Training-set pixel mean and std, the usual MNIST normalisation.
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def as_input(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float (N, 1, 28, 28) in [0, 1], the models' input contract. Also
    takes float pixels in [0, 255] (resized splits, images.py), copied: never divided in place."""
    return images_u8.unsqueeze(1).to(torch.float32, copy=True).div_(255)


def eval_mode(model) -> bool:
    """Put ``model`` in eval mode; return whether it was training (to restore it after).

    A model reloaded from MLflow is a torch.export module, which is exported in eval mode and
    raises NotImplementedError on ``.eval()`` / ``.train()``."""
    was_training = bool(getattr(model, "training", False))
    try:
        model.eval()
    except NotImplementedError:
        return False
    return was_training


class Normalize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - MNIST_MEAN).mul_(1 / MNIST_STD)  # one new tensor per call, not two


class Resize(nn.Module):
    """(N, 1, 28, 28) -> (N, 1, size, size) by area averaging, as images.resize does to the
    training splits; images already ``size`` wide (those training batches) pass through."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == self.size:
            return x
        return F.interpolate(x, size=(self.size, self.size), mode="area")


def _resized(image_size: int) -> list[nn.Module]:
    """The model's first layers for its image size: none at 28 (the images as they come)."""
    return [] if image_size == IMAGE_SIZE else [Resize(image_size)]


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose CPU mask is drawn as ``uniform < 1 - p``: Bernoulli(1 - p) like
    nn.Dropout's (a different draw from the RNG stream), at about half the cost of the
    ``bernoulli_`` kernel nn.Dropout calls there, a large part of a Mixer step on the CPU
    (benchmarks/RESULTS.md). On other devices (CUDA's fused dropout kernel), for other
    dtypes (bf16 autocast), in place and in eval mode it is plain ``nn.Dropout``. It has no
    state, so state_dicts and the exported (pt2) models MLflow logs are unaffected.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (not self.training or self.inplace or not 0 < self.p < 1 or x.device.type != "cpu"
                or x.dtype != torch.float32):
            return super().forward(x)
        keep = 1.0 - self.p
        # 0 or 1/keep: inverted dropout (rand_like draws what the hand-written MLP step draws)
        mask = torch.rand_like(x, memory_format=torch.contiguous_format).lt_(keep).mul_(1.0 / keep)
        return x * mask


class MLP(nn.Sequential):
    """The seed's MLP: 784 -> 100 -> 80 -> 10, ReLU, dropout after each hidden layer.

    ``width``/``depth`` replace ``hidden_sizes`` by ``depth`` layers of ``width`` units.

    (The seed's forward fed the unflattened input to the first Linear; Flatten fixes that.)
    """

    def __init__(self, *, hidden_sizes: tuple[int, ...] = (100, 80), dropout: float = 0.2,
                 width: int | None = None, depth: int | None = None, image_size: int = IMAGE_SIZE):
        if width is not None or depth is not None:  # the wide sweep searches a uniform stack
            hidden_sizes = (width or hidden_sizes[0],) * (depth or len(hidden_sizes))
        layers: list[nn.Module] = [*_resized(image_size), Normalize(), nn.Flatten()]
        width = image_size * image_size
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU(), Dropout(dropout)]
            width = hidden
        layers.append(nn.Linear(width, NUM_CLASSES))
        super().__init__(*layers)
        self.image_size = image_size  # the side of the images its first Linear takes (train.fit resizes to it)


class PreNormResidual(nn.Module):
    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm, self.fn = nn.LayerNorm(dim), fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x)) + x


def feed_forward(width: int, expansion: float, dropout: float) -> nn.Sequential:
    hidden = max(1, int(width * expansion))
    return nn.Sequential(nn.Linear(width, hidden), nn.GELU(), Dropout(dropout),
                         nn.Linear(hidden, width), Dropout(dropout))


class MLPMixer(nn.Sequential):
    """MLP-Mixer (Tolstikhin et al. 2021), after lucidrains/mlp-mixer-pytorch.

    token_expansion scales the token-mixing MLP (hidden = patches * token_expansion, mixing
    across patches); channel_expansion scales the channel-mixing MLP (hidden = dim *
    channel_expansion, mixing within each patch).
    """

    def __init__(self, *, patch_size: int = 7, dim: int = 64, depth: int = 4,
                 token_expansion: float = 2.0, channel_expansion: float = 4.0, dropout: float = 0.0,
                 image_size: int = IMAGE_SIZE):
        if patch_size < 1 or divides_problems({"patch_size": [patch_size], "image_size": [image_size]}):
            divisors = [d for d in range(1, image_size + 1) if image_size % d == 0]
            raise MnistTuneError(f"mixer patch_size {patch_size} must divide the image size {image_size} "
                                 f"(one of {divisors})")
        num_patches = (image_size // patch_size) ** 2
        super().__init__(
            *_resized(image_size),
            Normalize(),
            Rearrange("b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch_size, p2=patch_size),
            nn.Linear(patch_size * patch_size, dim),
            *[nn.Sequential(
                PreNormResidual(dim, nn.Sequential(  # token mixing: an MLP across the patches
                    Rearrange("b n d -> b d n"),
                    feed_forward(num_patches, token_expansion, dropout),
                    Rearrange("b d n -> b n d"))),
                PreNormResidual(dim, feed_forward(dim, channel_expansion, dropout)),  # channel mixing
            ) for _ in range(depth)],
            nn.LayerNorm(dim),
            Reduce("b n d -> b d", "mean"),
            nn.Linear(dim, NUM_CLASSES),
        )
        self.image_size = image_size


# The builders' keyword arguments are the model tunables of tunables.TUNABLES (tests/test_models.py).
MODELS = dict(zip(MODEL_NAMES, (MLP, MLPMixer), strict=True))


def build_model(name: str, **hp) -> nn.Module:
    """Build a model by name from its keyword hyperparameters (unknown keys are an error)."""
    if name not in MODELS:
        raise MnistTuneError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    try:
        return MODELS[name](**hp)
    except TypeError as e:  # an unexpected keyword names the parameter
        raise MnistTuneError(f"model {name!r}: {e}") from None
