"""The CPU FP8 matmul: y = x @ W^T with W in DeepSeek's FP8 block layout, read once, never dequantized to memory.

Why a kernel of our own: PyTorch has no CPU matmul that takes float8 weights, and turning them back into bf16 or
float32 first costs far more than the product itself (the CPU float8 cast is scalar: ~5-15 ns per element against
<1 ns to multiply-add it). This kernel converts 16 weights at a time in registers and multiplies them straight away:
an e4m3 byte becomes an fp16 by moving its 7 magnitude bits into place (the value times 2^-8, subnormals included,
exactly), F16C widens it to float32, and the 2^8 is folded into the block's scale. Each weight row is read once for
all M rows of x (decode batches), so a step reads each active weight once.

It is plain C with AVX2/FMA/F16C intrinsics and OpenMP, compiled on first use with the system C compiler into
~/.cache/dsv2/kernels (DSV2_KERNEL_CACHE overrides) and called through ctypes (which releases the GIL). Where it
cannot run (no compiler, a CPU without AVX2/F16C, DSV2_FP8_KERNEL=0) `available()` is False and dsv2.model.fp8 falls
back to dequantize-then-matmul, with the same results to float32 rounding.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

_SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>

/* 16 e4m3 bytes -> 16 fp16 holding value * 2^-8: sign-extend to 16 bits, shift the 7 magnitude bits into fp16's
   exponent and mantissa; the sign lands in bit 15, the sign extension also sets bit 14, which the mask clears. */
static inline __m256i fp8x16_to_half(const uint8_t* p) {
    __m256i v = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)p));
    return _mm256_and_si256(_mm256_slli_epi16(v, 7), _mm256_set1_epi16((short)0xBF80));
}
static inline float fp8_to_float_scaled(uint8_t b) {  /* value * 2^-8 */
    return _cvtsh_ss((unsigned short)(((b & 0x7f) << 7) | ((b & 0x80) << 8)));
}
static inline float hsum(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

#define MB 4  /* rows of x per pass over a weight row (the row stays in L1 between passes) */

/* y[m, n] (row stride ldy) = sum_k x[m, k] * W[n, k], W[n, k] = e4m3(q[n * ldq + k]) * s[(n / B) * C + k / B],
   C = ceil(K / B); x float32 [M, K] contiguous, s float32.
   Independent accumulators hide the multiply-add latency: at M = 1 (decode) four chains; with one,
   each 16 weights waited for two dependent FMAs (1.5x slower). Above M = 1 the MB rows are the independent chains. */
void dsv2_fp8_linear(const float* x, int64_t M, int64_t K, const uint8_t* q, int64_t ldq, const float* s,
                     int64_t N, int64_t B, float* y, int64_t ldy, int nthreads) {
    const int64_t C = (K + B - 1) / B;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t* row = q + n * ldq;
        const float* srow = s + (n / B) * C;
        if (M == 1) {
            __m256 tot = _mm256_setzero_ps();
            float tail = 0.f;
            for (int64_t c = 0; c < C; c++) {
                const int64_t k0 = c * B, k1 = k0 + B < K ? k0 + B : K;
                const float scale = srow[c] * 256.0f;
                __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
                __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
                int64_t k = k0;
                for (; k + 32 <= k1; k += 32) {
                    __m256i h0 = fp8x16_to_half(row + k), h1 = fp8x16_to_half(row + k + 16);
                    a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm256_castsi256_si128(h0)), _mm256_loadu_ps(x + k), a0);
                    a1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm256_extracti128_si256(h0, 1)), _mm256_loadu_ps(x + k + 8), a1);
                    a2 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm256_castsi256_si128(h1)), _mm256_loadu_ps(x + k + 16), a2);
                    a3 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm256_extracti128_si256(h1, 1)), _mm256_loadu_ps(x + k + 24), a3);
                }
                for (; k + 16 <= k1; k += 16) {
                    __m256i h = fp8x16_to_half(row + k);
                    a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm256_castsi256_si128(h)), _mm256_loadu_ps(x + k), a0);
                    a1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm256_extracti128_si256(h, 1)), _mm256_loadu_ps(x + k + 8), a1);
                }
                const __m256 acc = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
                tot = _mm256_fmadd_ps(acc, _mm256_set1_ps(scale), tot);
                for (; k < k1; k++) tail += fp8_to_float_scaled(row[k]) * scale * x[k];
            }
            y[n] = hsum(tot) + tail;
            continue;
        }
        for (int64_t m0 = 0; m0 < M; m0 += MB) {
            const int64_t mb = M - m0 < MB ? M - m0 : MB;
            __m256 tot[MB];
            float tail[MB];
            for (int j = 0; j < MB; j++) { tot[j] = _mm256_setzero_ps(); tail[j] = 0.f; }
            for (int64_t c = 0; c < C; c++) {
                const int64_t k0 = c * B, k1 = k0 + B < K ? k0 + B : K;
                const float scale = srow[c] * 256.0f;
                __m256 acc[MB];
                for (int j = 0; j < MB; j++) acc[j] = _mm256_setzero_ps();
                int64_t k = k0;
                for (; k + 16 <= k1; k += 16) {
                    __m256i h = fp8x16_to_half(row + k);
                    __m256 w0 = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
                    __m256 w1 = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
                    for (int j = 0; j < mb; j++) {
                        const float* xr = x + (m0 + j) * K + k;
                        acc[j] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), acc[j]);
                        acc[j] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + 8), acc[j]);
                    }
                }
                const __m256 sc = _mm256_set1_ps(scale);
                for (int j = 0; j < mb; j++) tot[j] = _mm256_fmadd_ps(acc[j], sc, tot[j]);
                for (; k < k1; k++) {
                    const float w = fp8_to_float_scaled(row[k]) * scale;
                    for (int j = 0; j < mb; j++) tail[j] += w * x[(m0 + j) * K + k];
                }
            }
            for (int j = 0; j < mb; j++) y[(m0 + j) * ldy + n] = hsum(tot[j]) + tail[j];
        }
    }
}
"""

_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC"]
_lib: ctypes.CDLL | None | bool = None  # None: not tried yet; False: unavailable


def _cpu_ok() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return all(f" {f}" in flags for f in ("avx2", "fma", "f16c"))


def _build() -> ctypes.CDLL | bool:
    if os.environ.get("DSV2_FP8_KERNEL", "1") == "0" or not _cpu_ok():
        return False
    cache = Path(os.environ.get("DSV2_KERNEL_CACHE") or Path.home() / ".cache" / "dsv2" / "kernels")
    tag = hashlib.sha256((_SOURCE + " ".join(_FLAGS)).encode()).hexdigest()[:16]
    so = cache / f"fp8_linear-{tag}.so"
    try:
        if not so.exists():
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                src = Path(tmp) / "fp8_linear.c"
                src.write_text(_SOURCE)
                cc = os.environ.get("CC", "cc")
                subprocess.run([cc, *_FLAGS, str(src), "-o", str(Path(tmp) / "k.so")], check=True,
                               capture_output=True, timeout=120)
                os.replace(Path(tmp) / "k.so", so)  # atomic: concurrent builders never load a partial file
        lib = ctypes.CDLL(str(so))
    except (OSError, subprocess.SubprocessError) as e:
        warnings.warn(f"dsv2: FP8 CPU kernel unavailable ({e}); FP8 weights are dequantized per call instead")
        return False
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.dsv2_fp8_linear.argtypes = [ptr, i64, i64, ptr, i64, ptr, i64, i64, ptr, i64, ctypes.c_int]
    lib.dsv2_fp8_linear.restype = None
    return lib


def available() -> bool:
    """True where the kernel runs (built on first call)."""
    global _lib
    if _lib is None:
        _lib = _build()
    return _lib is not False


def fp8_linear_into(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, block: int,
                    out: torch.Tensor) -> torch.Tensor:
    """out [M, N] (float32, unit column stride; may be a column slice of a wider buffer) = x [M, K] @ W^T with W
    [N, K] float8_e4m3fn (unit column stride) and scale_inv float32 [ceil(N/block), ceil(K/block)] contiguous."""
    if not available():
        raise RuntimeError("the FP8 CPU kernel is not available here (see dsv2.model.fp8_cpu.available)")
    M, K = x.shape
    N = weight.shape[0]
    if weight.shape[1] != K or tuple(out.shape) != (M, N) or out.dtype != torch.float32:
        raise ValueError(f"fp8_linear: x {tuple(x.shape)}, weight {tuple(weight.shape)}, out {tuple(out.shape)}")
    if weight.stride(1) != 1 or out.stride(1) != 1 or not scale_inv.is_contiguous():
        raise ValueError("fp8_linear: weight and out need unit column stride, scale_inv contiguity")
    xf = x.float().contiguous()
    _lib.dsv2_fp8_linear(xf.data_ptr(), M, K, weight.data_ptr(), weight.stride(0), scale_inv.data_ptr(), N, block,
                         out.data_ptr(), out.stride(0), torch.get_num_threads())
    return out
