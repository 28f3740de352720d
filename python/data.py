"""Datasets for the pretraining example: scikit-learn's digits, or a folder of images.

Both end up as one in-memory tensor of images in ``[0, 1]`` plus integer labels;
the examples are small enough that a data loader would cost more than it saves.
Labels are used only by the evaluation (and the online probe), never by the
self-supervised loss.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


class DataError(ValueError):
    """The requested data cannot be used; the message says why."""


@dataclass
class ImageSet:
    images: torch.Tensor  # [N, C, H, W] float32 in [0, 1]
    labels: torch.Tensor  # [N] int64
    classes: list

    def __len__(self):
        return len(self.labels)

    def subset(self, index):
        return ImageSet(self.images[index], self.labels[index], self.classes)


def load_digits_set() -> ImageSet:
    """The 1,797 8x8 handwritten digits bundled with scikit-learn (no download)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are counts 0..16 of the original 32x32 bitmaps per 4x4 block.
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    return ImageSet(images, labels, [str(c) for c in digits.target_names])


def _load_image(path: Path, size: int, mode: str) -> np.ndarray:
    """Open one image, resize its shorter side to ``size`` and centre-crop a square."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert(mode)
        w, h = im.size
        scale = size / min(w, h)
        im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
        array = np.asarray(im, dtype=np.float32) / 255.0
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def load_image_folder(root, size: int, channels: int = 0) -> ImageSet:
    """Images in ``root/<class name>/*.png`` (the ImageFolder layout), read with Pillow.

    ``channels`` is 1 (grayscale) or 3 (RGB); 0 picks 1 when every image is
    grayscale, else 3. Raises :class:`DataError` for a missing path, a folder
    without class sub-folders or images, or fewer than two classes.
    """
    from PIL import Image

    root = Path(root)
    if not root.exists():
        raise DataError(f"{root} does not exist")
    if not root.is_dir():
        raise DataError(f"{root} is not a directory")
    classes, files = [], []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found = sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if found:
            files.extend((p, len(classes)) for p in found)
            classes.append(class_dir.name)
    if not files:
        raise DataError(f"{root} has no images in class sub-folders (expected {root}/<class>/<image>.png)")
    if len(classes) < 2:
        raise DataError(f"{root} has a single class ({classes[0]}); the evaluation needs at least two")
    if channels == 0:
        gray = True
        for path, _ in files:
            with Image.open(path) as im:
                if im.mode not in ("1", "L", "LA", "I", "I;16", "F"):
                    gray = False
                    break
        channels = 1 if gray else 3
    mode = "L" if channels == 1 else "RGB"
    try:
        images = np.stack([_load_image(path, size, mode) for path, _ in files])
    except OSError as err:
        raise DataError(f"cannot read an image under {root}: {err}") from err
    labels = np.array([label for _, label in files], dtype=np.int64)
    return ImageSet(torch.from_numpy(images), torch.from_numpy(labels), classes)


def holdout_split(labels: torch.Tensor, fraction: float, seed: int):
    """Stratified split of sample indices into (train, held-out).

    Each class with at least two samples gives ``round(fraction * count)`` of
    them (at least one) to the held-out side. The split has its own seed so that
    runs with different training seeds are evaluated on the same images.
    """
    if not 0.0 < fraction < 1.0:
        raise DataError(f"the held-out fraction must be in (0, 1), got {fraction}")
    gen = torch.Generator().manual_seed(seed)
    train, held = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        k = min(len(idx) - 1, max(1, round(fraction * len(idx)))) if len(idx) > 1 else 0
        held.append(idx[:k])
        train.append(idx[k:])
    train, held = torch.cat(train).sort().values, torch.cat(held).sort().values
    if len(held) == 0:
        raise DataError("no class has two images; nothing can be held out for evaluation")
    return train, held
