// rows.cu: LayerNorm and RMSNorm over contiguous rows of `cols` elements.
#include "common.cuh"

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
template <typename T, bool CENTER>
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
        i64 in_cycle;
        div_of(row, dcycle, &in_cycle);
        const int p0 = (int)in_cycle * (cols / seg);
        // With the row cached, LayerNorm/GroupNorm statistics take two passes (Σx, then
        // Σ(x − mean)² over the thread's own cached values): no division per element. Without,
        // one Welford pass over DRAM.
        const bool two_pass = CENTER && cache;
        Welford acc = welford_empty();
        float ss = 0.f;
        if (vec) {
            const Pack<T>* xp = reinterpret_cast<const Pack<T>*>(xr);
            for (int p = threadIdx.x; p < cols / PN; p += blockDim.x) {
                Pack<T> pk = xp[p];
                if (cache) reinterpret_cast<Pack<T>*>(row_cache)[p] = pk;
#pragma unroll
                for (int i = 0; i < PN; ++i) {
                    float v = to_float(pk.v[i]);
                    if (two_pass) ss += v;
                    else if (CENTER) welford_add(acc, v);
                    else ss += v * v;
                }
            }
        } else {
            for (int j = threadIdx.x; j < cols; j += blockDim.x) {
                T raw = xr[j];
                float v = to_float(raw);
                if (two_pass) ss += v;
                else if (CENTER) welford_add(acc, v);
                else ss += v * v;
                if (cache) row_cache[j] = raw;
            }
        }
        float mean = 0.f, rstd, t_m2;
        if (two_pass) {
            mean = block_reduce_sum(ss, reinterpret_cast<float*>(scratch)) / (float)cols;
            float m2 = 0.f;
            if (vec) {
                for (int p = threadIdx.x; p < cols / PN; p += blockDim.x) {
                    const Pack<T> pk = reinterpret_cast<const Pack<T>*>(row_cache)[p];
#pragma unroll
                    for (int i = 0; i < PN; ++i) {
                        const float d = to_float(pk.v[i]) - mean;
                        m2 += d * d;
                    }
                }
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
            for (int p = threadIdx.x; p < cols / PN; p += blockDim.x) {
                Pack<T> in, out;
                in = cache ? reinterpret_cast<const Pack<T>*>(row_cache)[p] : xp[p];
#pragma unroll
                for (int i = 0; i < PN; ++i) {
                    int j = p * PN + i;
                    int q = p0 + (seg == 1 ? j : j / seg);
                    float v = to_float(in.v[i]);
                    float o = (v - mean) * rstd;
                    if (w) o *= w[q];
                    if (b) o += b[q];
                    out.v[i] = from_float<T>(o);
                }
                yp[p] = out;
            }
        } else {
            for (int j = threadIdx.x; j < cols; j += blockDim.x) {
                int q = p0 + j / seg;
                float v = to_float(cache ? row_cache[j] : xr[j]);
                float o = (v - mean) * rstd;
                if (w) o *= w[q];
                if (b) o += b[q];
                yr[j] = from_float<T>(o);
            }
        }
    }
}

// Backward. Block p of gridDim.x handles rows p, p + gridDim.x, ...; per row two block sums
// (Σu and Σu·x̂ with u = dy·w), then dx = rstd·(u − mean(u) − x̂·mean(u·x̂)) (RMSNorm: no
// mean(u) term, x̂ = x·rstd). Per column the block accumulates Σ dy·x̂ and Σ dy over its rows
// (in registers when cols ≤ 8·blockDim.x, else in its own row of the partial buffers) and
// writes them to row p of dw_part/db_part; rows_col_sum_f32 adds the rows in a fixed order.
// Bytes: dy and x read (twice, the second from L1/L2), dx written.
#define ROWS_BWD_REGS 8
template <typename T, bool CENTER>
__device__ __forceinline__ void rows_bwd(const T* __restrict__ dy, const T* __restrict__ x,
                                         const float* __restrict__ w,
                                         const float* __restrict__ mean,
                                         const float* __restrict__ rstd, T* __restrict__ dx,
                                         float* __restrict__ dw_part, float* __restrict__ db_part,
                                         i64 rows, int cols) {
    __shared__ float scratch[32];
    float* pw = dw_part + (i64)blockIdx.x * cols;
    float* pb = db_part + (i64)blockIdx.x * cols;
    const bool regs = cols <= ROWS_BWD_REGS * (int)blockDim.x;
    float aw[ROWS_BWD_REGS], ab[ROWS_BWD_REGS];
#pragma unroll
    for (int k = 0; k < ROWS_BWD_REGS; ++k) {
        aw[k] = 0.f;
        ab[k] = 0.f;
    }
    if (!regs) {
        for (int j = threadIdx.x; j < cols; j += blockDim.x) {
            pw[j] = 0.f;
            pb[j] = 0.f;
        }
    }
    for (i64 row = blockIdx.x; row < rows; row += gridDim.x) {
        const T* gr = dy + row * (i64)cols;
        const T* xr = x + row * (i64)cols;
        T* dr = dx + row * (i64)cols;
        const float mu = CENTER ? mean[row] : 0.f, rs = rstd[row];
        // Per element: g = dy, x̂, u = g·w; row sums Σu, Σu·x̂; column sums Σg·x̂, Σg.
        auto terms = [&](int j, float& g, float& xh, float& u) {
            g = to_float(gr[j]);
            xh = (to_float(xr[j]) - mu) * rs;
            u = w ? __fmul_rn(g, w[j]) : g;  // rounded alone: see rows_bwd_reg
        };
        float s1 = 0.f, s2 = 0.f;
        auto accumulate = [&](int j, float& cw, float& cb) {
            float g, xh, u;
            terms(j, g, xh, u);
            s1 += u;
            s2 += u * xh;
            cw += g * xh;
            cb += g;
        };
        if (regs) {
#pragma unroll
            for (int k = 0; k < ROWS_BWD_REGS; ++k) {
                int j = threadIdx.x + k * blockDim.x;
                if (j < cols) accumulate(j, aw[k], ab[k]);
            }
        } else {
            for (int j = threadIdx.x; j < cols; j += blockDim.x) accumulate(j, pw[j], pb[j]);
        }
        s1 = block_reduce_sum(s1, scratch);
        s2 = block_reduce_sum(s2, scratch);
        const float m1 = CENTER ? s1 / (float)cols : 0.f, m2 = s2 / (float)cols;
        for (int j = threadIdx.x; j < cols; j += blockDim.x) {
            float g, xh, u;
            terms(j, g, xh, u);
            dr[j] = from_float<T>(rs * (u - m1 - xh * m2));
        }
    }
    if (regs) {
#pragma unroll
        for (int k = 0; k < ROWS_BWD_REGS; ++k) {
            int j = threadIdx.x + k * blockDim.x;
            if (j < cols) {
                pw[j] = aw[k];
                pb[j] = ab[k];
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
#pragma unroll
                for (int i = 0; i < PN; ++i) {
                    const bool in = j0 + i < cols;
                    float v = (to_float(r[k].v[i]) - mean) * rstd;
                    if (w) v *= in ? w[j0 + i] : 0.f;
                    if (b) v += in ? b[j0 + i] : 0.f;
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

// Backward: per row Σu and Σu·x̂ (u = dy·w, x̂ = (x − mean)·rstd), dx = rstd·(u − Σu/n −
// x̂·Σu·x̂/n) (RMSNorm: no Σu/n term) from the registers. Per owned column the thread adds dy·x̂
// and dy over the team's rows in the team's slice of shared memory (2·cols floats: only the
// owning thread touches a column, so no barrier), then writes them to row (team index) of
// dw_part/db_part for rows_col_sum_f32. u is rounded on its own (__fmul_rn): a fused
// multiply-add would leave the product's rounding error in u − Σu/n, which a row of one element
// turns into a nonzero dx.
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
                float cw[PN], cb[PN];
#pragma unroll
                for (int i = 0; i < PN; ++i) {
                    const float g = to_float(rg[k].v[i]);  // zero past cols
                    const float xh = (to_float(rx[k].v[i]) - mu) * rs;
                    const float u = w ? __fmul_rn(g, j0 + i < cols ? w[j0 + i] : 0.f) : g;
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
#pragma unroll
                for (int i = 0; i < PN; ++i) {
                    const float g = to_float(rg[k].v[i]);
                    const float xh = (to_float(rx[k].v[i]) - mu) * rs;
                    const float u = w ? __fmul_rn(g, j0 + i < cols ? w[j0 + i] : 0.f) : g;
                    o.v[i] = from_float<T>(rs * (u - m1 - xh * m2));
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
    extern "C" __global__ void layer_norm_bwd_##NAME(                                           \
        const T* dy, const T* x, const float* w, const float* mean, const float* rstd, T* dx,   \
        float* dw_part, float* db_part, i64 rows, int cols) {                                   \
        rows_bwd<T, true>(dy, x, w, mean, rstd, dx, dw_part, db_part, rows, cols);             \
    }                                                                                           \
    extern "C" __global__ void rms_norm_bwd_##NAME(const T* dy, const T* x, const float* w,    \
                                                   const float* rstd, T* dx, float* dw_part,    \
                                                   float* db_part, i64 rows, int cols) {        \
        rows_bwd<T, false>(dy, x, w, 0, rstd, dx, dw_part, db_part, rows, cols);               \
    }

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

#define ROWS_REG_BWD(T, NAME, KM)                                                               \
    extern "C" __global__ void layer_norm_bwd_reg##KM##_##NAME(                                  \
        const T* dy, const T* x, const float* w, const float* mean, const float* rstd, T* dx,   \
        float* dw_part, float* db_part, i64 rows, int cols, int tpr, int k) {                   \
        rows_bwd_reg<T, true, KM>(dy, x, w, mean, rstd, dx, dw_part, db_part, rows, cols, tpr, \
                                  k);                                                           \
    }                                                                                           \
    extern "C" __global__ void rms_norm_bwd_reg##KM##_##NAME(                                    \
        const T* dy, const T* x, const float* w, const float* rstd, T* dx, float* dw_part,      \
        float* db_part, i64 rows, int cols, int tpr, int k) {                                   \
        rows_bwd_reg<T, false, KM>(dy, x, w, 0, rstd, dx, dw_part, db_part, rows, cols, tpr,   \
                                   k);                                                          \
    }

// The forward runs the register-resident kernel for f16/bf16 only with one pack per lane
// (src/ops/rows/cuda.rs `fwd_prefers_reg`), so only f32 has the forward with 2 and 4.
#define ROWS_REG_ENTRIES_K(T, NAME)                                                             \
    ROWS_REG_FWD(T, NAME, 1) ROWS_REG_BWD(T, NAME, 1) ROWS_REG_BWD(T, NAME, 2)                 \
    ROWS_REG_BWD(T, NAME, 4)

CUNORM_FOR_DTYPES(ROWS_ENTRIES)
CUNORM_FOR_DTYPES(ROWS_REG_ENTRIES_K)
ROWS_REG_FWD(float, f32, 2)
ROWS_REG_FWD(float, f32, 4)

