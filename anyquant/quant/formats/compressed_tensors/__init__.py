"""compressed-tensors checkpoints (llm-compressor output): reader and writer (formats.md §4).

Three modules, one job each: config.py parses and validates the `quantization_config` (config
groups, quantization args, presets) and maps a group to a canonical spec; reader.py decides per
layer from the tensors present and decodes `pack-quantized`, `int-quantized`, `float-quantized`
and `naive-quantized` layers; writer.py encodes canonical weights the way llm-compressor does.
Importing this package registers the reader and the writer.
"""

from anyquant.quant.formats.compressed_tensors.config import (
    PRESETS,
    ConfigGroup,
    Preset,
    QuantArgs,
    act_quant,
    parse_args,
    parse_group,
    spec_from_args,
)
from anyquant.quant.formats.compressed_tensors.reader import CompressedTensorsFormat
from anyquant.quant.formats.compressed_tensors.writer import (
    WRITTEN_VERSION,
    CompressedTensorsWriter,
    storage_format,
)

__all__ = [
    "PRESETS",
    "WRITTEN_VERSION",
    "CompressedTensorsFormat",
    "CompressedTensorsWriter",
    "ConfigGroup",
    "Preset",
    "QuantArgs",
    "act_quant",
    "parse_args",
    "parse_group",
    "spec_from_args",
    "storage_format",
]
