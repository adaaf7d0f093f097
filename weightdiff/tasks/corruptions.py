"""Image corruptions of the 8×8 digits, each with a severity in [0, 1]: the ``cordigits`` tasks.

A corruption is a function ``(x, severity, generator) -> x'`` on images ``(N, 1, H, W)`` float with
values in ``[0, 1]`` (:data:`PIXEL_RANGE`, the digits' range): the output has the same shape and
dtype and stays in that range. Severity 0 is the identity; a graded corruption grows with its
severity up to, at 1, the strength its constant below states (e.g. ``MAX_ROTATION`` degrees); an
ungraded one (``invert``, ``mirror``) is either off (0) or on (any severity > 0). Random corruptions (noise, salt and
pepper, occlusion) draw from ``generator`` only, so a seeded generator gives the same images
every time; :func:`corruption_seed` derives such seeds from a task name with a stable hash.

:data:`CORRUPTIONS` is the registry, by name; each :class:`Corruption` also carries the words
that name it in task descriptions. :func:`apply_corruptions` composes them, first to last::

    x = digits_arrays().x_test                                 # (500, 1, 8, 8) in [0, 1]
    g = torch.Generator().manual_seed(corruption_seed("cordigits:c1=rotate,s1=0.75,c2=blur,s2=0.3", "test"))
    y = apply_corruptions(x, [("rotate", 0.75), ("blur", 0.3)], g)  # 90° counter-clockwise, then blurred
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from weightdiff.tasks.rotdigits import rotate_images

PIXEL_RANGE = (0.0, 1.0)  # the digits' pixel values (weightdiff.tasks.digits scales 0..16 to 0..1)

# The strength of each graded corruption at severity 1 (linear in the severity unless its function says otherwise).
MAX_ROTATION = 120.0     # degrees counter-clockwise (turning further changes digits less: 0, 1, 8 at 180°)
MAX_SHEAR = 1.0          # horizontal shift per unit of height (x' = x + k·y)
MAX_ZOOM = 1.0           # magnification 1 + MAX_ZOOM (the centre enlarged, the border cut off)
MAX_SHIFT = 2.0          # pixels right and down
MAX_BLUR_SIGMA = 2.0     # pixels (Gaussian kernel of radius BLUR_RADIUS)
BLUR_RADIUS = 2
MAX_NOISE_STD = 0.6      # additive Gaussian noise, then clipped to PIXEL_RANGE
MAX_SALT_PEPPER = 0.4    # fraction of pixels set to black or white (half each, on average)
MIN_CONTRAST = 0.05      # contrast left at severity 1 (geometric in the severity: MIN_CONTRAST ** severity)
MAX_WAVE = 2.0           # pixels of horizontal displacement, a sine of the row (one period per image height)
MAX_OCCLUSION = 5        # side in pixels of a black square at a random place in each image
PIXEL_BLOCK = 2          # pixelation averages blocks of PIXEL_BLOCK × PIXEL_BLOCK pixels

CorruptionFn = Callable[[torch.Tensor, float, torch.Generator], torch.Tensor]


def _warp(x: torch.Tensor, theta: list[list[float]]) -> torch.Tensor:
    """Bilinear resampling of ``x (N, C, H, W)`` through the affine map ``theta (2, 3)`` from output to
    input coordinates (``affine_grid``'s convention: x right, y down, both in [-1, 1]); zero outside."""
    t = torch.tensor(theta, dtype=x.dtype, device=x.device).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(t, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def rotate(x: torch.Tensor, severity: float, generator: torch.Generator) -> torch.Tensor:
    """Counter-clockwise rotation by ``MAX_ROTATION · severity`` degrees about the centre."""
    return rotate_images(x, MAX_ROTATION * severity)


def shear(x: torch.Tensor, severity: float, generator: torch.Generator) -> torch.Tensor:
    """Horizontal shear: rows below the centre move right, rows above it left (``k = MAX_SHEAR · severity``)."""
    # Output pixel (u, v) samples the input at (u - k v, v): the inverse of x' = x + k y.
    return _warp(x, [[1.0, -MAX_SHEAR * severity, 0.0], [0.0, 1.0, 0.0]])


def zoom(x: torch.Tensor, severity: float, generator: torch.Generator) -> torch.Tensor:
    """Magnification by ``1 + MAX_ZOOM · severity`` about the centre (the border is cut off)."""
    z = 1.0 + MAX_ZOOM * severity
    return _warp(x, [[1.0 / z, 0.0, 0.0], [0.0, 1.0 / z, 0.0]])


def translate(x: torch.Tensor, severity: float, generator: torch.Generator) -> torch.Tensor:
    """Shift by ``MAX_SHIFT · severity`` pixels right and down (bilinear for fractional shifts)."""
    h, w = x.shape[-2:]
    t = MAX_SHIFT * severity
    # Normalised coordinates span 2 over the side: a shift of t pixels is 2 t / side.
    return _warp(x, [[1.0, 0.0, -2.0 * t / w], [0.0, 1.0, -2.0 * t / h]])


def wave(x: torch.Tensor, severity: float, generator: torch.Generator) -> torch.Tensor:
    """Sinusoidal distortion: row ``i`` shifts right by ``MAX_WAVE · severity · sin(2π (i + ½) / H)`` pixels."""
    n, _, h, w = x.shape
    rows = (torch.arange(h, dtype=x.dtype, device=x.device) + 0.5) / h  # (H,) row centres in (0, 1)
    shift = 2.0 * MAX_WAVE * severity * torch.sin(2.0 * math.pi * rows) / w  # (H,) normalised
    identity = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=x.dtype, device=x.device)
    grid = F.affine_grid(identity.expand(n, 2, 3), list(x.shape), align_corners=False).clone()  # (N, H, W, 2)
    grid[..., 0] -= shift[None, :, None]
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def blur(x: torch.Tensor, severity: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian blur of standard deviation ``MAX_BLUR_SIGMA · severity`` pixels (zero beyond the border)."""
    sigma = MAX_BLUR_SIGMA * severity
    offsets = torch.arange(-BLUR_RADIUS, BLUR_RADIUS + 1, dtype=x.dtype, device=x.device)
    k1 = torch.exp(-0.5 * (offsets / sigma) ** 2)
    k1 = k1 / k1.sum()  # weights summing to 1 keep the values in the pixel range
    kernel = (k1[:, None] * k1[None, :]).expand(x.shape[1], 1, -1, -1)  # (C, 1, k, k)
    return F.conv2d(x, kernel, padding=BLUR_RADIUS, groups=x.shape[1])


def noise(x: torch.Tensor, severity: float, generator: torch.Generator) -> torch.Tensor:
    """Additive Gaussian noise of standard deviation ``MAX_NOISE_STD · severity``, clipped to the pixel range."""
    eps = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    return (x + MAX_NOISE_STD * severity * eps).clamp(*PIXEL_RANGE)


def salt_pepper(x: torch.Tensor, severity: float, generator: torch.Generator) -> torch.Tensor:
    """A fraction ``MAX_SALT_PEPPER · severity`` of the pixels, drawn at random, set to black or white."""
    hit = torch.rand(x.shape, generator=generator) < MAX_SALT_PEPPER * severity
    white = torch.rand(x.shape, generator=generator) < 0.5
    value = torch.where(white, PIXEL_RANGE[1], PIXEL_RANGE[0]).to(x.dtype)
    return torch.where(hit.to(x.device), value.to(x.device), x)


def invert(x: torch.Tensor, severity: float, generator: torch.Generator) -> torch.Tensor:
    """Photographic negative, ``lo + hi - x`` (ungraded: any severity > 0)."""
    lo, hi = PIXEL_RANGE
    return (lo + hi) - x


def contrast(x: torch.Tensor, severity: float, generator: torch.Generator) -> torch.Tensor:
    """Contrast reduction: deviations from each image's mean scaled by ``MIN_CONTRAST ** severity``.

    Geometric in the severity because the base's accuracy depends on the contrast ratio: halving
    the contrast hardly matters, the last halvings do.
    """
    mean = x.mean(dim=(-3, -2, -1), keepdim=True)  # (N, 1, 1, 1)
    return mean + MIN_CONTRAST ** severity * (x - mean)


def occlude(x: torch.Tensor, severity: float, generator: torch.Generator) -> torch.Tensor:
    """A black square of side ``round(MAX_OCCLUSION · severity)`` pixels at a random place in each image."""
    n, _, h, w = x.shape
    side = min(round(MAX_OCCLUSION * severity), h, w)
    if side == 0:
        return x.clone()
    top = torch.randint(h - side + 1, (n,), generator=generator)
    left = torch.randint(w - side + 1, (n,), generator=generator)
    rows, cols = torch.arange(h), torch.arange(w)
    inside_r = (rows[None, :] >= top[:, None]) & (rows[None, :] < top[:, None] + side)  # (N, H)
    inside_c = (cols[None, :] >= left[:, None]) & (cols[None, :] < left[:, None] + side)  # (N, W)
    mask = (inside_r[:, :, None] & inside_c[:, None, :])[:, None].to(x.device)  # (N, 1, H, W)
    return x.masked_fill(mask, PIXEL_RANGE[0])


def pixelate(x: torch.Tensor, severity: float, generator: torch.Generator) -> torch.Tensor:
    """``(1 - severity) · x + severity · blocks``, ``blocks`` being ``x`` averaged over ``PIXEL_BLOCK``-pixel squares.

    A blend rather than a coarser grid: on 8×8 images the grids between 8 and 4 cells a side do not
    align with the pixels (a 5×5 grid loses more than a 4×4 one), so a grid size would not grow
    monotonically with the severity.
    """
    blocks = F.interpolate(F.avg_pool2d(x, PIXEL_BLOCK), scale_factor=PIXEL_BLOCK, mode="nearest")
    return (1.0 - severity) * x + severity * blocks


def mirror(x: torch.Tensor, severity: float, generator: torch.Generator) -> torch.Tensor:
    """Left-right mirror image (ungraded: any severity > 0)."""
    return x.flip(-1)


@dataclass(frozen=True)
class Corruption:
    """One corruption of the registry and the words that name it.

    Attributes:
        name: registry key and task-string value, e.g. ``"rotate"``.
        fn: the function (severity > 0; :meth:`__call__` handles 0).
        graded: whether the strength grows with the severity (``False``: on for any severity > 0).
        participles: past participles for "digits that were …", e.g. ``("rotated", "turned")``.
        nouns: noun phrases without an article for "digits under (heavy) …", e.g. ``("rotation", "turning")``.
        keywords: lower-case word stems; a description names the corruption when it holds one.
    """

    name: str
    fn: CorruptionFn
    graded: bool
    participles: tuple[str, ...]
    nouns: tuple[str, ...]
    keywords: tuple[str, ...]

    def __call__(self, x: torch.Tensor, severity: float, generator: torch.Generator) -> torch.Tensor:
        """Corrupt ``x (N, 1, H, W)`` at ``severity`` in [0, 1]; severity 0 returns a copy of ``x``.

        Raises:
            ValueError: a severity outside [0, 1] or an input that is not ``(N, C, H, W)`` floats.
        """
        if not 0.0 <= severity <= 1.0:
            raise ValueError(f"corruption '{self.name}': severity {severity!r} is outside [0, 1]")
        if x.dim() != 4 or not x.is_floating_point():
            raise ValueError(f"corruption '{self.name}': expected float images (N, C, H, W), got "
                             f"{x.dtype} {tuple(x.shape)}")
        if severity == 0.0:
            return x.clone()
        return self.fn(x, float(severity), generator)

    def mentioned_in(self, text: str) -> bool:
        """Whether ``text`` holds one of :attr:`keywords` (case-insensitive)."""
        low = text.lower()
        return any(k in low for k in self.keywords)


CORRUPTIONS: dict[str, Corruption] = {c.name: c for c in (
    Corruption("rotate", rotate, True, participles=("rotated", "turned", "tilted"),
               nouns=("rotation", "turning", "tilting"), keywords=("rotat", "turn", "tilt")),
    Corruption("shear", shear, True, participles=("sheared", "slanted", "skewed"),
               nouns=("shearing", "shear", "slanting"), keywords=("shear", "slant", "skew")),
    Corruption("zoom", zoom, True, participles=("zoomed in", "magnified", "enlarged"),
               nouns=("zooming", "magnification", "enlargement"), keywords=("zoom", "magnif", "enlarg")),
    Corruption("translate", translate, True, participles=("shifted", "translated", "displaced"),
               nouns=("translation", "shifting", "displacement"), keywords=("shift", "translat", "displac")),
    Corruption("blur", blur, True, participles=("blurred", "smoothed", "smeared"),
               nouns=("blurring", "blur", "smoothing"), keywords=("blur", "smooth", "smear")),
    Corruption("noise", noise, True, participles=("noisy", "grainy", "corrupted by gaussian noise"),
               nouns=("gaussian noise", "random noise", "grain"),
               keywords=("gaussian", "noisy", "grain", "random noise")),
    Corruption("saltpepper", salt_pepper, True,
               participles=("peppered with dead pixels", "salt-and-pepper corrupted",
                            "dotted with black and white specks"),
               nouns=("salt-and-pepper noise", "impulse noise", "black and white specks"),
               keywords=("salt", "pepper", "impulse", "speck", "dead pixel")),
    Corruption("invert", invert, False, participles=("inverted", "colour-inverted", "made negative"),
               nouns=("inversion", "negative imaging", "colour inversion"),
               keywords=("invert", "inversion", "negative")),
    Corruption("contrast", contrast, True, participles=("faded", "washed out", "reduced in contrast"),
               nouns=("contrast loss", "fading", "contrast reduction"),
               keywords=("contrast", "faded", "fading", "washed out")),
    Corruption("wave", wave, True, participles=("warped by a wave", "rippled", "made wavy"),
               nouns=("wave distortion", "rippling", "elastic warping"),
               keywords=("wave", "wavy", "rippl", "elastic", "warp")),
    Corruption("occlude", occlude, True,
               participles=("occluded", "covered by a black square", "blacked out in one square"),
               nouns=("occlusion", "covering by a black square", "blacking out of a square"),
               keywords=("occlu", "cover", "blacked", "blacking")),
    Corruption("pixelate", pixelate, True, participles=("pixelated", "blocky", "mosaicked"),
               nouns=("pixelation", "mosaic", "blockiness"), keywords=("pixelat", "blocky", "blockiness", "mosaic")),
    Corruption("mirror", mirror, False, participles=("mirrored", "flipped left to right", "reflected"),
               nouns=("mirroring", "left-right flipping", "reflection"), keywords=("mirror", "flip", "reflect")),
)}


def get_corruption(name: str) -> Corruption:
    """The registry entry ``name``.

    Raises:
        KeyError: an unknown name (the message lists the registry).
    """
    if name not in CORRUPTIONS:
        raise KeyError(f"unknown corruption {name!r}; expected one of {sorted(CORRUPTIONS)}")
    return CORRUPTIONS[name]


def apply_corruptions(x: torch.Tensor, steps: Sequence[tuple[str, float]], generator: torch.Generator) -> torch.Tensor:
    """Apply corruptions in order: ``steps = [(name_1, severity_1), (name_2, severity_2), ...]``.

    Args:
        x: images ``(N, 1, H, W)`` float in :data:`PIXEL_RANGE`.
        steps: corruption names of :data:`CORRUPTIONS` and their severities, first applied first.
        generator: the source of every random draw (seed it for reproducible images).

    Returns:
        ``(N, 1, H, W)`` of ``x``'s dtype, in :data:`PIXEL_RANGE`.
    """
    out = x
    for name, severity in steps:
        out = get_corruption(name)(out, severity, generator)
    return out if steps else x.clone()


def corruption_seed(task_name: str, split: str) -> int:
    """The seed of the random draws corrupting one split of a task: a stable hash (CRC-32) of both names."""
    return zlib.crc32(f"{task_name}|{split}".encode())
