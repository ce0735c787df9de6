"""Offline checkpoint rewriters: `anyquant convert` (converter.py: quantized formats into each
other) and `anyquant quantize` (quantize.py: an unquantized checkpoint into a quantized format).

Tools over `loading` (checkpoints, the meta model, load plans) and `quant` (formats, the canonical
weight, the quantization math); only the command line, tests and benchmarks import them.
"""
