"""The engine: numpy + torch only. Never imports Qt or napari."""
