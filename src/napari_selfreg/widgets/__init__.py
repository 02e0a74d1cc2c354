"""Qt/magicgui dock widgets: thin adapters from napari layers to the core."""
