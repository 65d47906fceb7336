"""Dataset recipes, folder I/O, import of real data."""
