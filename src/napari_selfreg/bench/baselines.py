"""The baselines SelfReg-UNet must beat in the interactive protocol.

- A random forest on ``skimage.feature.multiscale_basic_features`` trained on the same
  strokes: the classic interactive "pixel classifier" (ilastik / napari-convpaint style).
- Otsu's threshold on the hematoxylin channel of a colour deconvolution: what a user
  gets without painting anything for nuclei. Which side of the threshold is structure
  is decided from the strokes (the mean hematoxylin under structure strokes versus
  background strokes): nuclei are hematoxylin-rich, but GlaS glands are a mixture of
  dark epithelium and pale lumen, so a fixed "above threshold" would silently score the
  inverted mask there. Without strokes the default is "above = structure".

Both return painting ids (1 = background, 2 = structure) like ``core.predict``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _require_sklearn():
    try:
        from sklearn.ensemble import RandomForestClassifier
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the random-forest baseline needs scikit-learn: pip install 'napari-selfreg[bench]'"
        ) from error
    return RandomForestClassifier


@dataclass
class ForestConfig:
    n_estimators: int = 100
    max_depth: int | None = None
    n_jobs: int = 2
    sigma_min: float = 1.0
    sigma_max: float = 16.0
    max_samples_per_class: int = 20_000  # strokes are < 1 % of the image: this is rarely hit
    chunk_pixels: int = 250_000  # predict in chunks so memory stays bounded


def pixel_features(image: np.ndarray, config: ForestConfig | None = None) -> np.ndarray:
    """(H, W, F) float32 intensity, edge and texture features at several scales."""
    from skimage.feature import multiscale_basic_features
    from skimage.util import img_as_float32

    config = config or ForestConfig()
    image = np.asarray(image)
    channel_axis = -1 if image.ndim == 3 else None
    features = multiscale_basic_features(
        img_as_float32(image), channel_axis=channel_axis, sigma_min=config.sigma_min, sigma_max=config.sigma_max
    )
    return features.astype(np.float32, copy=False)


def random_forest_segment(
    image: np.ndarray, strokes: np.ndarray, seed: int = 0, config: ForestConfig | None = None
) -> np.ndarray:
    """Train a seeded random forest on the painted pixels and label every pixel."""
    forest_cls = _require_sklearn()
    config = config or ForestConfig()
    strokes = np.asarray(strokes)
    features = pixel_features(image, config)
    h, w, f = features.shape
    flat = features.reshape(-1, f)
    painted = strokes.reshape(-1)
    rng = np.random.default_rng(seed)
    index = []
    for cls in np.unique(painted[painted > 0]):
        where = np.flatnonzero(painted == cls)
        if len(where) > config.max_samples_per_class:
            where = rng.choice(where, config.max_samples_per_class, replace=False)
        index.append(where)
    if len(index) < 2:
        raise ValueError("the random forest needs background (1) and structure (2) strokes")
    index = np.concatenate(index)
    forest = forest_cls(
        n_estimators=config.n_estimators, max_depth=config.max_depth, n_jobs=config.n_jobs, random_state=seed
    )
    forest.fit(flat[index], painted[index])
    out = np.empty(h * w, np.uint8)
    for start in range(0, h * w, config.chunk_pixels):
        out[start : start + config.chunk_pixels] = forest.predict(flat[start : start + config.chunk_pixels])
    return out.reshape(h, w)


def hematoxylin(image: np.ndarray) -> np.ndarray:
    """The hematoxylin optical density (colour deconvolution, Ruifrok & Johnston)."""
    from skimage.color import rgb2hed

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] < 3:
        raise ValueError("Otsu on hematoxylin needs an RGB image")
    return rgb2hed(image[..., :3])[..., 0]


def otsu_segment(image: np.ndarray, strokes: np.ndarray | None = None, smooth_sigma: float = 1.0) -> np.ndarray:
    """Otsu's threshold on the (lightly smoothed) hematoxylin channel; polarity from the strokes.

    The light Gaussian smoothing (sigma 1 px) only removes pixel noise, which would
    otherwise speckle the mask and understate the baseline.
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    h_channel = hematoxylin(image)
    if smooth_sigma:
        h_channel = ndimage.gaussian_filter(h_channel, smooth_sigma)
    above = h_channel > threshold_otsu(h_channel)
    if otsu_polarity(h_channel, strokes) < 0:
        above = ~above
    return np.where(above, 2, 1).astype(np.uint8)


def otsu_polarity(h_channel: np.ndarray, strokes: np.ndarray | None) -> int:
    """+1 when structure is the hematoxylin-rich side, -1 when the strokes say otherwise."""
    if strokes is None:
        return 1
    strokes = np.asarray(strokes)
    structure, background = strokes >= 2, strokes == 1
    if not structure.any() or not background.any():
        return 1
    return 1 if h_channel[structure].mean() >= h_channel[background].mean() else -1
