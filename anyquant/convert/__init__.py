"""`anyquant convert`: rewrite quantized checkpoints between formats (converter.py drives it).

A tool over `loading` (checkpoints, the meta model, load plans) and `quant` (formats, the canonical
weight), like `quant/quantize.py`; only the command line imports it.
"""
