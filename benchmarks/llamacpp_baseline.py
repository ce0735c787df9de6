"""llama.cpp as a CPU serving baseline, on the same weights as our benchmark model.

The benchmark's dense model (out/bench/dense-bf16, written by benchmarks/decode_cpu.py) is a
random-weight Qwen2.5-0.5B-shaped checkpoint without a tokenizer. This module gives it one (the same
two files go into the W4A16 checkpoint our server runs, so both engines tokenize identically),
converts it to GGUF with llama.cpp's own converter, quantizes that with llama-quantize, and builds
the command lines that start llama.cpp's two servers on the result.

llama.cpp is not a dependency of this project: whatever needs it runs as a subprocess from a
throw-away install named by two environment variables:

    ANYQUANT_LLAMACPP_BIN   what `build` writes (default out/llamacpp/bin): the llama-server,
                            llama-bench, llama-batched-bench and llama-quantize binaries, and as
                            `llama.cpp/` the converter of the same source (convert_hf_to_gguf.py,
                            conversion/, gguf-py/), which runs in this project's python
    ANYQUANT_LLAMACPP_VENV  only for `verify` and the `llama-cpp-python` server kind: a venv with
                            CPU torch and `llama-cpp-python[server]` (default out/llamacpp/venv)

The tokenizer is synthetic but complete: byte-level BPE with Qwen2's pre-tokenizer regex and one
token per embedding row (the 256 bytes, every byte pair, then three-letter words), so random token
ids decode to text in both engines; its last three ids are <|endoftext|> (the EOS), <|im_start|>
and <|im_end|>. llama.cpp's converter recognizes a pre-tokenizer by hashing the ids that known
tokenizers give a test string, which a new vocabulary cannot match, so the conversion names the
type instead: "qwen2", the same regex.

    python benchmarks/llamacpp_baseline.py build
    python benchmarks/llamacpp_baseline.py prepare out/bench/dense-bf16 --tokenizer-to out/bench/dense-w4a16 \
        --types Q4_0 --head-type BF16 --base-type BF16
    python benchmarks/llamacpp_baseline.py command out/bench/dense-gguf/dense-Q4_0.gguf --kind llama-server
    python benchmarks/llamacpp_baseline.py verify out/bench/dense-bf16

The two servers differ (llama-cpp-python 0.3.36 and llama.cpp b11312, the commit it vendors):
llama-server batches up to --parallel requests continuously, takes prompts of token ids, honours
"ignore_eos" and streams usage (stream_options.include_usage). llama_cpp.server serves one request
at a time, takes text prompts only (see `text_prompts`), ignores "ignore_eos" (send
`eos_logit_bias`) and streams no usage. Both end a stream with one more chunk than tokens (empty
text, with finish_reason), so counting chunks overcounts by one per request.

The throw-away install. `build` makes every llama.cpp binary the benchmarks use in ONE build and
ships them with the converter into one ANYQUANT_LLAMACPP_BIN (2 cores: ~10-15 minutes):

    python benchmarks/llamacpp_baseline.py build [--sdist llama_cpp_python-0.3.36.tar.gz] [--jobs 2]

It downloads llama-cpp-python 0.3.36's sdist (`pip download`, unless given), configures its
vendored llama.cpp (b11312, commit 0c1e57098) statically linked, with the server, without AMX
(below), builds llama-server, llama-bench, llama-batched-bench and llama-quantize, and copies them
plus the converter (convert_hf_to_gguf.py, conversion/, gguf-py/) into out/llamacpp/bin
(`--out`). The converter runs in this project's python (torch, transformers, numpy and the
shipped gguf-py). llama-cpp-python itself (for `verify` and the `llama-cpp-python` server kind)
is a separate venv (ANYQUANT_LLAMACPP_VENV):

    python3 -m venv $VENV && $VENV/bin/pip install torch==2.13.0   # resolves to the +cpu wheel here
    NOAMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS="-DCMAKE_C_FLAGS='$NOAMX' -DCMAKE_CXX_FLAGS='$NOAMX'" \
        $VENV/bin/pip install './llama_cpp_python-0.3.36.tar.gz[server]'
    $VENV/bin/pip install transformers==4.57.6 sentencepiece 'protobuf<5' $SRC/gguf-py

Without -mno-amx-*, -march=native on a CPU with AMX compiles ggml's AMX kernels, which GCC 12
miscompiles here (the tile configuration on the stack is optimized away; ldtilecfg faults:
SIGSEGV in ggml_backend_amx_mul_mat on any Q4_0/Q4_K prompt).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

DEFAULT_VENV = Path("out/llamacpp/venv")  # throw-away installs live in the ignored out/
DEFAULT_BIN = Path("out/llamacpp/bin")
KINDS = ("llama-server", "llama-cpp-python")
BASE_TYPE = "F16"  # the unquantized GGUF: bf16 weights fit f16 exactly (up to f16 subnormals)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Qwen2's pre-tokenizer split; llama.cpp's "qwen2" pre-tokenizer type is the same expression.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Run by this project's python: llama.cpp's converter with the gguf-py shipped next to it, told the
# pre-tokenizer type and that there is no sentencepiece model (the vocabulary is BPE).
_CONVERT = """
import sys
source, model_dir, outfile, outtype = sys.argv[1:5]
sys.path[:0] = [source, source + "/gguf-py"]
import conversion
def no_sentencepiece(self):
    raise FileNotFoundError("tokenizer.model")
conversion.TextModel._set_vocab_sentencepiece = no_sentencepiece
conversion.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
import convert_hf_to_gguf
sys.argv = ["convert_hf_to_gguf.py", model_dir, "--outfile", outfile, "--outtype", outtype]
convert_hf_to_gguf.main()
"""

# Run by the throw-away venv's python: llama.cpp's logits for every position of each prompt.
_LOGITS = """
import json, sys
import numpy as np
from llama_cpp import Llama
gguf, prompts, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
llm = Llama(gguf, n_ctx=max(map(len, prompts)) + 8, n_threads=2, logits_all=True, verbose=False)
rows = []
for prompt in prompts:
    llm.reset()
    llm.eval(prompt)
    rows.append(np.array(llm.scores[: len(prompt)], dtype=np.float32))
np.save(out, np.concatenate(rows))
"""


def venv_dir() -> Path:
    return Path(os.environ.get("ANYQUANT_LLAMACPP_VENV", DEFAULT_VENV))


def bin_dir() -> Path:
    return Path(os.environ.get("ANYQUANT_LLAMACPP_BIN", DEFAULT_BIN))


def _python() -> Path:
    return venv_dir() / "bin" / "python"


def available() -> str | None:
    """None when llama.cpp's tools and converter can be used here, else why not."""
    needs = {tool: bin_dir() / tool for tool in TOOLS}
    needs["convert_hf_to_gguf.py"] = bin_dir() / "llama.cpp" / "convert_hf_to_gguf.py"
    missing = [f"{what} ({path})" for what, path in needs.items() if not path.exists()]
    if missing:
        return (
            "llama.cpp is not installed (python benchmarks/llamacpp_baseline.py build): missing "
            + ", ".join(missing)
        )
    return None


def venv_available() -> str | None:
    """None when the llama-cpp-python venv (`verify`, the llama-cpp-python server) works, else why not."""
    if not _python().exists():
        return f"no llama-cpp-python venv at {venv_dir()} (ANYQUANT_LLAMACPP_VENV)"
    probe = subprocess.run(
        [str(_python()), "-c", "import llama_cpp, llama_cpp.server"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return f"{venv_dir()}: cannot import llama-cpp-python's server: {last}"
    return None


# -- build ---------------------------------------------------------------------------------------
SDIST = "llama-cpp-python==0.3.36"  # vendors llama.cpp b11312 (commit 0c1e57098)
BUILD_NUMBER, BUILD_COMMIT = "11312", "0c1e57098"
TOOLS = ("llama-server", "llama-bench", "llama-batched-bench", "llama-quantize")
CONVERTER = ("convert_hf_to_gguf.py", "conversion", "gguf-py", "LICENSE")
NOAMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"  # see the module docstring


def cmake_configure(source: Path, build: Path) -> list[str]:
    """One static Release build with the server and tools, no AMX, nothing fetched at build time."""
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    return [
        "cmake", "-S", str(source), "-B", str(build), *generator, "-DCMAKE_BUILD_TYPE=Release",
        f"-DCMAKE_C_FLAGS={NOAMX}", f"-DCMAKE_CXX_FLAGS={NOAMX}", "-DBUILD_SHARED_LIBS=OFF",
        "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_UI=OFF",
        "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
        f"-DLLAMA_BUILD_NUMBER={BUILD_NUMBER}", f"-DLLAMA_BUILD_COMMIT={BUILD_COMMIT}",
    ]  # fmt: skip


def build(out: Path, sdist: Path | None = None, jobs: int = 2) -> Path:
    """Build TOOLS from the sdist's vendored llama.cpp and ship them and the converter to out/bin."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if sdist is None:
        sdist = out / "llama_cpp_python-0.3.36.tar.gz"
        if not sdist.exists():
            pip = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps"]
            _run([*pip, SDIST, "-d", str(out)])
    unpacked = out / Path(sdist).name.removesuffix(".tar.gz")
    if not (unpacked / "vendor" / "llama.cpp" / "CMakeLists.txt").exists():
        import tarfile

        with tarfile.open(sdist) as tar:
            tar.extractall(out, filter="data")
    source = unpacked / "vendor" / "llama.cpp"
    build_dir = out / "build"
    _run(cmake_configure(source, build_dir))
    # nice: the build shares the cores with whatever else runs; a benchmark should not.
    _run(["nice", "-n", "10", "cmake", "--build", str(build_dir), "-j", str(jobs), "--target", *TOOLS])
    target = out / "bin"
    (target / "llama.cpp").mkdir(parents=True, exist_ok=True)
    for tool in TOOLS:
        shutil.copy2(build_dir / "bin" / tool, target / tool)
    for item in CONVERTER:
        src, dst = source / item, target / "llama.cpp" / item
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        else:
            shutil.copy2(src, dst)
    for tool in TOOLS:  # a static build runs from anywhere: start each shipped copy once
        done = subprocess.run([str(target / tool), "--help"], capture_output=True, text=True)
        if "usage" not in (done.stdout + done.stderr).lower():
            raise RuntimeError(f"{target / tool} does not start:\n{done.stderr[-2000:]}")
    return target


# -- tokenizer -------------------------------------------------------------------------------------
def _byte_chars() -> list[str]:
    """The character ByteLevel pre-tokenization writes for each byte value (GPT-2's table)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, shifted = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + shifted))
            shifted += 1
    return chars


def tokenizer_json(vocab_size: int) -> str:
    """A tokenizer.json with exactly `vocab_size` ids; the same text on every call."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    chars = _byte_chars()
    vocab = {ch: i for i, ch in enumerate(chars)}
    merges: list[tuple[str, str]] = []
    n_normal = vocab_size - len(SPECIAL_TOKENS)

    def merge(left: str, right: str) -> None:
        if len(vocab) < n_normal:
            vocab[left + right] = len(vocab)
            merges.append((left, right))

    space = chars[ord(" ")]
    letters = [c for c in chars if c.isascii() and c.isalpha()]
    order = [space, *letters] + [c for c in chars if c != space and c not in letters]
    for left in order:  # every byte pair, space and letters first
        for right in order:
            merge(left, right)
    for first in [space, *letters]:  # then words of three: a space or a letter, then two letters
        for second in letters:
            for third in letters:
                merge(first + second, third)
    if len(vocab) != n_normal:
        raise ValueError(f"vocab_size {vocab_size}: the generator fills at most {len(vocab) + 3} ids")

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    # no NFC normalizer (Qwen2 has one): llama.cpp does not normalize, and this tokenizer must agree
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    if tok.get_vocab_size(with_added_tokens=True) != vocab_size:
        raise AssertionError("tokenizer size mismatch")
    return str(tok.to_str(pretty=True))


def tokenizer_config_json(vocab_size: int) -> str:
    first = vocab_size - len(SPECIAL_TOKENS)
    special = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(first + i): {"content": text, **special} for i, text in enumerate(SPECIAL_TOKENS)
        },
        "bos_token": None,
        "eos_token": SPECIAL_TOKENS[0],
        "pad_token": SPECIAL_TOKENS[0],
        "unk_token": None,
        "chat_template": CHATML,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 32768,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    return json.dumps(config, indent=2) + "\n"


def ensure_tokenizer(model_dirs: Iterable[Path], vocab_size: int) -> None:
    """Write tokenizer.json + tokenizer_config.json where missing; refuse to replace different ones."""
    files = {
        "tokenizer.json": tokenizer_json(vocab_size),
        "tokenizer_config.json": tokenizer_config_json(vocab_size),
    }
    for model_dir in model_dirs:
        for name, text in files.items():
            path = Path(model_dir) / name
            if not path.exists():
                path.write_text(text)
            elif path.read_text() != text:
                raise RuntimeError(f"{path} exists and is not this module's tokenizer; remove it first")


# -- GGUF ------------------------------------------------------------------------------------------
def gguf_path(
    bf16_dir: Path, quant_type: str = "Q4_0", head_type: str | None = None, base_type: str = BASE_TYPE
) -> Path:
    """Where ensure_gguf writes: <parent>/<name>-gguf/<name>-<TYPE>[-head<TYPE>][-from<BASE>].gguf."""
    name = bf16_dir.name.removesuffix("-bf16")
    suffix = f"-head{head_type.upper()}" if head_type else ""
    if quant_type.upper() != base_type.upper() and base_type.upper() != BASE_TYPE:
        suffix += f"-from{base_type.upper()}"
    return bf16_dir.parent / f"{name}-gguf" / f"{name}-{quant_type.upper()}{suffix}.gguf"


def ensure_gguf(
    bf16_dir: Path,
    quant_type: str = "Q4_0",
    *,
    tokenizer_to: Iterable[Path] = (),
    head_type: str | None = None,
    base_type: str = BASE_TYPE,
    threads: int = 2,
) -> Path:
    """The GGUF of a transformers checkpoint (F16, BF16 or any llama-quantize type), built if missing.

    Copies config.json next to a symlink of the weights into <bf16_dir>-gguf-src with the tokenizer,
    and writes the same tokenizer into each `tokenizer_to` directory (the quantized checkpoints our
    engine serves). llama.cpp's converter writes the `base_type` GGUF (F16, or BF16: the bf16
    checkpoint's exact values), which llama-quantize quantizes to `quant_type`. `head_type` (e.g.
    "BF16", "F16", "Q8_0") sets both the token embedding and the output (LM head) tensor's type,
    which llama-quantize otherwise picks itself (Q4_0: Q6_K or Q8_0); for a tied model they are
    one tensor. "BF16" keeps the head as the checkpoint stores it, as a compressed-tensors W4A16
    checkpoint does (its `ignore: [lm_head]`).
    """
    bf16_dir = Path(bf16_dir)
    target = gguf_path(bf16_dir, quant_type, head_type, base_type)
    vocab_size = int(json.loads((bf16_dir / "config.json").read_text())["vocab_size"])
    ensure_tokenizer(tokenizer_to, vocab_size)
    if target.exists():
        return target
    reason = available()
    if reason:
        raise RuntimeError(reason)
    source = bf16_dir.parent / f"{bf16_dir.name}-gguf-src"
    source.mkdir(exist_ok=True)
    for item in bf16_dir.iterdir():
        link = source / item.name
        if item.suffix == ".safetensors" and not link.exists():
            link.symlink_to(item.resolve())
        elif item.name in ("config.json", "generation_config.json", "model.safetensors.index.json"):
            shutil.copyfile(item, link)
    ensure_tokenizer([source], vocab_size)

    target.parent.mkdir(exist_ok=True)
    base = gguf_path(bf16_dir, base_type, base_type=base_type)
    if not base.exists():
        partial = base.with_suffix(".partial")
        paths = [str(bin_dir() / "llama.cpp"), str(source), str(partial)]
        _run([sys.executable, "-c", _CONVERT, *paths, base_type.lower()])
        partial.rename(base)
    if target != base:
        partial = target.with_suffix(".partial")
        head = ["--token-embedding-type", head_type, "--output-tensor-type", head_type] if head_type else []
        paths = [str(base), str(partial)]
        _run([str(bin_dir() / "llama-quantize"), *head, *paths, quant_type.upper(), str(threads)])
        partial.rename(target)
    return target


def gguf_bytes_per_token(path: Path, active_experts: float = 1.0) -> dict[str, float]:
    """Bytes one batch-1 decode step reads from a GGUF file, by part: "head" (the output tensor,
    or the tied token embedding read in full as the LM head), "embedding row" (one row of an untied
    token embedding), "experts" (`active_experts`, the top-k / E fraction, of every stacked
    blk.N.ffn_*_exps tensor) and "rest" (every other tensor, in full). KV reads are left out."""
    from gguf import GGUFReader

    tensors = {t.name: t for t in GGUFReader(str(path)).tensors}
    parts = {"head": 0.0, "embedding row": 0.0, "experts": 0.0, "rest": 0.0}
    for name, t in tensors.items():
        n = float(t.n_bytes)
        if name == "output.weight" or (name == "token_embd.weight" and "output.weight" not in tensors):
            parts["head"] += n
        elif name == "token_embd.weight":
            parts["embedding row"] += n / int(t.shape[-1])  # GGUF shapes are reversed: rows last
        elif "_exps." in name:
            parts["experts"] += n * active_experts
        else:
            parts["rest"] += n
    return parts


def _run(cmd: list[str]) -> None:
    print("+", shlex.join(cmd) if len(" ".join(cmd)) < 300 else f"{cmd[0]} ...", file=sys.stderr)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} failed ({done.returncode}):\n{done.stderr[-3000:]}")


# -- servers ---------------------------------------------------------------------------------------
def server_command(
    gguf: Path, port: int, threads: int, parallel: int, ctx_per_slot: int, kind: str
) -> list[str]:
    """The command starting an OpenAI-compatible server for `gguf` on 127.0.0.1:`port`.

    llama-server: `parallel` slots of `ctx_per_slot` tokens each (-c is the total; llama.cpp rounds
    a slot up to at least 256), continuously batched. A request whose prompt + max_tokens overflows
    its slot stops early (finish_reason "length", fewer tokens); a longer prompt is answered 400.
    llama-cpp-python runs one request at a time (`parallel` only sizes its context the same way).
    Both serve the model under its file name without the .gguf suffix.
    """
    gguf = Path(gguf).resolve()
    alias = gguf.stem
    ctx = parallel * ctx_per_slot
    if kind == "llama-server":
        return [
            str(bin_dir() / "llama-server"),
            "--model", str(gguf), "--alias", alias,
            "--host", "127.0.0.1", "--port", str(port),
            "--threads", str(threads), "--threads-batch", str(threads),
            "--parallel", str(parallel), "--ctx-size", str(ctx),
            "--cont-batching", "--no-ui",
        ]  # fmt: skip
    if kind == "llama-cpp-python":
        return [
            str(_python()), "-m", "llama_cpp.server",
            "--model", str(gguf), "--model_alias", alias,
            "--host", "127.0.0.1", "--port", str(port),
            "--n_threads", str(threads), "--n_threads_batch", str(threads),
            "--n_ctx", str(ctx),
            # its defaults compute logits for every prompt token and cut a stream short
            # whenever another request arrives
            "--logits_all", "false", "--interrupt_requests", "false",
        ]  # fmt: skip
    raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")


def text_prompts(num: int, length: int, seed: int = 0) -> list[str]:
    """`num` prompts of exactly `length` tokens in both engines, for servers that take no token ids.

    Each word is a space and two ASCII letters, one token of this tokenizer (see `tokenizer_json`).
    """
    import random
    import string

    rng = random.Random(seed)
    letters = string.ascii_letters
    return [
        "".join(" " + rng.choice(letters) + rng.choice(letters) for _ in range(length)) for _ in range(num)
    ]


def eos_logit_bias(vocab_size: int) -> dict[str, float]:
    """A /v1/completions logit_bias that keeps every generation going to max_tokens."""
    return {str(vocab_size - len(SPECIAL_TOKENS) + i): -100.0 for i in range(len(SPECIAL_TOKENS))}


# -- same model? -----------------------------------------------------------------------------------
def compare_logits(bf16_dir: Path, gguf: Path, prompts: list[list[int]]) -> dict[str, Any]:
    """llama.cpp's logits (the throw-away venv's llama-cpp-python) vs transformers' in fp32."""
    import numpy as np
    import torch
    import transformers

    reason = venv_available()
    if reason:
        raise RuntimeError(reason)
    model = transformers.AutoModelForCausalLM.from_pretrained(bf16_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        ref = torch.cat([model(torch.tensor([p])).logits[0] for p in prompts]).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "logits.npy"
        _run([str(_python()), "-c", _LOGITS, str(gguf), json.dumps(prompts), str(out)])
        got = np.load(out)
    rel = np.linalg.norm(got - ref, axis=-1) / np.linalg.norm(ref, axis=-1)
    return {
        "gguf": gguf.name,
        "positions": len(rel),
        "rel_l2_max": float(rel.max()),
        "rel_l2_mean": float(rel.mean()),
        "argmax_agree": float((got.argmax(-1) == ref.argmax(-1)).mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    prep = sub.add_parser("prepare", help="tokenizer + GGUF files for a transformers checkpoint")
    prep.add_argument("bf16_dir", type=Path)
    prep.add_argument("--types", nargs="+", default=["Q4_0"], help="llama-quantize types (and F16)")
    prep.add_argument("--head-type", default=None, help="LM head / embedding type, e.g. BF16, F16, Q8_0")
    prep.add_argument(
        "--base-type", default=BASE_TYPE, choices=["F16", "BF16"], help="the converter's output"
    )
    prep.add_argument("--tokenizer-to", nargs="*", type=Path, default=[], help="also give these dirs it")
    cmd = sub.add_parser("command", help="print the command that starts a server")
    cmd.add_argument("gguf", type=Path)
    cmd.add_argument("--kind", choices=KINDS, default="llama-server")
    cmd.add_argument("--port", type=int, default=8090)
    cmd.add_argument("--threads", type=int, default=2)
    cmd.add_argument("--parallel", type=int, default=32)
    cmd.add_argument("--ctx-per-slot", type=int, default=256)
    bld = sub.add_parser("build", help="build llama.cpp's server and tools + ship the converter")
    bld.add_argument("--out", type=Path, default=DEFAULT_BIN.parent, help="bin/ is written here")
    bld.add_argument("--sdist", type=Path, default=None, help="llama-cpp-python 0.3.36's sdist")
    bld.add_argument("--jobs", type=int, default=2)
    ver = sub.add_parser("verify", help="compare GGUF logits with transformers (run in the project venv)")
    ver.add_argument("bf16_dir", type=Path)
    ver.add_argument("ggufs", nargs="*", type=Path, help="default: the F16 and Q4_0 GGUFs of bf16_dir")
    args = parser.parse_args()

    if args.cmd == "prepare":
        for quant_type in args.types:
            path = ensure_gguf(
                args.bf16_dir,
                quant_type,
                tokenizer_to=args.tokenizer_to,
                head_type=args.head_type,
                base_type=args.base_type,
            )
            print(path)
    elif args.cmd == "build":
        print(build(args.out, args.sdist, args.jobs))
    elif args.cmd == "command":
        print(
            shlex.join(
                server_command(
                    args.gguf, args.port, args.threads, args.parallel, args.ctx_per_slot, args.kind
                )
            )
        )
    else:
        import random

        rng = random.Random(0)
        vocab = int(json.loads((args.bf16_dir / "config.json").read_text())["vocab_size"])
        prompts = [[rng.randrange(vocab - len(SPECIAL_TOKENS)) for _ in range(n)] for n in (1, 7, 32)]
        ggufs = args.ggufs or [ensure_gguf(args.bf16_dir, t) for t in (BASE_TYPE, "Q4_0")]
        for gguf in ggufs:
            print(json.dumps(compare_logits(args.bf16_dir, gguf, prompts)))


if __name__ == "__main__":
    main()
