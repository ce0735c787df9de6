"""How many multiply-adds per nanosecond one core issues with each instruction the CPU kernels choose
between: fp32 FMA (what the AVX2 kernels run after decoding the weights to fp32), 16-bit integer
dot products (`vpmaddwd` + `vpaddd`: the one-row int4 kernel on 16-bit fixed-point x) and 8-bit ones
(`vpmaddubsw` + `vpaddw`: int8 activations, W4A8 / W8A8). A compute-bound kernel (prompts, batches,
attention) can only gain from an integer form where its instruction issues more multiply-adds per
cycle than FMA does on this core; the answer differs by microarchitecture, hence a measurement
instead of a table.

Each loop runs 12 independent accumulator chains (enough to hide any latency up to 12 cycles) for a
fixed number of operations; the C source is compiled with the system compiler (`cc`) into a
temporary directory and run once per repeat. Reported: operations per ns (best of the repeats) and
multiply-adds per ns (8 per fp32 FMA, 16 per `vpmaddwd`, 32 per `vpmaddubsw` on 256-bit vectors).

    python benchmarks/isa_throughput.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = r"""
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

#define OPS 240000000L
#define KEEP(a) __asm__ volatile("" ::"x"(a[0]), "x"(a[1]), "x"(a[2]), "x"(a[3]), "x"(a[4]), "x"(a[5]), \
                                 "x"(a[6]), "x"(a[7]), "x"(a[8]), "x"(a[9]), "x"(a[10]), "x"(a[11]))

int main(void) {
  __m256 f[12];
  const __m256 fb = _mm256_set1_ps(1.0001f), fc = _mm256_set1_ps(0.9999f);
  for (int j = 0; j < 12; ++j) f[j] = _mm256_set1_ps((float)j);
  double t = now();
  for (long i = 0; i < OPS / 12; ++i) {
    for (int j = 0; j < 12; ++j) f[j] = _mm256_fmadd_ps(f[j], fb, fc);
    KEEP(f);
  }
  printf("fma %.4f\n", OPS / (now() - t) * 1e-9);

  /* each madd reads a weight register that changes every iteration, so none is hoisted */
  __m256i acc[12], w[4];
  __m256i x = _mm256_set1_epi16(5);
  const __m256i step = _mm256_set1_epi16(3);
  for (int j = 0; j < 12; ++j) acc[j] = _mm256_set1_epi32(j);
  for (int j = 0; j < 4; ++j) w[j] = _mm256_set1_epi16((short)(j + 1));
  t = now();
  for (long i = 0; i < OPS / 12; ++i) {
    for (int j = 0; j < 12; ++j) acc[j] = _mm256_add_epi32(acc[j], _mm256_madd_epi16(w[j % 4], x));
    x = _mm256_add_epi16(x, step);
    KEEP(acc);
  }
  printf("vpmaddwd %.4f\n", OPS / (now() - t) * 1e-9);

  t = now();
  for (long i = 0; i < OPS / 12; ++i) {
    for (int j = 0; j < 12; ++j) acc[j] = _mm256_add_epi16(acc[j], _mm256_maddubs_epi16(w[j % 4], x));
    x = _mm256_add_epi16(x, step);
    KEEP(acc);
  }
  printf("vpmaddubsw %.4f\n", OPS / (now() - t) * 1e-9);
  return 0;
}
"""

MULTIPLY_ADDS = {"fma": 8, "vpmaddwd": 16, "vpmaddubsw": 32}


def build(directory: Path) -> Path:
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise SystemExit("isa_throughput: no C compiler (cc, gcc or clang) on PATH")
    source = directory / "isa_throughput.c"
    source.write_text(SOURCE)
    binary = directory / "isa_throughput"
    subprocess.run(
        [compiler, "-O2", "-mavx2", "-mfma", "-funroll-loops", str(source), "-o", str(binary)], check=True
    )
    return binary


def measure(binary: Path, repeats: int) -> dict[str, float]:
    best: dict[str, float] = {}
    for _ in range(repeats):
        out = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
        for line in out.splitlines():
            name, rate = line.split()
            best[name] = max(best.get(name, 0.0), float(rate))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rates = measure(build(Path(tmp)), args.repeats)
    print("| instruction (256-bit) | ops / ns | multiply-adds / ns | vs fp32 FMA |")
    print("|---|---:|---:|---:|")
    fma = rates["fma"] * MULTIPLY_ADDS["fma"]
    for name, rate in rates.items():
        macs = rate * MULTIPLY_ADDS[name]
        print(f"| {name} | {rate:.2f} | {macs:.1f} | {macs / fma:.2f}x |")


if __name__ == "__main__":
    main()
