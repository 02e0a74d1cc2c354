"""Class names on Labels layers, Qt-free so sample data and tests can use them.

Names live in the layer's ``features`` table (column ``class``, one row per id, row 0 =
"not painted"), so napari shows them in the status bar while painting and they travel
with the layer to whichever widget reads it.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

from ..core.data import MAX_CLASSES

NOT_PAINTED = "not painted"
DEFAULT_CLASSES = ("background", "nucleus")


def class_features(class_names: Sequence[str]) -> dict[str, list]:
    """Features table for a Labels layer: id 0 = not painted, 1.. = the given classes."""
    names = [NOT_PAINTED, *class_names]
    return {"index": list(range(len(names))), "class": names}


def class_names_of(layer) -> list[str] | None:
    """Class names stored on a Labels layer (ids 1..), or None when it has none."""
    features = getattr(layer, "features", None)
    if features is None or "class" not in getattr(features, "columns", ()):
        return None
    rows = dict(zip(features.get("index", features.index), features["class"], strict=True))
    names = []
    for label_id in range(1, len(rows)):
        if label_id not in rows:
            break
        names.append(str(rows[label_id]))
    return names or None

# one colour per class id, the same in every layer: background, then structures
CLASS_COLOURS = ("#f2c300", "#00d35a", "#2f8cff", "#ff3fd0", "#ff7b00", "#00e5ff", "#b36bff", "#ff3b3b")


def class_colour(label_id: int) -> str:
    """The colour of one painting id (1 = background).

    Past the fixed palette, hues step by the golden ratio over all but the yellows, so
    that no structure takes the background's colour or repeats another's.
    """
    if label_id <= len(CLASS_COLOURS):
        return CLASS_COLOURS[label_id - 1]
    step = label_id - len(CLASS_COLOURS)
    hue = (0.24 + 0.82 * ((step * 0.618034) % 1.0)) % 1.0  # skips 0.06-0.24, the yellows
    value = 0.95 if step % 2 else 0.7
    red, green, blue = colorsys.hsv_to_rgb(hue, 0.8, value)
    return f"#{round(red * 255):02x}{round(green * 255):02x}{round(blue * 255):02x}"


def class_colormap(show_background: bool = True, ids: int = MAX_CLASSES) -> dict:
    """A napari label colormap with fixed class colours for every id a model can hold.

    Strokes show the background class (yellow); predictions hide it so the tissue stays
    visible under the structures.
    """
    colours: dict = {None: "transparent", 0: "transparent"}
    for label_id in range(1, ids + 1):
        colours[label_id] = class_colour(label_id)
    if not show_background:
        colours[1] = "transparent"
    return colours
