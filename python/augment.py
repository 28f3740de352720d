"""Batched image augmentations written with torch ops (no torchvision).

Every view is one affine resampling (random resized crop, small rotation and
shear, optional horizontal flip) followed by cheap photometric changes
(contrast / brightness, blur, Gaussian noise). The random parameters are drawn
first, on the CPU, from an explicit generator, and applied afterwards on any
device. Drawing them for the *global* batch and letting each process pick its
own rows is what makes a multi-process run see exactly the views a
single-process run sees.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AugmentConfig:
    out_size: int = 16
    channels: int = 1
    scale: tuple = (0.6, 1.0)  # crop area as a fraction of the image
    ratio: tuple = (3 / 4, 4 / 3)  # crop aspect ratio
    max_rotation: float = 15.0  # degrees, uniform in [-r, r]
    max_shear: float = 0.15  # x shear factor, uniform in [-s, s]
    hflip: bool = False  # off for digits: a mirrored 2 is not a 2
    contrast: float = 0.4  # multiply by uniform [1 - c, 1 + c]
    brightness: float = 0.2  # add uniform [-b, b]
    blur_prob: float = 0.3  # chance of blending (by a uniform amount) towards a 3x3 Gaussian blur
    noise_std: float = 0.05  # max std of additive Gaussian noise


class Augmenter:
    """Draws and applies random views; see :class:`AugmentConfig` for the knobs."""

    def __init__(self, config: AugmentConfig):
        self.cfg = config

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Parameters of ``n`` views as one CPU tensor ``[n, P]`` (rows can be sliced freely).

        The first 11 columns are the geometric and photometric parameters, the
        rest the view's unit Gaussian noise image, so that a row alone fixes its view.
        """
        cfg = self.cfg

        def uniform(lo, hi):
            return lo + (hi - lo) * torch.rand(n, generator=generator)

        area = uniform(*cfg.scale)
        log_ratio = uniform(math.log(cfg.ratio[0]), math.log(cfg.ratio[1]))
        # Half-width and half-height of the crop in normalized [-1, 1] coordinates.
        half_w = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
        half_h = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
        cx = (1 - half_w) * uniform(-1.0, 1.0)
        cy = (1 - half_h) * uniform(-1.0, 1.0)
        angle = uniform(-1.0, 1.0) * math.radians(cfg.max_rotation)
        shear = uniform(-cfg.max_shear, cfg.max_shear)
        flip = (torch.rand(n, generator=generator) < 0.5).float() if cfg.hflip else torch.zeros(n)
        contrast = uniform(1 - cfg.contrast, 1 + cfg.contrast)
        brightness = uniform(-cfg.brightness, cfg.brightness)
        blur = (torch.rand(n, generator=generator) < cfg.blur_prob).float() * torch.rand(n, generator=generator)
        noise = uniform(0.0, cfg.noise_std)
        eps = torch.randn(n, cfg.channels * cfg.out_size**2, generator=generator)
        scalars = torch.stack([half_w, half_h, cx, cy, angle, shear, flip, contrast, brightness, blur, noise], dim=1)
        return torch.cat([scalars, eps], dim=1)

    def _grid(self, params, size, device):
        half_w, half_h, cx, cy, angle, shear, flip = params[:, :7].to(device).unbind(1)
        cos, sin = angle.cos(), angle.sin()
        sign = 1 - 2 * flip  # -1 mirrors the output horizontally
        # theta maps output coordinates to input coordinates:
        # input = centre + diag(half_w, half_h) @ rotation @ shear @ flip @ output
        a, b = cos * sign, -sin + cos * shear
        c, d = sin * sign, cos + sin * shear
        theta = torch.stack([
            torch.stack([half_w * a, half_w * b, cx], dim=1),
            torch.stack([half_h * c, half_h * d, cy], dim=1),
        ], dim=1)
        return F.affine_grid(theta, (len(params), 1, size, size), align_corners=False)

    def apply(self, images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Views of ``images [n, C, h, w]`` (values in [0, 1]) with ``params [n, P]``; returns ``[n, C, S, S]``."""
        size = self.cfg.out_size
        grid = self._grid(params, size, images.device)
        x = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        contrast, brightness, blur, noise = params[:, 7:11].to(images.device).view(-1, 4, 1, 1, 1).unbind(1)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * contrast + mean + brightness
        x = x + blur * (_blur3(x) - x)
        eps = params[:, 11:].to(images.device).view_as(x)
        return x + noise * eps

    def resize(self, images: torch.Tensor) -> torch.Tensor:
        """The un-augmented view: the whole image resampled exactly as a crop of scale 1 is."""
        identity = torch.zeros(len(images), 7)
        identity[:, 0] = identity[:, 1] = 1.0
        return F.grid_sample(images, self._grid(identity, self.cfg.out_size, images.device),
                             mode="bilinear", padding_mode="zeros", align_corners=False)


def _blur3(x):
    kernel = torch.tensor([1.0, 2.0, 1.0], device=x.device, dtype=x.dtype)
    kernel = (kernel[:, None] * kernel[None, :]) / 16
    c = x.shape[1]
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel.expand(c, 1, 3, 3), groups=c)
