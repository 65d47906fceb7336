"""grainlab's benchmark suite: `python -m benchmarks` (or `make bench`).

Every speed figure is measured side by side with a plain reference implementation (the
usual lab code: fp32, one image or tile or crop at a time) in the same run, and the ratio
is printed: ratios hold on a noisy shared machine, absolute times do not. The table goes
to stdout and every figure to benchmarks/results.json. Speed is never asserted in tests.
"""
