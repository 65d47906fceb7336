"""Grain-boundary tracing: U-Net, losses, training, tiled inference, grains and metrics."""
