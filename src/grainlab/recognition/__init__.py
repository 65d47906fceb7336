"""Microstructure recognition: crops, a magnification-aware triplet network, open-set GMMs, crop-averaged prediction."""
