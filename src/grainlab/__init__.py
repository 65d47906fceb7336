"""grainlab: deep learning experiments on metal microstructure images."""
