"""`anyquant convert SRC out.gguf --format gguf`: a llama.cpp GGUF file, Q4_0 ... Q8_0 where exact.

Each quantized layer is decoded to the canonical weight and fitted exactly to the smallest of
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 that holds it (gguf_blocks_out.py: scales and minimums in fp16 as
GGML stores them), then packed into GGML blocks. A layer no type holds exactly (k-quant sub-block
scales, groups other than 32, scales or minimums that are not fp16) is refused with every type's
reason, or re-quantized with --requantize (its error reported). Unquantized tensors are written as F32.
Tensor names, the Llama q/k row order and the metadata keys follow llama.cpp's converter
(loading/gguf_layout.py maps them the other way); the tokenizer comes from tokenizer.json
(gguf_vocab.py), or is copied from a GGUF source. Llama and Qwen2 dense models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from anyquant.convert.converter import (
    ConversionRefused,
    ConvertOptions,
    ConvertReport,
    LayerOutcome,
    decode_layer,
)
from anyquant.convert.gguf_blocks_out import block_bytes, fit_ggml
from anyquant.convert.gguf_vocab import gguf_vocab
from anyquant.errors import AnyquantError, UnsupportedError
from anyquant.loading.gguf_layout import gguf_tensor_name, interleave_half_rows
from anyquant.loading.loader import build_on_meta
from anyquant.loading.plan import plan_layers
from anyquant.loading.sources import open_checkpoint
from anyquant.loading.validate import check_linear
from anyquant.quant.algorithms.rtn import quantize_rtn
from anyquant.quant.detect import detect_format
from anyquant.quant.formats.gguf_blocks import BLOCK_TYPES
from anyquant.quant.quant_error import relative_error
from anyquant.quant.reference import dequantize

ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}  # model_type -> general.architecture


def convert_to_gguf(src: str | Path, dst: str | Path, options: ConvertOptions | None = None) -> ConvertReport:
    import gguf
    import numpy as np

    options = options or ConvertOptions()
    src_path, dst_path = Path(src), Path(dst)
    if options.pad_for_tp > 1 or options.allow_reorder:
        raise UnsupportedError("--format gguf takes neither --pad-for-tp nor --allow-reorder")
    if dst_path.suffix != ".gguf":
        raise AnyquantError(f"{dst_path}: a GGUF output is one file named *.gguf")
    if dst_path.exists() and not options.overwrite:
        raise AnyquantError(f"{dst_path} exists; pass --overwrite to replace it")
    ckpt = open_checkpoint(src_path)
    source = detect_format(ckpt)
    if source is None:
        raise AnyquantError(f"{src_path} is not quantized; `anyquant quantize` writes a first quantized copy")
    config = ckpt.text_config()
    arch = ARCHITECTURES.get(str(config.get("model_type")))
    if arch is None:
        raise UnsupportedError(
            f"--format gguf writes {', '.join(ARCHITECTURES)} models, not {config.get('model_type')!r}"
        )
    model = build_on_meta(config, ckpt.index.names())
    plans = plan_layers(ckpt, source, model, torch.device("cpu"), torch.float32, prefer_kernel="reference")
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads", heads))

    def gguf_rows(name: str, rows: Tensor) -> Tensor:
        """llama.cpp interleaves the rotary halves of Llama's q / k rows (weights and biases)."""
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            return interleave_half_rows(rows, heads if ".q_proj." in name else kv_heads, name)
        return rows

    report = ConvertReport("gguf", scale_dtype="float16")
    # Tensors are spooled to a temporary file as each layer is converted (one layer in memory);
    # nothing reaches DST before every layer converted, and then under a temporary name first.
    writer = gguf.GGUFWriter(None, arch, use_temp_file=True)
    _tokenizer(writer, ckpt, src_path)  # an unsupported tokenizer is refused before any work

    def add(name: str, array: Any, raw: Any = None) -> None:
        if not any(r.how == "refused" for r in report.layers):  # after a refusal only check
            writer.add_tensor(_name(name), np.ascontiguousarray(array), raw_dtype=raw)

    consumed: set[str] = set()
    counts: dict[str, int] = {}
    for plan in plans:
        consumed.update(check_linear(ckpt, source, plan))
        if plan.spec is None:
            continue  # copied with the other float tensors below
        weight = decode_layer(ckpt, source, plan, check_linear(ckpt, source, plan))
        desc = weight.spec.describe()
        fitted = fit_ggml(plan.prefix, weight)
        if isinstance(fitted, str) and plan.kind == "lm_head":
            # As the other targets do: an LM head no type holds (llama-quantize's Q6_K) is written
            # as F32, which holds its dequantized values exactly, rather than refusing the model.
            name = f"{plan.prefix}.weight"
            add(name, gguf_rows(name, dequantize(weight, torch.float32)).numpy())
            report.layers.append(
                LayerOutcome(plan.prefix, desc, "unquantized (float32)", "dequantized", reason=fitted)
            )
            continue
        if isinstance(fitted, str):
            if not options.requantize:
                report.layers.append(LayerOutcome(plan.prefix, desc, "gguf", "refused", reason=fitted))
                continue
            kind = "Q4_0" if weight.spec.bits <= 4 else "Q8_0"
            dense = dequantize(weight, torch.float32)
            new = quantize_rtn(dense, BLOCK_TYPES[kind].spec, torch.float16)
            report.layers.append(
                LayerOutcome(plan.prefix, desc, kind, "requantized", relative_error(dense, new), fitted)
            )
            fitted = (kind, new)
        else:
            report.layers.append(LayerOutcome(plan.prefix, desc, fitted[0], "exact"))
        kind, new = fitted
        counts[kind] = counts.get(kind, 0) + 1
        name = f"{plan.prefix}.weight"
        blocks = gguf_rows(name, block_bytes(kind, new))
        add(name, blocks.numpy(), gguf.GGMLQuantizationType[kind])
    refused = [r for r in report.layers if r.how == "refused"]
    if refused:
        if writer.temp_file is not None:
            writer.temp_file.close()  # the spooled tensors
        raise ConversionRefused("gguf", refused)
    if not counts:
        raise AnyquantError(f"{src_path}: no quantized layer found to convert")
    quantized = {p.prefix for p in plans if p.spec is not None}
    for name in ckpt.index:
        if name in consumed and any(name.startswith(f"{p}.") and name != f"{p}.bias" for p in quantized):
            continue  # a quantized layer's stored tensors (written above), not its bias
        tensor = gguf_rows(name, ckpt.read(name).float())
        add(name, tensor.numpy())

    # Written under a temporary name: an interrupted run never leaves a file that looks finished.
    partial = dst_path.with_name(dst_path.name + ".partial")
    _metadata(writer, gguf, arch, config, src_path, max(counts, key=counts.__getitem__))
    writer.write_header_to_file(path=partial)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.replace(dst_path)
    report.files = [dst_path.name]
    return report


def _name(name: str) -> str:
    mapped = gguf_tensor_name(name)
    if mapped is None:
        raise UnsupportedError(
            f"tensor {name!r} has no llama.cpp name (--format gguf writes dense llama / qwen2)"
        )
    return mapped


def _metadata(writer: Any, gguf: Any, arch: str, config: dict[str, Any], src: Path, kind: str) -> None:
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    writer.add_type("model")
    writer.add_name(src.stem)
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.get("num_key_value_heads", heads)))
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    if head_dim * heads != int(config["hidden_size"]):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch == "llama":
        writer.add_vocab_size(int(config["vocab_size"]))
        writer.add_rope_dimension_count(head_dim)
    writer.add_file_type(int(gguf.LlamaFileType[f"MOSTLY_{kind}"]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _tokenizer(writer: Any, ckpt: Any, src: Path) -> None:
    from anyquant.loading.gguf_checkpoint import GgufCheckpoint

    if isinstance(ckpt, GgufCheckpoint):  # the source's own vocabulary, as it is
        meta = ckpt.gguf.metadata
        _copy_tokenizer(writer, {k: v for k, v in meta.items() if k.startswith("tokenizer.")})
        return
    file = src / "tokenizer.json"
    if not file.is_file():
        raise AnyquantError(f"{file}: missing; a GGUF file carries its tokenizer")
    cfg_file = src / "tokenizer_config.json"
    tok_config = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    vocab = gguf_vocab(json.loads(file.read_text()), tok_config, str(file))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    if vocab.bos_id is not None:
        writer.add_bos_token_id(vocab.bos_id)
    if vocab.eos_id is not None:
        writer.add_eos_token_id(vocab.eos_id)
    writer.add_add_bos_token(vocab.add_bos)
    if vocab.chat_template is not None:
        writer.add_chat_template(vocab.chat_template)


def _copy_tokenizer(writer: Any, fields: dict[str, Any]) -> None:
    for key, value in fields.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
