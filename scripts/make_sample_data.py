"""Generate the plugin's sample data (synthetic, made by this project, free to redistribute).

Writes into src/napari_selfreg/sample_data/:
- he_tissue.png: an H&E-like RGB image: eosin-pink stroma with fibres, a few pale
  lumina, and hematoxylin-blue nuclei, rendered through skimage.color.hed2rgb so the
  colours follow the real stain vectors.
- he_strokes.png: a few painted strokes (1 = background, 2 = nucleus) so that Train
  works at once.
- he_ground_truth.png: the full nucleus mask (1 = background, 2 = nucleus) for checking
  a segmentation.
- fluorescence_nuclei.tif: a 16-bit gray image of blurred nuclei with shot noise, and
  fluorescence_ground_truth.tif: its instance ids (0 = background).

Run: ``python scripts/make_sample_data.py`` (deterministic: same bytes every run).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from scipy import ndimage
from skimage.color import hed2rgb
from skimage.draw import ellipse, line

OUT = Path(__file__).resolve().parents[1] / "src" / "napari_selfreg" / "sample_data"
SIZE = 256


def _nuclei(rng: np.random.Generator, shape: tuple[int, int], count: int, radius: tuple[float, float]) -> np.ndarray:
    """Instance ids of non-overlapping random ellipses (touching is allowed: realistic clusters)."""
    instances = np.zeros(shape, np.int32)
    placed = 0
    for _ in range(count * 20):
        if placed == count:
            break
        cy, cx = rng.uniform(6, shape[0] - 6), rng.uniform(6, shape[1] - 6)
        ry, rx = rng.uniform(*radius), rng.uniform(*radius)
        rr, cc = ellipse(cy, cx, ry, rx, shape=shape, rotation=rng.uniform(0, np.pi))
        if instances[rr, cc].any():
            continue
        placed += 1
        instances[rr, cc] = placed
    return instances


def he_like(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 image and nucleus mask (bool)."""
    shape = (SIZE, SIZE)
    instances = _nuclei(rng, shape, count=55, radius=(4.0, 8.0))
    nuclei = instances > 0
    # stroma: eosin with fibre-like texture; pale lumina carry little stain
    fibres = ndimage.gaussian_filter(rng.normal(size=shape), sigma=(1.0, 6.0))
    fibres = (fibres - fibres.min()) / np.ptp(fibres)
    lumen = ndimage.gaussian_filter(rng.normal(size=shape), sigma=18) > 0.02
    lumen &= ~ndimage.binary_dilation(nuclei, iterations=3)
    eosin = 0.015 + 0.04 * fibres
    eosin[lumen] *= 0.2
    # nuclei: hematoxylin with chromatin granules, and a little eosin
    chromatin = ndimage.gaussian_filter(rng.normal(size=shape), sigma=1.0)
    hema = np.where(nuclei, 0.12 + 0.03 * chromatin, 0.015 + 0.03 * fibres)
    hema[lumen] *= 0.3
    hema = ndimage.gaussian_filter(hema, sigma=0.8)
    eosin = np.where(nuclei, 0.02, eosin)
    hed = np.stack([hema, eosin, np.full(shape, 0.015)], axis=-1)
    rgb = hed2rgb(hed)
    rgb = np.clip(rgb + rng.normal(scale=0.015, size=rgb.shape), 0, 1)
    return (rgb * 255).round().astype(np.uint8), nuclei


def strokes_for(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A pathologist's quick strokes: short lines inside some nuclei, curves through background."""
    strokes = np.zeros(mask.shape, np.uint8)
    inside = ndimage.binary_erosion(mask, iterations=2)
    instances, count = ndimage.label(inside)
    for index in rng.choice(np.arange(1, count + 1), size=min(10, count), replace=False):
        coords = np.argwhere(instances == index)
        a, b = coords[0], coords[-1]
        rr, cc = line(int(a[0]), int(a[1]), int(b[0]), int(b[1]))
        stroke = np.zeros(mask.shape, bool)
        stroke[rr, cc] = True
        strokes[ndimage.binary_dilation(stroke) & inside] = 2
    far = ~ndimage.binary_dilation(mask, iterations=4)
    for _ in range(8):
        y, x = rng.uniform(10, mask.shape[0] - 10), rng.uniform(10, mask.shape[1] - 10)
        angle = rng.uniform(0, np.pi)
        length = rng.uniform(25, 60)
        t = np.linspace(0, 1, 200)
        ys = y + np.sin(angle) * length * t + 6 * np.sin(6 * t)
        xs = x + np.cos(angle) * length * t
        rr = np.clip(ys.round().astype(int), 0, mask.shape[0] - 1)
        cc = np.clip(xs.round().astype(int), 0, mask.shape[1] - 1)
        thick = np.zeros(mask.shape, bool)
        thick[rr, cc] = True
        thick = ndimage.binary_dilation(thick, iterations=1) & far
        strokes[thick] = 1
    return strokes


def fluorescence(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """uint16 nuclei image (dim background, shot noise) and its instance ids."""
    shape = (SIZE, SIZE)
    instances = _nuclei(rng, shape, count=45, radius=(5.0, 10.0))
    brightness = rng.uniform(0.5, 1.0, size=instances.max() + 1)
    brightness[0] = 0.0
    signal = ndimage.gaussian_filter(brightness[instances], sigma=1.5)
    expected = 200 + 3000 * signal
    image = rng.poisson(expected).astype(np.uint16)
    return image, instances.astype(np.uint16)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20240611)
    rgb, mask = he_like(rng)
    truth = np.where(mask, 2, 1).astype(np.uint8)
    strokes = strokes_for(mask, rng)
    Image.fromarray(rgb).save(OUT / "he_tissue.png", optimize=True)
    Image.fromarray(strokes).save(OUT / "he_strokes.png", optimize=True)
    Image.fromarray(truth).save(OUT / "he_ground_truth.png", optimize=True)
    gray, instances = fluorescence(rng)
    tifffile.imwrite(OUT / "fluorescence_nuclei.tif", gray, compression="zlib")
    tifffile.imwrite(OUT / "fluorescence_ground_truth.tif", instances, compression="zlib")
    total = sum(p.stat().st_size for p in OUT.iterdir() if p.is_file())
    for p in sorted(OUT.iterdir()):
        print(f"{p.name}: {p.stat().st_size / 1024:.1f} KiB")
    print(f"total {total / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
