// cunorm-module: per-dtype
// rows.cu: LayerNorm and RMSNorm over contiguous rows of `cols` elements.
#include "common.cuh"

// The f32 parameters (weight or bias) of columns j0 .. j0 + PN − 1, of which the first `n` exist:
// 16-byte loads when all PN exist and the address is 16-byte aligned, else one at a time (0 past
// the n-th); `dflt` everywhere when there is no parameter.
template <int PN>
__device__ __forceinline__ void load_params(float (&dst)[PN], const float* __restrict__ par, int j0,
                                            int n, float dflt) {
    if (!par) {
#pragma unroll
        for (int i = 0; i < PN; ++i) dst[i] = dflt;
    } else if (n >= PN && aligned16(par + j0)) {
#pragma unroll
        for (int q = 0; q < PN / 4; ++q) {
            const Pack<float> v = reinterpret_cast<const Pack<float>*>(par + j0)[q];
#pragma unroll
            for (int i = 0; i < 4; ++i) dst[4 * q + i] = v.v[i];
        }
    } else {
#pragma unroll
        for (int i = 0; i < PN; ++i) dst[i] = i < n ? par[j0 + i] : 0.f;
    }
}

// u = dy·w of one element (dy without a weight), rounded on its own (__fmul_rn): a fused
// multiply-add would leave the product's rounding error in u − Σu/n, which a row of one element
// turns into a nonzero dx. Every backward computes u here, so the row sums and dx agree.
__device__ __forceinline__ float row_u(float g, const float* w, float wv) {
    return w ? __fmul_rn(g, wv) : g;
}

// dx of one element of a row: rstd·(u − m1 − x̂·m2), m1 = Σu/n (0 for RMSNorm), m2 = Σu·x̂/n.
__device__ __forceinline__ float row_dx(float g, float xh, const float* w, float wv, float rs,
                                        float m1, float m2) {
    return rs * (row_u(g, w, wv) - m1 - xh * m2);
}

// y of pack p of a row (16 bytes of x in `in`): (x − mean)·rstd, then times the weight and plus
// the bias of its columns (seg == 1: 16-byte parameter loads) or of its segment (one parameter
// for the pack: a pack never straddles two segments); the parameters start at p0.
template <typename T>
__device__ __forceinline__ Pack<T> row_affine_pack(const Pack<T>& in, int p, int p0, int seg,
                                                   const float* __restrict__ w,
                                                   const float* __restrict__ b, float mean,
                                                   float rstd) {
    const int PN = Pack<T>::N;
    Pack<T> out;
    float wv[PN], bv[PN];
    if (seg == 1) {
        load_params<PN>(wv, w, p0 + p * PN, PN, 1.f);
        load_params<PN>(bv, b, p0 + p * PN, PN, 0.f);
    } else {
        const int q = p0 + p * PN / seg;
        const float wq = w ? w[q] : 1.f, bq = b ? b[q] : 0.f;
#pragma unroll
        for (int i = 0; i < PN; ++i) {
            wv[i] = wq;
            bv[i] = bq;
        }
    }
#pragma unroll
    for (int i = 0; i < PN; ++i) {
        float o = (to_float(in.v[i]) - mean) * rstd;
        if (w) o *= wv[i];
        if (b) o += bv[i];
        out.v[i] = from_float<T>(o);
    }
    return out;
}

// Forward. One block per row, grid-stride over rows; threads map to 16-byte packs (scalar
// path when the row is misaligned or cols is not a multiple of the pack). Statistics are f32,
// merged in a fixed tree: two passes over the cached row (LayerNorm/GroupNorm with `cache`),
// one Welford pass (without), or a sum of squares (RMSNorm). With `cache` the row stays in
// shared memory (in its own type) between the passes: x is read from DRAM once.
// The affine parameter of element j of row r is w[(r % cycle)·(cols/seg) + j/seg]: LayerNorm
// uses seg = cycle = 1 (elementwise); GroupNorm/InstanceNorm on contiguous input treat each
// (n, group) as a row of C/G·S values with seg = S (per channel) and cycle = G. `varu`, when
// given, receives the unbiased variance (running statistics). With `nan_inf_mean` (LayerNorm,
// GroupNorm) the saved mean of a row holding an infinity is NaN, as PyTorch's Welford merges make
// it; without (InstanceNorm) it stays ±inf, as PyTorch's sums make it.
// Bytes: rows·cols·sizeof(T) read + the same written + 8 bytes of statistics per row.
//
// KR > 0 is the wide forward, for rows longer than shared memory holds: each thread keeps its
// first KR packs of the row (packs t, t + blockDim.x, ..., t + (KR−1)·blockDim.x) in registers
// and the rest of the row, packs from KR·blockDim.x on, in shared memory, so x is still read
// once for rows of up to KR·blockDim.x·16 bytes more than shared memory (a 1024-thread block
// with KR = 4: 64 KiB beyond the 227 KiB of an H100). A row that is misaligned or not whole
// packs takes the uncached path (the host sized shared memory for the packed layout only).
template <typename T, bool CENTER, int KR = 0>
__device__ __forceinline__ void rows_fwd(const T* __restrict__ x, T* __restrict__ y,
                                         const float* __restrict__ w, const float* __restrict__ b,
                                         float* __restrict__ mean_out, float* __restrict__ rstd_out,
                                         float* __restrict__ varu_out, i64 rows, int cols, int seg,
                                         int cycle, float eps, int cache, int nan_inf_mean) {
    // The row as T (exact: every T converts to f32 without loss), so a 2-byte type caches rows
    // twice as long as f32 storage would allow.
    extern __shared__ __align__(16) unsigned char row_cache_bytes[];
    T* row_cache = reinterpret_cast<T*>(row_cache_bytes);
    __shared__ Welford scratch[32];
    const int PN = Pack<T>::N;
    const FastDiv dcycle = fast_div(cycle);
    for (i64 row = blockIdx.x; row < rows; row += gridDim.x) {
        const T* xr = x + row * (i64)cols;
        T* yr = y + row * (i64)cols;
        // A pack never straddles two affine segments: seg % PN == 0 (or seg == 1).
        const bool vec = aligned16(xr) && aligned16(yr) && (cols % PN == 0) && (seg == 1 || seg % PN == 0);
        // The wide forward caches packed rows only (KR > 0: shared memory holds packs past RB).
        const bool cached = cache && (KR == 0 || vec);
        const int P = cols / PN, RB = KR * (int)blockDim.x;
        Pack<T> held[KR > 0 ? KR : 1];
        i64 in_cycle;
        div_of(row, dcycle, &in_cycle);
        const int p0 = (int)in_cycle * (cols / seg);
        // With the row cached, LayerNorm/GroupNorm statistics take two passes (Σx, then
        // Σ(x − mean)² over the thread's own cached values): no division per element. Without,
        // one Welford pass over DRAM.
        const bool two_pass = CENTER && cached;
        Welford acc = welford_empty();
        float ss = 0.f;
        auto stat_add = [&](const Pack<T>& pk) {
#pragma unroll
            for (int i = 0; i < PN; ++i) {
                float v = to_float(pk.v[i]);
                if (two_pass) ss += v;
                else if (CENTER) welford_add(acc, v);
                else ss += v * v;
            }
        };
        if (vec) {
            const Pack<T>* xp = reinterpret_cast<const Pack<T>*>(xr);
            // The register-held packs first, all loads issued before any is used.
#pragma unroll
            for (int k = 0; k < KR; ++k) {
                const int p = threadIdx.x + k * blockDim.x;
                if (p < P) held[k] = xp[p];
            }
            for (int p = RB + threadIdx.x; p < P; p += blockDim.x) {
                Pack<T> pk = xp[p];
                if (cached) reinterpret_cast<Pack<T>*>(row_cache)[p - RB] = pk;
                stat_add(pk);
            }
#pragma unroll
            for (int k = 0; k < KR; ++k)
                if (threadIdx.x + k * blockDim.x < P) stat_add(held[k]);
        } else {
            for (int j = threadIdx.x; j < cols; j += blockDim.x) {
                T raw = xr[j];
                float v = to_float(raw);
                if (two_pass) ss += v;
                else if (CENTER) welford_add(acc, v);
                else ss += v * v;
                if (cached) row_cache[j] = raw;
            }
        }
        float mean = 0.f, rstd, t_m2;
        if (two_pass) {
            mean = block_reduce_sum(ss, reinterpret_cast<float*>(scratch)) / (float)cols;
            float m2 = 0.f;
            if (vec) {
                auto m2_add = [&](const Pack<T>& pk) {
#pragma unroll
                    for (int i = 0; i < PN; ++i) {
                        const float d = to_float(pk.v[i]) - mean;
                        m2 += d * d;
                    }
                };
#pragma unroll
                for (int k = 0; k < KR; ++k)
                    if (threadIdx.x + k * blockDim.x < P) m2_add(held[k]);
                for (int p = RB + threadIdx.x; p < P; p += blockDim.x)
                    m2_add(reinterpret_cast<const Pack<T>*>(row_cache)[p - RB]);
            } else {
                for (int j = threadIdx.x; j < cols; j += blockDim.x) {
                    const float d = to_float(row_cache[j]) - mean;
                    m2 += d * d;
                }
            }
            t_m2 = block_reduce_sum(m2, reinterpret_cast<float*>(scratch));
            rstd = rsqrtf(t_m2 / (float)cols + eps);
        } else if (CENTER) {
            Welford t = block_reduce_welford(acc, scratch);
            mean = t.mean;
            t_m2 = t.m2;
            rstd = rsqrtf(t.m2 / (float)cols + eps);
        } else {
            float t = block_reduce_sum(ss, reinterpret_cast<float*>(scratch));
            t_m2 = t;
            rstd = rsqrtf(t / (float)cols + eps);
        }
        if (threadIdx.x == 0) {
            if (CENTER) mean_out[row] = nan_inf_mean ? nan_if_inf(mean) : mean;
            rstd_out[row] = rstd;
            if (varu_out) varu_out[row] = t_m2 / (float)(cols - 1);
        }
        // Each thread reads back only the cache slots it wrote: no barrier needed.
        if (vec) {
            const Pack<T>* xp = reinterpret_cast<const Pack<T>*>(xr);
            Pack<T>* yp = reinterpret_cast<Pack<T>*>(yr);
            auto apply = [&](int p, const Pack<T>& in) {
                yp[p] = row_affine_pack(in, p, p0, seg, w, b, mean, rstd);
            };
#pragma unroll
            for (int k = 0; k < KR; ++k) {
                const int p = threadIdx.x + k * blockDim.x;
                if (p < P) apply(p, held[k]);
            }
            for (int p = RB + threadIdx.x; p < P; p += blockDim.x)
                apply(p, cached ? reinterpret_cast<const Pack<T>*>(row_cache)[p - RB] : xp[p]);
        } else {
            for (int j = threadIdx.x; j < cols; j += blockDim.x) {
                int q = p0 + j / seg;
                float v = to_float(cached ? row_cache[j] : xr[j]);
                float o = (v - mean) * rstd;
                if (w) o *= w[q];
                if (b) o += b[q];
                yr[j] = from_float<T>(o);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Register-resident rows: the path for rows of up to KM 16-byte packs per thread of a block.
// A team of `tpr` threads holds one row: either a warp (tpr = 32, several teams per block, warp
// shuffles only) or the whole block (tpr = blockDim.x). Thread t of a team owns packs t, t + tpr,
// ..., t + (K−1)·tpr (K ≤ KM, KM a template parameter so that short rows pay only for the
// registers they use), issues all its loads before using any, and loads the team's next row
// before reducing the current one (one row in flight while the other is reduced). Statistics
// are two passes over the registers (Σx, then Σ(x − mean)²): no division per element and no
// cancellation. Team geometry and the grid come from the shape (the host), so every GPU of a
// model gives the same bits; another model can take another path where a kernel's thread,
// register or shared-memory limit differs (src/ops/rows/cuda.rs `reg_kernel`). Σx is a plain f32
// sum: finite inputs whose sum exceeds 3.4e38 (|x|·cols beyond it) give an infinite mean, where
// a Welford pass would not.

// Pack p of a row: 16 bytes when `vec`, else element by element with zeros past `cols`.
template <typename T>
__device__ __forceinline__ Pack<T> load_pack(const T* __restrict__ r, int p, int cols, bool vec) {
    Pack<T> pk;
    if (vec) return reinterpret_cast<const Pack<T>*>(r)[p];
#pragma unroll
    for (int i = 0; i < Pack<T>::N; ++i) {
        int j = p * Pack<T>::N + i;
        pk.v[i] = j < cols ? r[j] : from_float<T>(0.f);
    }
    return pk;
}

template <typename T>
__device__ __forceinline__ void store_pack(T* __restrict__ r, int p, const Pack<T>& pk, int cols,
                                           bool vec) {
    if (vec) {
        reinterpret_cast<Pack<T>*>(r)[p] = pk;
        return;
    }
#pragma unroll
    for (int i = 0; i < Pack<T>::N; ++i) {
        int j = p * Pack<T>::N + i;
        if (j < cols) r[j] = pk.v[i];
    }
}

// Sum over a team: a warp (tpr == 32) or the whole block. Synchronizes the block when tpr > 32.
__device__ __forceinline__ float team_sum(float v, int tpr, float* scratch) {
    return tpr == 32 ? warp_reduce_sum(v) : block_reduce_sum(v, scratch);
}

// The packs a thread owns of row `r` (K of KM slots).
template <typename T, int KM>
__device__ __forceinline__ void load_owned(Pack<T> (&dst)[KM], const T* __restrict__ r, int t,
                                           int tpr, int K, int packs, int cols, bool vec) {
#pragma unroll
    for (int k = 0; k < KM; ++k) {
        const int p = t + k * tpr;
        if (k < K && p < packs) dst[k] = load_pack(r, p, cols, vec);
    }
}

// Forward: y = (x − mean)·rstd·w + b (RMSNorm: x·rstd·w), saved mean (LayerNorm) and rstd.
// Bytes: x read once, y written once, 8 bytes of statistics per row.
template <typename T, bool CENTER, int KM>
__device__ __forceinline__ void rows_fwd_reg(const T* __restrict__ x, T* __restrict__ y,
                                             const float* __restrict__ w,
                                             const float* __restrict__ b,
                                             float* __restrict__ mean_out,
                                             float* __restrict__ rstd_out, i64 rows, int cols,
                                             float eps, int tpr, int K) {
    __shared__ float scratch[32];
    const int PN = Pack<T>::N;
    const int teams = blockDim.x / tpr, team = threadIdx.x / tpr, t = threadIdx.x % tpr;
    const int packs = (cols + PN - 1) / PN;
    const bool vec = aligned16(x) && aligned16(y) && cols % PN == 0;
    const i64 stride = (i64)gridDim.x * teams;
    i64 row = (i64)blockIdx.x * teams + team;
    Pack<T> r[KM];
    if (row < rows) load_owned<T, KM>(r, x + row * (i64)cols, t, tpr, K, packs, cols, vec);
#pragma unroll 1
    for (; row < rows; row += stride) {
        Pack<T> nx[KM];
        const bool more = row + stride < rows;
        if (more) load_owned<T, KM>(nx, x + (row + stride) * (i64)cols, t, tpr, K, packs, cols, vec);
        float s = 0.f;
#pragma unroll
        for (int k = 0; k < KM; ++k) {
            const int p = t + k * tpr;
            if (k < K && p < packs) {
#pragma unroll
                for (int i = 0; i < PN; ++i) {
                    float v = to_float(r[k].v[i]);
                    s += CENTER ? v : v * v;  // zeros past cols add nothing
                }
            }
        }
        s = team_sum(s, tpr, scratch);
        float mean = 0.f, var;
        if (CENTER) {
            mean = s / (float)cols;
            float m2 = 0.f;
#pragma unroll
            for (int k = 0; k < KM; ++k) {
                const int p = t + k * tpr;
                if (k < K && p < packs) {
#pragma unroll
                    for (int i = 0; i < PN; ++i) {
                        float d = to_float(r[k].v[i]) - mean;
                        if (p * PN + i < cols) m2 += d * d;
                    }
                }
            }
            var = team_sum(m2, tpr, scratch) / (float)cols;
        } else {
            var = s / (float)cols;
        }
        const float rstd = rsqrtf(var + eps);
        if (t == 0) {
            if (CENTER) mean_out[row] = nan_if_inf(mean);
            rstd_out[row] = rstd;
        }
        T* yr = y + row * (i64)cols;
#pragma unroll
        for (int k = 0; k < KM; ++k) {
            const int p = t + k * tpr;
            if (k < K && p < packs) {
                Pack<T> o;
                const int j0 = p * PN;  // parameters past cols: not read (the value is not stored)
                float wv[PN], bv[PN];
                load_params<PN>(wv, w, j0, cols - j0, 1.f);
                load_params<PN>(bv, b, j0, cols - j0, 0.f);
#pragma unroll
                for (int i = 0; i < PN; ++i) {
                    float v = (to_float(r[k].v[i]) - mean) * rstd;
                    if (w) v *= wv[i];
                    if (b) v += bv[i];
                    o.v[i] = from_float<T>(v);
                }
                store_pack(yr, p, o, cols, vec);
            }
        }
        if (more) {
#pragma unroll
            for (int k = 0; k < KM; ++k) r[k] = nx[k];
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Sums over team `team` of `tpr` threads (a power of two below 32, or a multiple of 32): a
// butterfly over the lanes, then the team's warps' sums from shared memory (`red`, 32 floats
// per value) in warp order, every thread with the same bits. Synchronizes the block when
// tpr > 32 (every thread of the block must call it).
__device__ __forceinline__ float team_reduce(float v, int tpr, int team, float* red) {
    const int width = tpr < 32 ? tpr : 32;
    for (int o = width >> 1; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (tpr <= 32) return v;
    const int wpt = tpr >> 5, w0 = team * wpt;
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    float s = 0.f;
    for (int i = 0; i < wpt; ++i) s += red[w0 + i];
    return s;
}

// Two sums at once (one barrier): `red` holds 64 floats.
__device__ __forceinline__ void team_reduce2(float& a, float& b, int tpr, int team, float (*red)[32]) {
    const int width = tpr < 32 ? tpr : 32;
    for (int o = width >> 1; o > 0; o >>= 1) {
        a += __shfl_xor_sync(0xffffffffu, a, o);
        b += __shfl_xor_sync(0xffffffffu, b, o);
    }
    if (tpr <= 32) return;
    const int wpt = tpr >> 5, w0 = team * wpt;
    if ((threadIdx.x & 31) == 0) {
        red[0][threadIdx.x >> 5] = a;
        red[1][threadIdx.x >> 5] = b;
    }
    __syncthreads();
    a = 0.f;
    b = 0.f;
    for (int i = 0; i < wpt; ++i) {
        a += red[0][w0 + i];
        b += red[1][w0 + i];
    }
}

// ---------------------------------------------------------------------------------------------
// Team forward on whole, 16-byte-aligned packs (the default forward for rows that are and
// that it holds: src/ops/rows/cuda.rs `TeamShape`, `team_kmax`): a team of `tpr`
// threads (a power of two, 4 .. 1024) per row, each thread holding K packs of the row (packs t,
// t + tpr, ..., t + (K−1)·tpr) as words, every load issued before any is used; blockDim.x / tpr
// teams per block (one when tpr ≥ blockDim.x). No loop over a row, no row in shared memory, no
// prefetch: the latency of one row's loads hides behind the other resident teams, and a team
// smaller than a warp (rows of ≤ 16 packs) keeps the whole warp busy. Statistics as in
// rows_fwd_reg: two passes over the registers (Σx, then Σ(x − mean)²; RMSNorm Σx²), each summed by
// a butterfly over the team's lanes (every lane gets the same bits) and, for teams wider than a
// warp, the warps' sums added in order from shared memory. Geometry comes from the shape (host:
// src/ops/rows/cuda.rs `TeamShape`): the same bits on every GPU of a model (whether a team fits
// the kernel's registers can differ between architectures, as for rows_fwd_reg). Rows that are
// not whole aligned packs take the other kernels.
// Bytes: x read once, y written once, 8 bytes of statistics per row.
template <typename T, bool CENTER, int K>
__device__ __forceinline__ void rows_fwd_team(const T* __restrict__ x, T* __restrict__ y,
                                              const float* __restrict__ w,
                                              const float* __restrict__ b,
                                              float* __restrict__ mean_out,
                                              float* __restrict__ rstd_out, i64 rows, int cols,
                                              float eps, int tpr) {
    // Two slots per reduction of a row, alternating: a slot is written again only after the
    // barrier of the reduction that follows its reads (see team_reduce).
    __shared__ float red[2][32];
    const int PN = Pack<T>::N;
    const int packs = cols / PN;
    const int teams = blockDim.x / tpr, team = threadIdx.x / tpr, t = threadIdx.x & (tpr - 1);
    const i64 stride = (i64)gridDim.x * teams;
    int phase = 0;
    // The loop bound is the same for the whole block (barriers inside): a team past the last
    // row loads and stores nothing.
    for (i64 base = (i64)blockIdx.x * teams; base < rows; base += stride) {
        const i64 row = base + team;
        const bool live = row < rows;
        const Pack<unsigned>* xr =
            reinterpret_cast<const Pack<unsigned>*>(x + (live ? row : 0) * (i64)cols);
        Pack<unsigned> raw[K];
#pragma unroll
        for (int k = 0; k < K; ++k) {
            const int p = t + k * tpr;
            if (live && p < packs) {
                raw[k] = xr[p];
            } else {
#pragma unroll
                for (int i = 0; i < 4; ++i) raw[k].v[i] = 0u;
            }
        }
        float v[K][PN];
#pragma unroll
        for (int k = 0; k < K; ++k) unpack_words<T>(raw[k], v[k]);
        float s = 0.f;
#pragma unroll
        for (int k = 0; k < K; ++k)
#pragma unroll
            for (int i = 0; i < PN; ++i) s += CENTER ? v[k][i] : v[k][i] * v[k][i];  // absent: 0
        s = team_reduce(s, tpr, team, red[phase]);
        phase ^= 1;
        float mean = 0.f, var;
        if (CENTER) {
            mean = s / (float)cols;
            float m2 = 0.f;
#pragma unroll
            for (int k = 0; k < K; ++k) {
                if (t + k * tpr < packs) {
#pragma unroll
                    for (int i = 0; i < PN; ++i) {
                        const float d = v[k][i] - mean;
                        m2 += d * d;
                    }
                }
            }
            var = team_reduce(m2, tpr, team, red[phase]) / (float)cols;
            phase ^= 1;
        } else {
            var = s / (float)cols;
        }
        const float rstd = rsqrtf(var + eps);
        if (!live) continue;
        if (t == 0) {
            if (CENTER) mean_out[row] = nan_if_inf(mean);
            rstd_out[row] = rstd;
        }
        Pack<unsigned>* yr = reinterpret_cast<Pack<unsigned>*>(y + row * (i64)cols);
#pragma unroll
        for (int k = 0; k < K; ++k) {
            const int p = t + k * tpr;
            if (p < packs) {
                float wv[PN], bv[PN];
                load_params<PN>(wv, w, p * PN, PN, 1.f);
                load_params<PN>(bv, b, p * PN, PN, 0.f);
                float o[PN];
#pragma unroll
                for (int i = 0; i < PN; ++i) {
                    o[i] = (v[k][i] - mean) * rstd;
                    if (w) o[i] *= wv[i];
                    if (b) o[i] += bv[i];
                }
                yr[p] = pack_words<T>(o);
            }
        }
    }
}

// Σ over a thread's pack of columns kept in shared memory (dγ or dβ partials): 16-byte accesses
// when `vec` (the slot is then 16-byte aligned), else one float at a time.
template <int PN>
__device__ __forceinline__ void smem_add(float* __restrict__ slot, const float (&v)[PN], int n,
                                         bool vec) {
    if (vec) {
#pragma unroll
        for (int i = 0; i < PN; i += 4) {
            Pack<float> a = *reinterpret_cast<Pack<float>*>(slot + i);
#pragma unroll
            for (int q = 0; q < 4; ++q) a.v[q] += v[i + q];
            *reinterpret_cast<Pack<float>*>(slot + i) = a;
        }
    } else {
#pragma unroll
        for (int i = 0; i < PN; ++i)
            if (i < n) slot[i] += v[i];
    }
}

// slot[0 .. PN) = v, 16-byte stores (the slot 16-byte aligned).
template <int PN>
__device__ __forceinline__ void smem_set(float* __restrict__ slot, const float (&v)[PN]) {
#pragma unroll
    for (int i = 0; i < PN; i += 4) {
        Pack<float> a;
#pragma unroll
        for (int q = 0; q < 4; ++q) a.v[q] = v[i + q];
        *reinterpret_cast<Pack<float>*>(slot + i) = a;
    }
}

// Backward: per row Σu and Σu·x̂ (u = dy·w, x̂ = (x − mean)·rstd), dx = rstd·(u − Σu/n −
// x̂·Σu·x̂/n) (RMSNorm: no Σu/n term) from the registers. Per owned column the thread adds dy·x̂
// and dy over the team's rows in the team's slice of shared memory (2·cols floats: only the
// owning thread touches a column, so no barrier), then writes them to row (team index) of
// dw_part/db_part for rows_col_sum_f32. u comes from row_u (rounded on its own).
// Bytes: x and dy read once, dx written once, 8·cols bytes of partials per team.
template <typename T, bool CENTER, int KM>
__device__ __forceinline__ void rows_bwd_reg(const T* __restrict__ dy, const T* __restrict__ x,
                                             const float* __restrict__ w,
                                             const float* __restrict__ mean,
                                             const float* __restrict__ rstd, T* __restrict__ dx,
                                             float* __restrict__ dw_part,
                                             float* __restrict__ db_part, i64 rows, int cols,
                                             int tpr, int K) {
    __shared__ float scratch[32];
    extern __shared__ __align__(16) unsigned char row_cache_bytes[];
    const int PN = Pack<T>::N;
    const int teams = blockDim.x / tpr, team = threadIdx.x / tpr, t = threadIdx.x % tpr;
    const int packs = (cols + PN - 1) / PN;
    const bool vec = aligned16(x) && aligned16(dy) && aligned16(dx) && cols % PN == 0;
    float* acc_w = reinterpret_cast<float*>(row_cache_bytes) + (i64)team * 2 * cols;
    float* acc_b = acc_w + cols;
#pragma unroll
    for (int k = 0; k < KM; ++k) {
        const int p = t + k * tpr;
        if (k < K && p < packs) {
            for (int i = 0; i < PN && p * PN + i < cols; ++i) {
                acc_w[p * PN + i] = 0.f;
                acc_b[p * PN + i] = 0.f;
            }
        }
    }
    const i64 stride = (i64)gridDim.x * teams;
    i64 row = (i64)blockIdx.x * teams + team;
    Pack<T> rg[KM], rx[KM];
    if (row < rows) {
        load_owned<T, KM>(rg, dy + row * (i64)cols, t, tpr, K, packs, cols, vec);
        load_owned<T, KM>(rx, x + row * (i64)cols, t, tpr, K, packs, cols, vec);
    }
#pragma unroll 1
    for (; row < rows; row += stride) {
        Pack<T> ng[KM], nx[KM];
        const bool more = row + stride < rows;
        if (more) {
            load_owned<T, KM>(ng, dy + (row + stride) * (i64)cols, t, tpr, K, packs, cols, vec);
            load_owned<T, KM>(nx, x + (row + stride) * (i64)cols, t, tpr, K, packs, cols, vec);
        }
        const float mu = CENTER ? mean[row] : 0.f, rs = rstd[row];
        float s1 = 0.f, s2 = 0.f;
#pragma unroll
        for (int k = 0; k < KM; ++k) {
            const int p = t + k * tpr;
            if (k < K && p < packs) {
                const int j0 = p * PN;
                float cw[PN], cb[PN], wv[PN];
                load_params<PN>(wv, w, j0, cols - j0, 1.f);
#pragma unroll
                for (int i = 0; i < PN; ++i) {
                    const float g = to_float(rg[k].v[i]);  // zero past cols
                    const float xh = (to_float(rx[k].v[i]) - mu) * rs;
                    const float u = row_u(g, w, wv[i]);
                    s1 += u;
                    s2 += u * xh;
                    cw[i] = g * xh;
                    cb[i] = g;
                }
                smem_add<PN>(acc_w + j0, cw, cols - j0, vec);
                smem_add<PN>(acc_b + j0, cb, cols - j0, vec);
            }
        }
        s1 = team_sum(s1, tpr, scratch);
        s2 = team_sum(s2, tpr, scratch);
        const float m1 = CENTER ? s1 / (float)cols : 0.f, m2 = s2 / (float)cols;
        T* dr = dx + row * (i64)cols;
#pragma unroll
        for (int k = 0; k < KM; ++k) {
            const int p = t + k * tpr;
            if (k < K && p < packs) {
                Pack<T> o;
                const int j0 = p * PN;
                float wv[PN];  // reloaded (L1) rather than held across the team sums
                load_params<PN>(wv, w, j0, cols - j0, 1.f);
#pragma unroll
                for (int i = 0; i < PN; ++i) {
                    const float xh = (to_float(rx[k].v[i]) - mu) * rs;
                    o.v[i] = from_float<T>(row_dx(to_float(rg[k].v[i]), xh, w, wv[i], rs, m1, m2));
                }
                store_pack(dr, p, o, cols, vec);
            }
        }
        if (more) {
#pragma unroll
            for (int k = 0; k < KM; ++k) {
                rg[k] = ng[k];
                rx[k] = nx[k];
            }
        }
    }
    const i64 part = (i64)blockIdx.x * teams + team;
    float* pw = dw_part + part * cols;
    float* pb = db_part + part * cols;
#pragma unroll
    for (int k = 0; k < KM; ++k) {
        const int p = t + k * tpr;
        if (k < K && p < packs) {
            for (int i = 0; i < PN && p * PN + i < cols; ++i) {
                pw[p * PN + i] = acc_w[p * PN + i];
                pb[p * PN + i] = acc_b[p * PN + i];
            }
        }
    }
}

// One 16-byte pack of dy (rg) and x (rx), held as words, of the columns from j0, in the team and
// cluster backwards: adds its Σu and Σu·x̂ to s1 and s2 and gives dy (g) and dy·x̂ (cw) for dγ/dβ;
// then its dx (the weight loaded again, from L1: not held across the row's sums).
template <typename T>
__device__ __forceinline__ void row_bwd_pack_sums(const Pack<unsigned>& rg, const Pack<unsigned>& rx,
                                                  const float* __restrict__ w, int j0, float mu,
                                                  float rs, float& s1, float& s2,
                                                  float (&g)[16 / sizeof(T)],
                                                  float (&cw)[16 / sizeof(T)]) {
    const int PN = Pack<T>::N;
    float xv[PN], wv[PN];
    unpack_words<T>(rg, g);
    unpack_words<T>(rx, xv);
    load_params<PN>(wv, w, j0, PN, 1.f);
#pragma unroll
    for (int i = 0; i < PN; ++i) {
        const float xh = (xv[i] - mu) * rs;
        const float u = row_u(g[i], w, wv[i]);
        s1 += u;
        s2 += u * xh;
        cw[i] = g[i] * xh;
    }
}
template <typename T>
__device__ __forceinline__ Pack<unsigned> row_bwd_pack_dx(const Pack<unsigned>& rg,
                                                          const Pack<unsigned>& rx,
                                                          const float* __restrict__ w, int j0,
                                                          float mu, float rs, float m1, float m2) {
    const int PN = Pack<T>::N;
    float g[PN], xv[PN], wv[PN], o[PN];
    unpack_words<T>(rg, g);
    unpack_words<T>(rx, xv);
    load_params<PN>(wv, w, j0, PN, 1.f);
#pragma unroll
    for (int i = 0; i < PN; ++i) o[i] = row_dx(g[i], (xv[i] - mu) * rs, w, wv[i], rs, m1, m2);
    return pack_words<T>(o);
}

// Team backward (the default backward for aligned rows of whole packs where it won:
// src/ops/rows/cuda.rs `bwd_prefers_team`): rows_bwd_reg's teams and arguments, on whole
// 16-byte-aligned packs only, but one partial row per block (its teams' partials summed in
// shared memory), with each
// pack of x and dy held as four words (no register per 2-byte value), no prefetch of the next
// row (fewer registers, more resident teams hide the latency) and Σu, Σu·x̂ in one team
// reduction. Bytes: x and dy read once, dx written once, 8·cols bytes of partials per block.
template <typename T, bool CENTER, int KM>
__device__ __forceinline__ void rows_bwd_team(const T* __restrict__ dy, const T* __restrict__ x,
                                              const float* __restrict__ w,
                                              const float* __restrict__ mean,
                                              const float* __restrict__ rstd,
                                              T* __restrict__ dx, float* __restrict__ dw_part,
                                              float* __restrict__ db_part, i64 rows, int cols,
                                              int tpr, int K) {
    __shared__ float red[2][2][32];
    extern __shared__ __align__(16) unsigned char row_cache_bytes[];
    const int PN = Pack<T>::N;
    const int teams = blockDim.x / tpr, team = threadIdx.x / tpr, t = threadIdx.x % tpr;
    const int packs = cols / PN;
    float* acc_w = reinterpret_cast<float*>(row_cache_bytes) + (i64)team * 2 * cols;
    float* acc_b = acc_w + cols;
    const float zero[PN] = {};
#pragma unroll
    for (int k = 0; k < KM; ++k) {
        const int p = t + k * tpr;
        if (k < K && p < packs) {
            smem_set<PN>(acc_w + p * PN, zero);
            smem_set<PN>(acc_b + p * PN, zero);
        }
    }
    const i64 stride = (i64)gridDim.x * teams;
    int phase = 0;
    // The bound is the same for every team of the block (barriers inside team_reduce2).
    for (i64 base = (i64)blockIdx.x * teams; base < rows; base += stride) {
        const i64 row = base + team;
        const bool live = row < rows;
        const i64 off = (live ? row : 0) * (i64)cols;
        const Pack<unsigned>* gr = reinterpret_cast<const Pack<unsigned>*>(dy + off);
        const Pack<unsigned>* xr = reinterpret_cast<const Pack<unsigned>*>(x + off);
        Pack<unsigned> rg[KM], rx[KM];
#pragma unroll
        for (int k = 0; k < KM; ++k) {
            const int p = t + k * tpr;
            if (live && k < K && p < packs) {
                rg[k] = gr[p];
                rx[k] = xr[p];
            }
        }
        const float mu = CENTER && live ? mean[row] : 0.f, rs = live ? rstd[row] : 0.f;
        float s1 = 0.f, s2 = 0.f;
#pragma unroll
        for (int k = 0; k < KM; ++k) {
            const int p = t + k * tpr;
            if (live && k < K && p < packs) {
                const int j0 = p * PN;
                float g[PN], cw[PN];
                row_bwd_pack_sums<T>(rg[k], rx[k], w, j0, mu, rs, s1, s2, g, cw);
                smem_add<PN>(acc_w + j0, cw, PN, true);
                smem_add<PN>(acc_b + j0, g, PN, true);
            }
        }
        team_reduce2(s1, s2, tpr, team, red[phase]);
        phase ^= 1;
        if (!live) continue;
        const float m1 = CENTER ? s1 / (float)cols : 0.f, m2 = s2 / (float)cols;
        Pack<unsigned>* dr = reinterpret_cast<Pack<unsigned>*>(dx + row * (i64)cols);
#pragma unroll
        for (int k = 0; k < KM; ++k) {
            const int p = t + k * tpr;
            if (k < K && p < packs) {
                dr[p] = row_bwd_pack_dx<T>(rg[k], rx[k], w, p * PN, mu, rs, m1, m2);
            }
        }
    }
    // One partial row per block: the teams' partials added in team order (so a block may hold
    // several teams, for occupancy, without more partial rows to write and read back).
    __syncthreads();
    const Pack<float>* all = reinterpret_cast<const Pack<float>*>(row_cache_bytes);
    const int q4 = cols / 4;  // float quads of a partial row (cols: whole packs, 4 | cols)
    for (int q = threadIdx.x; q < 2 * q4; q += blockDim.x) {
        Pack<float> sum = all[q];
        for (int tm = 1; tm < teams; ++tm) {
            const Pack<float> o = all[tm * 2 * q4 + q];
#pragma unroll
            for (int i = 0; i < 4; ++i) sum.v[i] += o.v[i];
        }
        float* dst = q < q4 ? dw_part + (i64)blockIdx.x * cols + 4 * q
                            : db_part + (i64)blockIdx.x * cols + 4 * (q - q4);
        *reinterpret_cast<Pack<float>*>(dst) = sum;
    }
}

// ---------------------------------------------------------------------------------------------
// Long rows backward: the rows the register-resident backward cannot hold (more packs than 4
// per thread of a 1024-thread block, or dγ/dβ partials beyond shared memory). Two kernels, so
// that no partial sum is read and written back per row:
// - rows_bwd_sums: one block per row (grid-stride), Σu and Σu·x̂ of the row (u = dy·w, x̂ =
//   (x − mean)·rstd) to sums[2·row] and sums[2·row + 1];
// - rows_bwd_tile: block (column tile blockIdx.x, row chunk blockIdx.y); each thread owns one
//   pack of columns and, over the chunk's rows (ROWS_TILE_RU rows' loads issued before any is
//   used), writes dx = rstd·(u − Σu/n − x̂·Σu·x̂/n) (RMSNorm: no Σu/n term) and adds dy·x̂ and
//   dy in registers, then writes them to row blockIdx.y of dw_part/db_part for rows_col_sum_f32.
// u comes from row_u, as in rows_bwd_reg. Rows of partial packs or
// misaligned buffers go element by element (load_pack/store_pack).
// Bytes: x and dy read twice (once per kernel), dx written once, 8 bytes of sums per row and
// 8·cols bytes of partials per chunk.
template <typename T, bool CENTER>
__device__ __forceinline__ void rows_bwd_sums(const T* __restrict__ dy, const T* __restrict__ x,
                                              const float* __restrict__ w,
                                              const float* __restrict__ mean,
                                              const float* __restrict__ rstd,
                                              float* __restrict__ sums, i64 rows, int cols) {
    __shared__ float scratch[32];
    const int PN = Pack<T>::N;
    const int packs = (cols + PN - 1) / PN;
    for (i64 row = blockIdx.x; row < rows; row += gridDim.x) {
        const T* gr = dy + row * (i64)cols;
        const T* xr = x + row * (i64)cols;
        const bool vec = aligned16(gr) && aligned16(xr) && cols % PN == 0;
        const float mu = CENTER ? mean[row] : 0.f, rs = rstd[row];
        float s1 = 0.f, s2 = 0.f;
#pragma unroll 4
        for (int p = threadIdx.x; p < packs; p += blockDim.x) {
            const Pack<T> g = load_pack(gr, p, cols, vec), xv = load_pack(xr, p, cols, vec);
            float wv[PN];
            load_params<PN>(wv, w, p * PN, cols - p * PN, 1.f);
#pragma unroll
            for (int i = 0; i < PN; ++i) {
                if (p * PN + i < cols) {  // not the padding: its x̂ can be ±inf (0·inf = NaN)
                    const float u = row_u(to_float(g.v[i]), w, wv[i]);
                    const float xh = (to_float(xv.v[i]) - mu) * rs;
                    s1 += u;
                    s2 += u * xh;
                }
            }
        }
        s1 = block_reduce_sum(s1, scratch);
        s2 = block_reduce_sum(s2, scratch);
        if (threadIdx.x == 0) {
            sums[2 * row] = s1;
            sums[2 * row + 1] = s2;
        }
    }
}

// Rows per group of loads: 4 rows of x and dy packs in flight for f32, 2 for f16/bf16 (whose
// packs convert to twice the registers).
#define ROWS_TILE_RU(T) (Pack<T>::N == 4 ? 4 : 2)
template <typename T, bool CENTER>
__device__ __forceinline__ void rows_bwd_tile(const T* __restrict__ dy, const T* __restrict__ x,
                                              const float* __restrict__ w,
                                              const float* __restrict__ mean,
                                              const float* __restrict__ rstd,
                                              const float* __restrict__ sums, T* __restrict__ dx,
                                              float* __restrict__ dw_part,
                                              float* __restrict__ db_part, i64 rows, int cols,
                                              int chunk) {
    const int PN = Pack<T>::N;
    const int packs = (cols + PN - 1) / PN;
    const int p = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (p >= packs) return;
    const bool vec = aligned16(dy) && aligned16(x) && aligned16(dx) && cols % PN == 0;
    float wv[PN], cw[PN], cb[PN];
    load_params<PN>(wv, w, p * PN, cols - p * PN, 1.f);
#pragma unroll
    for (int i = 0; i < PN; ++i) {
        cw[i] = 0.f;
        cb[i] = 0.f;
    }
    const i64 r0 = (i64)blockIdx.y * chunk, r1 = min(rows, r0 + (i64)chunk);
    constexpr int RU = ROWS_TILE_RU(T);
    for (i64 row = r0; row < r1; row += RU) {
        Pack<T> g[RU], xv[RU];
#pragma unroll
        for (int k = 0; k < RU; ++k) {
            if (row + k < r1) {
                g[k] = load_pack(dy + (row + k) * (i64)cols, p, cols, vec);
                xv[k] = load_pack(x + (row + k) * (i64)cols, p, cols, vec);
            }
        }
#pragma unroll
        for (int k = 0; k < RU; ++k) {
            const i64 r = row + k;
            if (r < r1) {
                const float mu = CENTER ? mean[r] : 0.f, rs = rstd[r];
                const float m1 = CENTER ? sums[2 * r] / (float)cols : 0.f;
                const float m2 = sums[2 * r + 1] / (float)cols;
                Pack<T> out;
#pragma unroll
                for (int i = 0; i < PN; ++i) {
                    const float gv = to_float(g[k].v[i]);
                    const float xh = (to_float(xv[k].v[i]) - mu) * rs;
                    out.v[i] = from_float<T>(row_dx(gv, xh, w, wv[i], rs, m1, m2));
                    cw[i] += gv * xh;
                    cb[i] += gv;
                }
                store_pack(dx + r * (i64)cols, p, out, cols, vec);
            }
        }
    }
    float* pw = dw_part + (i64)blockIdx.y * cols;
    float* pb = db_part + (i64)blockIdx.y * cols;
#pragma unroll
    for (int i = 0; i < PN; ++i) {
        const int j = p * PN + i;
        if (j < cols) {
            pw[j] = cw[i];
            pb[j] = cb[i];
        }
    }
}

// out[c·cols + j] = Σ part[p·cols + j] over p in chunk c = blockIdx.y (parts c·chunk ..
// min(parts, (c+1)·chunk) − 1), in order: the deterministic end of every column reduction. One
// chunk (chunk = parts) sums everything; many partial rows are summed in two launches, chunks
// first, so that no thread adds more than ~64 values in sequence.
extern "C" __global__ void rows_col_sum_f32(const float* __restrict__ part, float* __restrict__ out,
                                       int parts, int cols, int chunk) {
    const i64 j = (i64)blockIdx.x * blockDim.x + threadIdx.x;  // no wrap near cols = 2^31
    if (j >= cols) return;
    const int p0 = blockIdx.y * chunk, p1 = min(parts, p0 + chunk);
    float s = 0.f;
    for (int p = p0; p < p1; ++p) s += part[(i64)p * cols + j];
    out[(i64)blockIdx.y * cols + j] = s;
}

// ---------------------------------------------------------------------------------------------
// Cluster forward: rows too long for one block to hold without leaving its SM idle while it
// reduces (a block holding 128 KiB or more keeps an SM to itself, its loads stopped during
// each reduction). A cluster of CS blocks (__cluster_dims__) takes a row: thread t of rank r
// holds packs r·B + t + k·CS·B (B = blockDim.x, k < ROWS_CLUSTER_K) in registers, all loads
// issued before any is used. Statistics take two passes over the registers (LayerNorm/GroupNorm:
// Σx, then Σ(x − mean)²; RMSNorm: Σx²), each summed in the block and then over the blocks in
// rank order through distributed shared memory (cluster_reduce_sum), so every block has the
// same bits and x is read once. Blocks are small (the host picks 256 or 512 threads), so
// several clusters share an SM and one's loads overlap another's reductions. Clusters stride
// over the rows. Rows of whole 16-byte packs, 16-byte aligned (the host checks). Arguments,
// `seg`/`cycle` and the statistics as rows_fwd's; shared memory: 34 floats, dynamic (the
// emulator runs a cluster's blocks together and gives each block its own dynamic shared
// memory only).
#define ROWS_CLUSTER_K 8
template <typename T, bool CENTER>
__device__ __forceinline__ void rows_fwd_cluster(const T* __restrict__ x, T* __restrict__ y,
                                                 const float* __restrict__ w,
                                                 const float* __restrict__ b,
                                                 float* __restrict__ mean_out,
                                                 float* __restrict__ rstd_out,
                                                 float* __restrict__ varu_out, i64 rows, int cols,
                                                 int seg, int cycle, float eps, int nan_inf_mean) {
    extern __shared__ __align__(16) unsigned char cluster_red_bytes[];
    float* red = reinterpret_cast<float*>(cluster_red_bytes);
    const int PN = Pack<T>::N;
    const int cs = (int)cluster_blocks();
    const int P = cols / PN, step = cs * (int)blockDim.x;
    const int first = (int)cluster_rank() * (int)blockDim.x + (int)threadIdx.x;
    const FastDiv dcycle = fast_div(cycle);
    // The reductions alternate between slots 32 and 33: a slot is written again only after the
    // next reduction's cluster barrier, which every block passes after reading it.
    int slot = 32;
    for (i64 row = blockIdx.x / cs; row < rows; row += gridDim.x / cs) {
        const Pack<T>* xp = reinterpret_cast<const Pack<T>*>(x + row * (i64)cols);
        Pack<T>* yp = reinterpret_cast<Pack<T>*>(y + row * (i64)cols);
        Pack<T> held[ROWS_CLUSTER_K];
#pragma unroll
        for (int k = 0; k < ROWS_CLUSTER_K; ++k) {
            const int p = first + k * step;
            if (p < P) held[k] = xp[p];
        }
        float s = 0.f;
#pragma unroll
        for (int k = 0; k < ROWS_CLUSTER_K; ++k)
            if (first + k * step < P) {
#pragma unroll
                for (int i = 0; i < PN; ++i) {
                    const float v = to_float(held[k].v[i]);
                    s += CENTER ? v : v * v;
                }
            }
        float mean = 0.f, m2 = s;
        if (CENTER) {
            mean = cluster_reduce_sum(s, red, slot) / (float)cols;
            slot ^= 1;
            m2 = 0.f;
#pragma unroll
            for (int k = 0; k < ROWS_CLUSTER_K; ++k)
                if (first + k * step < P) {
#pragma unroll
                    for (int i = 0; i < PN; ++i) {
                        const float d = to_float(held[k].v[i]) - mean;
                        m2 += d * d;
                    }
                }
        }
        const float t_m2 = cluster_reduce_sum(m2, red, slot);
        slot ^= 1;
        const float rstd = rsqrtf(t_m2 / (float)cols + eps);
        if (first == 0) {
            if (CENTER) mean_out[row] = nan_inf_mean ? nan_if_inf(mean) : mean;
            rstd_out[row] = rstd;
            if (varu_out) varu_out[row] = t_m2 / (float)(cols - 1);
        }
        i64 in_cycle;
        div_of(row, dcycle, &in_cycle);
        const int p0 = (int)in_cycle * (cols / seg);
#pragma unroll
        for (int k = 0; k < ROWS_CLUSTER_K; ++k) {
            const int p = first + k * step;
            if (p < P) yp[p] = row_affine_pack(held[k], p, p0, seg, w, b, mean, rstd);
        }
    }
    // No block exits while another of its cluster may still read its slots.
    cluster_sync();
}

// Cluster backward: the long rows' backward (rows whose x and dy one block cannot hold) with each
// row held in registers across a cluster of CS blocks, so that x and dy are read once (the
// long-rows kernels read them twice). Thread t of rank r holds packs p = r·B + t + k·CS·B
// (k < ROWS_CLUSTER_BWD_K) of x and dy; Σu and Σu·x̂ of the row are summed in the block, then
// over the blocks in rank order (cluster_reduce_sum2); dx from the registers. Cluster c takes
// the `chunk` rows from c·chunk in order and adds dy·x̂ and dy of its columns into shared memory
// (each thread its own slots: no barrier), then writes them as partial row c of dw_part/db_part
// (16-byte stores) for rows_col_sum_f32: the partial count follows from the shape, never from
// the GPU. Rows of whole packs, 16-byte aligned (the host checks). Shared memory: 64 floats of
// reduction scratch and slots, then dγ and dβ accumulators, ROWS_CLUSTER_BWD_K·B·PN floats each,
// as float quads [k][quad of the pack][thread] (consecutive threads' 16-byte accesses
// consecutive: no bank conflicts for 2-byte types' 32-byte packs).
#define ROWS_CLUSTER_BWD_K 4
template <typename T, bool CENTER>
__device__ __forceinline__ void rows_bwd_cluster(const T* __restrict__ dy, const T* __restrict__ x,
                                                 const float* __restrict__ w,
                                                 const float* __restrict__ mean,
                                                 const float* __restrict__ rstd,
                                                 T* __restrict__ dx, float* __restrict__ dw_part,
                                                 float* __restrict__ db_part, i64 rows, int cols,
                                                 int chunk) {
    extern __shared__ __align__(16) unsigned char cluster_bwd_bytes[];
    float* red = reinterpret_cast<float*>(cluster_bwd_bytes);
    const int PN = Pack<T>::N, KB = ROWS_CLUSTER_BWD_K;
    const int B = (int)blockDim.x, t = (int)threadIdx.x;
    const int QN = PN / 4;  // float quads a pack
    Pack<float>* acc_w = reinterpret_cast<Pack<float>*>(red + 64);
    Pack<float>* acc_b = acc_w + KB * QN * B;
    const int cs = (int)cluster_blocks();
    const int P = cols / PN, step = cs * B;
    const int first = (int)cluster_rank() * B + t;
    const Pack<float> zero = {};
#pragma unroll
    for (int k = 0; k < KB * QN; ++k) {
        acc_w[k * B + t] = zero;
        acc_b[k * B + t] = zero;
    }
    const i64 c = blockIdx.x / cs;
    const i64 r0 = c * chunk, r1 = r0 + chunk < rows ? r0 + chunk : rows;
    // Slots 32–33 and 34–35 in turn (a pair is written again only after the next reduction's
    // cluster barrier).
    int slot = 32;
    for (i64 row = r0; row < r1; ++row) {
        const i64 off = row * (i64)cols;
        const Pack<unsigned>* gr = reinterpret_cast<const Pack<unsigned>*>(dy + off);
        const Pack<unsigned>* xr = reinterpret_cast<const Pack<unsigned>*>(x + off);
        Pack<unsigned> rg[KB], rx[KB];
#pragma unroll
        for (int k = 0; k < KB; ++k) {
            const int p = first + k * step;
            if (p < P) {
                rg[k] = gr[p];
                rx[k] = xr[p];
            }
        }
        const float mu = CENTER ? mean[row] : 0.f, rs = rstd[row];
        float s1 = 0.f, s2 = 0.f;
#pragma unroll
        for (int k = 0; k < KB; ++k) {
            const int p = first + k * step;
            if (p < P) {
                float g[PN], cw[PN];
                row_bwd_pack_sums<T>(rg[k], rx[k], w, p * PN, mu, rs, s1, s2, g, cw);
#pragma unroll
                for (int q = 0; q < QN; ++q) {
                    Pack<float> aw = acc_w[(k * QN + q) * B + t], ab = acc_b[(k * QN + q) * B + t];
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        aw.v[i] += cw[4 * q + i];
                        ab.v[i] += g[4 * q + i];
                    }
                    acc_w[(k * QN + q) * B + t] = aw;
                    acc_b[(k * QN + q) * B + t] = ab;
                }
            }
        }
        cluster_reduce_sum2(s1, s2, red, slot);
        slot = 66 - slot;
        const float m1 = CENTER ? s1 / (float)cols : 0.f, m2 = s2 / (float)cols;
        Pack<unsigned>* dr = reinterpret_cast<Pack<unsigned>*>(dx + off);
#pragma unroll
        for (int k = 0; k < KB; ++k) {
            const int p = first + k * step;
            if (p < P) {
                dr[p] = row_bwd_pack_dx<T>(rg[k], rx[k], w, p * PN, mu, rs, m1, m2);
            }
        }
    }
    // The cluster's partial row: this thread's packs of columns (16-byte stores).
#pragma unroll
    for (int k = 0; k < KB; ++k) {
        const int p = first + k * step;
        if (p < P) {
#pragma unroll
            for (int q = 0; q < QN; ++q) {
                reinterpret_cast<Pack<float>*>(dw_part + c * cols + p * PN)[q] = acc_w[(k * QN + q) * B + t];
                reinterpret_cast<Pack<float>*>(db_part + c * cols + p * PN)[q] = acc_b[(k * QN + q) * B + t];
            }
        }
    }
    // No block exits while another of its cluster may still read its slots.
    cluster_sync();
}

#define ROWS_ENTRIES(T, NAME)                                                                   \
    extern "C" __global__ void layer_norm_fwd_##NAME(                                           \
        const T* x, T* y, const float* w, const float* b, float* mean, float* rstd, i64 rows,   \
        int cols, float eps, int cache) {                                                       \
        rows_fwd<T, true>(x, y, w, b, mean, rstd, 0, rows, cols, 1, 1, eps, cache, 1);         \
    }                                                                                           \
    extern "C" __global__ void rms_norm_fwd_##NAME(const T* x, T* y, const float* w,           \
                                                   float* rstd, i64 rows, int cols, float eps,  \
                                                   int cache) {                                 \
        rows_fwd<T, false>(x, y, w, 0, 0, rstd, 0, rows, cols, 1, 1, eps, cache, 0);           \
    }                                                                                           \
    extern "C" __global__ void group_norm_fwd_##NAME(                                           \
        const T* x, T* y, const float* w, const float* b, float* mean, float* rstd, float* varu, \
        i64 rows, int cols, int seg, int cycle, float eps, int cache, int nan_inf_mean) {       \
        rows_fwd<T, true>(x, y, w, b, mean, rstd, varu, rows, cols, seg, cycle, eps, cache,    \
                          nan_inf_mean);                                                        \
    }                                                                                           \
    extern "C" __global__ void layer_norm_bwd_sums_##NAME(                                      \
        const T* dy, const T* x, const float* w, const float* mean, const float* rstd,          \
        float* sums, i64 rows, int cols) {                                                      \
        rows_bwd_sums<T, true>(dy, x, w, mean, rstd, sums, rows, cols);                        \
    }                                                                                           \
    extern "C" __global__ void rms_norm_bwd_sums_##NAME(const T* dy, const T* x, const float* w, \
                                                        const float* rstd, float* sums,         \
                                                        i64 rows, int cols) {                   \
        rows_bwd_sums<T, false>(dy, x, w, 0, rstd, sums, rows, cols);                          \
    }                                                                                           \
    extern "C" __global__ void layer_norm_bwd_tile_##NAME(                                      \
        const T* dy, const T* x, const float* w, const float* mean, const float* rstd,          \
        const float* sums, T* dx, float* dw_part, float* db_part, i64 rows, int cols,           \
        int chunk) {                                                                            \
        rows_bwd_tile<T, true>(dy, x, w, mean, rstd, sums, dx, dw_part, db_part, rows, cols,   \
                               chunk);                                                          \
    }                                                                                           \
    extern "C" __global__ void rms_norm_bwd_tile_##NAME(                                        \
        const T* dy, const T* x, const float* w, const float* rstd, const float* sums, T* dx,   \
        float* dw_part, float* db_part, i64 rows, int cols, int chunk) {                        \
        rows_bwd_tile<T, false>(dy, x, w, 0, rstd, sums, dx, dw_part, db_part, rows, cols,     \
                                chunk);                                                         \
    }

// The wide forward (rows_fwd with KR = ROWS_WIDE_K): same arguments as the entries above; the
// host launches it with 1024 threads when a row is longer than shared memory holds.
#define ROWS_WIDE_K 4
#define ROWS_WIDE_ENTRIES(T, NAME)                                                              \
    extern "C" __global__ void __launch_bounds__(1024) layer_norm_fwd_wide_##NAME(              \
        const T* x, T* y, const float* w, const float* b, float* mean, float* rstd, i64 rows,   \
        int cols, float eps, int cache) {                                                       \
        rows_fwd<T, true, ROWS_WIDE_K>(x, y, w, b, mean, rstd, 0, rows, cols, 1, 1, eps, cache, \
                                       1);                                                      \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(1024) rms_norm_fwd_wide_##NAME(                \
        const T* x, T* y, const float* w, float* rstd, i64 rows, int cols, float eps,           \
        int cache) {                                                                            \
        rows_fwd<T, false, ROWS_WIDE_K>(x, y, w, 0, 0, rstd, 0, rows, cols, 1, 1, eps, cache,   \
                                        0);                                                     \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(1024) group_norm_fwd_wide_##NAME(              \
        const T* x, T* y, const float* w, const float* b, float* mean, float* rstd, float* varu, \
        i64 rows, int cols, int seg, int cycle, float eps, int cache, int nan_inf_mean) {       \
        rows_fwd<T, true, ROWS_WIDE_K>(x, y, w, b, mean, rstd, varu, rows, cols, seg, cycle,    \
                                       eps, cache, nan_inf_mean);                               \
    }

// The cluster forward (rows_fwd_cluster), clusters of KM = 4 or 8 blocks (src/ops/rows/cuda.rs
// `cluster_plan`: 2 blocks of 256 threads would hold 64 KiB, never more than the rows it takes)
// of up to 512 threads (sm_90 on:
// below, CUNORM_CLUSTER_DIMS is empty and the host never launches them); the
// block-per-row kernels' arguments (`cache` unused), so one launch serves them all. The `1`
// (one block an SM at least) lets ptxas use up to 128 registers: with the cluster dimensions
// alone it held the f32 kernels to 64 and spilled (NVRTC 13.5).
#define ROWS_CLUSTER_FWD(T, NAME, KM)                                                           \
    extern "C" __global__ void CUNORM_CLUSTER_DIMS(KM) __launch_bounds__(512, 1)             \
        layer_norm_fwd_cluster##KM##_##NAME(const T* x, T* y, const float* w, const float* b,   \
                                            float* mean, float* rstd, i64 rows, int cols,       \
                                            float eps, int cache) {                             \
        rows_fwd_cluster<T, true>(x, y, w, b, mean, rstd, 0, rows, cols, 1, 1, eps, 1);        \
    }                                                                                           \
    extern "C" __global__ void CUNORM_CLUSTER_DIMS(KM) __launch_bounds__(512, 1)             \
        rms_norm_fwd_cluster##KM##_##NAME(const T* x, T* y, const float* w, float* rstd,        \
                                          i64 rows, int cols, float eps, int cache) {           \
        rows_fwd_cluster<T, false>(x, y, w, 0, 0, rstd, 0, rows, cols, 1, 1, eps, 0);          \
    }                                                                                           \
    extern "C" __global__ void CUNORM_CLUSTER_DIMS(KM) __launch_bounds__(512, 1)             \
        group_norm_fwd_cluster##KM##_##NAME(const T* x, T* y, const float* w, const float* b,   \
                                            float* mean, float* rstd, float* varu, i64 rows,    \
                                            int cols, int seg, int cycle, float eps, int cache, \
                                            int nan_inf_mean) {                                 \
        rows_fwd_cluster<T, true>(x, y, w, b, mean, rstd, varu, rows, cols, seg, cycle, eps,   \
                                  nan_inf_mean);                                                \
    }
// The cluster backward (rows_bwd_cluster), clusters of KM = 8 blocks (src/ops/rows/cuda.rs
// `cluster_bwd_threads`, `cluster_bwd_kernel`).
#define ROWS_CLUSTER_BWD(T, NAME, KM)                                                           \
    extern "C" __global__ void CUNORM_CLUSTER_DIMS(KM) __launch_bounds__(512, 1)             \
        layer_norm_bwd_cluster##KM##_##NAME(const T* dy, const T* x, const float* w,            \
                                            const float* mean, const float* rstd, T* dx,        \
                                            float* dw_part, float* db_part, i64 rows, int cols, \
                                            int chunk) {                                        \
        rows_bwd_cluster<T, true>(dy, x, w, mean, rstd, dx, dw_part, db_part, rows, cols,      \
                                  chunk);                                                       \
    }                                                                                           \
    extern "C" __global__ void CUNORM_CLUSTER_DIMS(KM) __launch_bounds__(512, 1)             \
        rms_norm_bwd_cluster##KM##_##NAME(const T* dy, const T* x, const float* w,              \
                                          const float* rstd, T* dx, float* dw_part,             \
                                          float* db_part, i64 rows, int cols, int chunk) {      \
        rows_bwd_cluster<T, false>(dy, x, w, 0, rstd, dx, dw_part, db_part, rows, cols, chunk); \
    }
#define ROWS_CLUSTER_ENTRIES(T, NAME)                                                           \
    ROWS_CLUSTER_FWD(T, NAME, 4) ROWS_CLUSTER_FWD(T, NAME, 8) ROWS_CLUSTER_BWD(T, NAME, 8)

#define ROWS_REG_FWD(T, NAME, KM)                                                               \
    extern "C" __global__ void layer_norm_fwd_reg##KM##_##NAME(                                  \
        const T* x, T* y, const float* w, const float* b, float* mean, float* rstd, i64 rows,   \
        int cols, float eps, int tpr, int k) {                                                  \
        rows_fwd_reg<T, true, KM>(x, y, w, b, mean, rstd, rows, cols, eps, tpr, k);            \
    }                                                                                           \
    extern "C" __global__ void rms_norm_fwd_reg##KM##_##NAME(const T* x, T* y, const float* w,  \
                                                          float* rstd, i64 rows, int cols,      \
                                                          float eps, int tpr, int k) {          \
        rows_fwd_reg<T, false, KM>(x, y, w, 0, 0, rstd, rows, cols, eps, tpr, k);              \
    }

// The register-resident and team backwards (rows_bwd_KIND, KIND reg or team): one signature.
#define ROWS_BWD_K(T, NAME, KIND, KM)                                                           \
    extern "C" __global__ void layer_norm_bwd_##KIND##KM##_##NAME(                              \
        const T* dy, const T* x, const float* w, const float* mean, const float* rstd, T* dx,   \
        float* dw_part, float* db_part, i64 rows, int cols, int tpr, int k) {                   \
        rows_bwd_##KIND<T, true, KM>(dy, x, w, mean, rstd, dx, dw_part, db_part, rows, cols,    \
                                     tpr, k);                                                   \
    }                                                                                           \
    extern "C" __global__ void rms_norm_bwd_##KIND##KM##_##NAME(                                \
        const T* dy, const T* x, const float* w, const float* rstd, T* dx, float* dw_part,      \
        float* db_part, i64 rows, int cols, int tpr, int k) {                                   \
        rows_bwd_##KIND<T, false, KM>(dy, x, w, 0, rstd, dx, dw_part, db_part, rows, cols, tpr, \
                                      k);                                                       \
    }
#define ROWS_REG_BWD(T, NAME, KM) ROWS_BWD_K(T, NAME, reg, KM)

// The team forward (rows_fwd_team), K packs per thread.
#define ROWS_TEAM_FWD(T, NAME, KM)                                                              \
    extern "C" __global__ void layer_norm_fwd_team##KM##_##NAME(                                 \
        const T* x, T* y, const float* w, const float* b, float* mean, float* rstd, i64 rows,   \
        int cols, float eps, int tpr) {                                                         \
        rows_fwd_team<T, true, KM>(x, y, w, b, mean, rstd, rows, cols, eps, tpr);              \
    }                                                                                           \
    extern "C" __global__ void rms_norm_fwd_team##KM##_##NAME(const T* x, T* y, const float* w, \
                                                           float* rstd, i64 rows, int cols,     \
                                                           float eps, int tpr) {                \
        rows_fwd_team<T, false, KM>(x, y, w, 0, 0, rstd, rows, cols, eps, tpr);                \
    }
#define ROWS_TEAM_BWD(T, NAME, KM) ROWS_BWD_K(T, NAME, team, KM)
#define ROWS_TEAM_ENTRIES(T, NAME)                                                              \
    ROWS_TEAM_FWD(T, NAME, 1) ROWS_TEAM_FWD(T, NAME, 2) ROWS_TEAM_FWD(T, NAME, 4)               \
    ROWS_TEAM_FWD(T, NAME, 8) ROWS_TEAM_BWD(T, NAME, 1) ROWS_TEAM_BWD(T, NAME, 2)               \
    ROWS_TEAM_BWD(T, NAME, 4)

// The register-resident kernels run f16/bf16 rows only with one pack per lane (at most 32
// packs: src/ops/rows/cuda.rs `fwd_prefers_reg`, `reg_instantiated`; longer rows were faster
// through the block-per-row forward and the long-rows backward on the H200 and the H100), so only
// f32 has them with 2 and 4 packs per lane.
#define ROWS_REG_ENTRIES_K(T, NAME) ROWS_REG_FWD(T, NAME, 1) ROWS_REG_BWD(T, NAME, 1)

CUNORM_FOR_DTYPES(ROWS_ENTRIES)
CUNORM_FOR_DTYPES(ROWS_WIDE_ENTRIES)
CUNORM_FOR_DTYPES(ROWS_REG_ENTRIES_K)
CUNORM_FOR_DTYPES(ROWS_TEAM_ENTRIES)
CUNORM_FOR_DTYPES(ROWS_CLUSTER_ENTRIES)
#if CUNORM_WITH_F32
ROWS_REG_FWD(float, f32, 2)
ROWS_REG_FWD(float, f32, 4)
ROWS_REG_BWD(float, f32, 2)
ROWS_REG_BWD(float, f32, 4)
#endif

