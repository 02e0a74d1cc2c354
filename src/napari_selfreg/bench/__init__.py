"""Benchmarks: the interactive protocol (strokes + a CPU budget) and the paper protocol.

Heavy dependencies (torch, scikit-learn, psutil) are imported inside the functions that
need them; scikit-learn and psutil come with the ``bench`` extra.
"""
