"""Images in, digits out: read files into the models' input format and classify them."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from mnist_tune.errors import MnistTuneError


def read_images(paths, invert: bool = False) -> torch.Tensor:
    """Files -> float (N, 1, 28, 28) in [0, 1]: grayscale, resized to 28x28 if needed."""
    from PIL import Image, UnidentifiedImageError

    batch = []
    for path in paths:
        try:
            # A few hundred kB of PNG can declare billions of pixels: PIL raises
            # DecompressionBombError above 2x Image.MAX_IMAGE_PIXELS and only warns between 1x
            # and 2x, then decodes it anyway (gigabytes of memory for one "digit"). Both are
            # refused here, before any pixel is decoded.
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as image:
                    gray = image.convert("L")
            if gray.size != (28, 28):
                gray = gray.resize((28, 28), Image.Resampling.BILINEAR)
            pixels = np.asarray(gray, dtype=np.float32) / 255
        except FileNotFoundError:
            raise MnistTuneError(f"{path}: no such file") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            # PIL: "Image size (N pixels) exceeds limit of M pixels, could be decompression bomb DOS attack."
            reason = str(e).split(", could be")[0].rstrip(".") or type(e).__name__
            raise MnistTuneError(f"{path}: refused as a possible decompression bomb: {reason}") from None
        except (UnidentifiedImageError, OSError) as e:
            raise MnistTuneError(f"{path}: not a readable image ({type(e).__name__})") from None
        batch.append(1 - pixels if invert else pixels)
    return torch.from_numpy(np.stack(batch)).unsqueeze(1)


@torch.inference_mode()
def classify(model, images: torch.Tensor) -> list[tuple[int, float]]:
    probs = model(images).softmax(1)
    best = probs.max(1)
    return list(zip(best.indices.tolist(), best.values.tolist()))
