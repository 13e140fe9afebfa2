// rows.cu: LayerNorm and RMSNorm over contiguous rows of `cols` elements.
#include "common.cuh"

// Forward. One block per row, grid-stride over rows; threads map to 16-byte packs (scalar
// path when the row is misaligned or cols is not a multiple of the pack). Statistics are f32
// Welford (LayerNorm) or a sum of squares (RMSNorm), merged in a fixed tree. With `cache` the
// row stays in shared memory (f32) between the two passes: x is read from DRAM once.
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
                    if (CENTER) welford_add(acc, v); else ss += v * v;
                }
            }
        } else {
            for (int j = threadIdx.x; j < cols; j += blockDim.x) {
                T raw = xr[j];
                float v = to_float(raw);
                if (CENTER) welford_add(acc, v); else ss += v * v;
                if (cache) row_cache[j] = raw;
            }
        }
        float mean = 0.f, rstd, t_m2;
        if (CENTER) {
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
            u = w ? g * w[j] : g;
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

// out[j] = Σ_p part[p·cols + j], p in order: the deterministic end of every column reduction.
extern "C" __global__ void rows_col_sum_f32(const float* __restrict__ part, float* __restrict__ out,
                                       int parts, int cols) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= cols) return;
    float s = 0.f;
    for (int p = 0; p < parts; ++p) s += part[(i64)p * cols + j];
    out[j] = s;
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

CUNORM_FOR_DTYPES(ROWS_ENTRIES)
