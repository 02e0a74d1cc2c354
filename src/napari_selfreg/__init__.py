"""napari-selfreg: fine-tune a SelfReg UNet from strokes painted in napari."""

__version__ = "0.1.0"

# Label convention used everywhere (files, layers, command line):
# 0 = not painted, 1 = background, 2, 3, ... = structures.
UNPAINTED = 0
BACKGROUND = 1
