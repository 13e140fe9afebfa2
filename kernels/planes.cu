// cunorm-module: per-dtype
// planes.cu: BatchNorm, InstanceNorm and GroupNorm on an (N, C, S) view, contiguous (NCHW:
// plane (n, c) is S consecutive elements) or channels-last (NHWC: element (n, s, c) at
// (n·S + s)·C + c). Statistic groups: G == 0 means one group per channel over the batch
// (BatchNorm, and fixed running statistics); G > 0 means group n·G + c/(C/G) (GroupNorm;
// InstanceNorm is G = C).
//
// Stages (one launch each; partials are merged in a fixed order, no atomics: deterministic).
// Entry points are planes_<stage>_<dtype>:
//   forward:  planes_stats -> planes_finalize -> [planes_running_update] -> planes_coef -> planes_apply
//   eval:     planes_eval_stats -> planes_coef -> planes_apply
//   backward: planes_coef -> planes_grad_sums -> planes_grad_finalize, planes_grad_params
//             -> planes_grad_apply
// Channels-last GroupNorm/InstanceNorm with input statistics, where a (sample, channel tile)
// slice fits on chip, in one pass instead:
//   forward:  planes_tile_fwd -> [planes_running_update]
//   backward: planes_tile_bwd -> planes_grad_params
// and so for contiguous GroupNorm/InstanceNorm backward (planes_tile_bwd_contig -> planes_grad_params;
// their forward is the row kernel of rows.cu).
// Partials are indexed (n·C + c)·chunks + k: chunk k of the spatial range of plane (n, c), or,
// with P planes a block (BatchNorm, contiguous), (nb·C + c)·chunks + k: planes nb·P .. nb·P + P − 1
// of channel c; the kernels after the reduction then take ⌈N / P⌉ as their N where G == 0.
#include "common.cuh"

__device__ __forceinline__ int group_of(i64 n, int c, int C, int G) {
    return G == 0 ? c : (int)(n * G + c / (C / G));
}

// Spatial range of chunk k: [k·len, min(S, (k+1)·len)), len a multiple of the pack size `pn`
// (a power of two).
__device__ __forceinline__ void chunk_range(i64 S, int chunks, int k, int pn, i64* s0, i64* s1) {
    i64 len = div_of(S + chunks - 1, fast_div(chunks));
    len = (len + pn - 1) & ~(i64)(pn - 1);
    *s0 = min(S, (i64)k * len);
    *s1 = min(S, *s0 + len);
}

// ---------------------------------------------------------------------------------------------
// Stage A: per-(plane, chunk) partials.
// Contiguous: one block (256 threads) per (P planes of a channel, chunk), 16-byte packs when S
// allows; P = 1 but for per-channel statistics (BatchNorm) of whole planes. Channels-last takes
// P = 1 (its entry points have the argument for a uniform launch).
// Channels-last: grid (N·chunks, channel tiles), block (TW, 256/TW): thread (tx, ty) takes the
// 16-byte pack of channels blockIdx.y·TW + tx and rows ty, ty + 256/TW, ... of the chunk, then
// the row-partials of a channel are merged in order through shared memory.
// Bytes: x (and dy) read once.
// ---------------------------------------------------------------------------------------------

// Accumulator interface: Welford for statistics, (Σg, Σg·(x − m)) for gradients.
struct StatAcc {
    Welford w;
    __device__ __forceinline__ void init() { w = welford_empty(); }
    __device__ __forceinline__ void add(float x, float) { welford_add(w, x); }
    __device__ __forceinline__ void merge(const StatAcc& o) { w = welford_merge(w, o.w); }
    __device__ __forceinline__ void store(float* p) const { p[0] = w.n; p[1] = w.mean; p[2] = w.m2; }
    static const int WIDTH = 3;
};

struct GradAcc {
    float sg, sgx, m;
    __device__ __forceinline__ void init() { sg = 0.f; sgx = 0.f; }
    __device__ __forceinline__ void add(float x, float g) { sg += g; sgx += g * (x - m); }
    __device__ __forceinline__ void merge(const GradAcc& o) { sg += o.sg; sgx += o.sgx; }
    __device__ __forceinline__ void store(float* p) const { p[0] = sg; p[1] = sgx; }
    static const int WIDTH = 2;
};

// Loads each thread issues before using any, in the reduction loops.
#define UNROLL 4

// The contiguous statistics of one loop iteration's values (at most UNROLL·PN of one plane),
// shifted by the first of them, s: Σ(x − s) and Σ(x − s)² in f32, three
// instructions a value where a Welford update costs a division and two finiteness tests (which
// made the statistics passes compute-bound: 21–27 % of DRAM bandwidth on an H200). The run is
// folded into the thread's Welford by Chan's merge. No cancellation: s is one of the c values,
// so Σ(x − s)² = m2 + c·(mean − s)² ≤ (c + 1)·m2, and the subtraction loses at most
// log2(c + 1) bits. A run whose squares are not finite (a NaN, an infinity, or values near the
// float range) is not folded: the caller replays it through welford_add, which gives PyTorch's
// non-finite results.
struct ShiftRun {
    float s, s1, s2;
    __device__ __forceinline__ void begin(float x0) {
        s = x0;
        s1 = 0.f;
        s2 = 0.f;
    }
    __device__ __forceinline__ void add(float x) {
        const float d = x - s;
        s1 += d;
        s2 = fmaf(d, d, s2);
    }
    // Folds the run's c values into w; false, w untouched, when they must be replayed.
    __device__ __forceinline__ bool fold(Welford& w, float c) const {
        if (!is_finite(s2)) return false;
        Welford r;
        const float q = s1 / c;
        r.n = c;
        r.mean = s + q;
        r.m2 = fmaxf(0.f, s2 - s1 * q);
        w = welford_merge(w, r);
        return true;
    }
};

// Adds the run of values v(0), ..., v(cnt − 1) (cnt ≤ N, at least 1) to w: folded as a
// ShiftRun, or replayed value by value through welford_add when the run is not finite.
template <int N, typename V>
__device__ __forceinline__ void welford_add_run(Welford& w, int cnt, V v) {
    ShiftRun run;
    run.begin(v(0));
#pragma unroll
    for (int e = 0; e < N; ++e)
        if (e < cnt) run.add(v(e));
    if (!run.fold(w, (float)cnt)) {
#pragma unroll
        for (int e = 0; e < N; ++e)
            if (e < cnt) welford_add(w, v(e));
    }
}

// Statistics of M series that see the same number of values (a channels-last thread's PN
// channels), kept as a Welford per series (where the caller keeps it: the channels-last
// statistics keep theirs in shared memory) and, in registers, a run of shifted sums Σ(x − s),
// Σ(x − s)² per series, s the run's first value of that series: ShiftRun's three instructions a
// value, but folded every RUN_VALUES values (and at the end of the range) instead of every
// UNROLL, by a Chan merge whose ratios the series share (one division a run for all of them).
// Folding every UNROLL rows kept the channels-last statistics compute-bound (f16 [64, 256, 56,
// 56]: 96 µs, 23 % of DRAM bandwidth on an H200; 61 µs with these runs). No cancellation, as
// ShiftRun: s is one of the run's c values, so the subtraction loses at most log2(c + 1) bits (7
// for a run of 128). A series whose run is not finite (a NaN, an infinity, or squares beyond the
// float range) is not folded: the caller replays that run through welford_add, which gives
// PyTorch's non-finite results. (The contiguous statistics keep ShiftRun: runs of 128 there
// made BatchNorm2d f32 [64, 256, 56, 56] 5 % slower on the H200, its registers 46 → 56.)
template <int M>
struct RunStats {
    float n, c;  // values folded; values in the current run (the same for every series)
    float sh[M], a[M], b[M];
    __device__ __forceinline__ void init() {
        n = 0.f;
        c = 0.f;
#pragma unroll
        for (int i = 0; i < M; ++i) {
            sh[i] = 0.f;
            a[i] = 0.f;
            b[i] = 0.f;
        }
    }
    __device__ __forceinline__ void add(int i, float x) {
        const float d = x - sh[i];
        a[i] += d;
        b[i] = fmaf(d, d, b[i]);
    }
    // Folds the run into the Welfords w(0), ..., w(M − 1) (each of n values, wherever the caller
    // keeps them: registers, or shared memory to spare registers); `replay(i, w(i))` adds the
    // run's values of series i by welford_add where its run is not finite. Starts an empty run.
    template <typename W, typename Replay>
    __device__ __forceinline__ void fold(W w, Replay replay) {
        if (c == 0.f) return;
        const float total = n + c, ic = 1.f / c, r = c / total, nr = n * r, keep = n / total;
#pragma unroll
        for (int i = 0; i < M; ++i) {
            Welford& wi = w(i);
            if (is_finite(b[i])) {
                const float q = a[i] * ic, rmean = sh[i] + q, rm2 = fmaxf(0.f, fmaf(-a[i], q, b[i]));
                const float d = rmean - wi.mean;
                if (is_finite(wi.mean)) {  // as welford_merge (n = 0: mean 0, so rmean, rm2)
                    wi.mean = fmaf(d, r, wi.mean);
                    wi.m2 = wi.m2 + rm2 + d * (d * nr);  // d·(d·0) = 0 when n = 0
                } else {
                    wi.mean = wi.mean * keep + rmean * r;
                    wi.m2 = wi.m2 + rm2 + d * 0.f;
                }
                wi.n = total;
            } else {
                replay(i, wi);
            }
            a[i] = 0.f;
            b[i] = 0.f;
        }
        n = total;
        c = 0.f;
    }
};

// Values of a series in one run of RunStats: a run folds once it holds this many. The kernel
// emulator builds with runs of 8 (scripts/kernel-emu/run.sh), so that its small shapes fold
// several runs a thread.
#ifndef RUN_VALUES
#define RUN_VALUES 128
#endif

// The channels-last reduction's loop over one thread's rows of a chunk (planes_reduce), once
// with 16-byte loads (VEC: UNROLL rows in flight) and once with scalar ones (a row at a time): in
// one loop, or with UNROLL rows of scalars, the scalar path's registers cost the vector path its
// occupancy. Statistics fold into the thread's slots of `tile`; gradient sums add to acc.
template <typename T, typename Acc, bool GRAD, bool VEC>
__device__ __forceinline__ void planes_cl_rows(const T* __restrict__ x, const T* __restrict__ dy,
                                               i64 n, int C, i64 S, int c0, i64 s0, i64 s1,
                                               int RH, Acc* acc, RunStats<Pack<T>::N>& st,
                                               Acc* tile, int slot) {
    const int PN = Pack<T>::N;
    constexpr int U = VEC ? UNROLL : 1;  // rows in flight
    const i64 step = RH;
    i64 srun = 0;
#pragma unroll 1
    for (i64 s = s0 + threadIdx.y; s < s1; s += U * step) {
        Pack<T> xv[U], gv[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (s + u * step < s1) {
                const i64 e = (n * S + s + u * step) * C + c0;
                if constexpr (VEC) {
                    xv[u] = *reinterpret_cast<const Pack<T>*>(x + e);
                    if (GRAD) gv[u] = *reinterpret_cast<const Pack<T>*>(dy + e);
                } else {
#pragma unroll
                    for (int i = 0; i < PN; ++i) {
                        const bool in = c0 + i < C;
                        xv[u].v[i] = in ? x[e + i] : from_float<T>(0.f);
                        if (GRAD) gv[u].v[i] = in ? dy[e + i] : from_float<T>(0.f);
                    }
                }
            }
        }
        if constexpr (GRAD) {
#pragma unroll
            for (int u = 0; u < U; ++u)
                if (s + u * step < s1) {
#pragma unroll
                    for (int i = 0; i < PN; ++i)
                        acc[i].add(to_float(xv[u].v[i]), to_float(gv[u].v[i]));
                }
        } else {
            // This iteration's rows: a prefix of the U, all but in the last.
            int cnt = 0;
#pragma unroll
            for (int u = 0; u < U; ++u) cnt += s + u * step < s1 ? 1 : 0;
            if (st.c == 0.f) {
                srun = s;
#pragma unroll
                for (int i = 0; i < PN; ++i) st.sh[i] = to_float(xv[0].v[i]);
            }
            if (cnt == U) {
#pragma unroll
                for (int u = 0; u < U; ++u)
#pragma unroll
                    for (int i = 0; i < PN; ++i) st.add(i, to_float(xv[u].v[i]));
            } else {
#pragma unroll
                for (int u = 0; u < U; ++u)
                    if (u < cnt) {
#pragma unroll
                        for (int i = 0; i < PN; ++i) st.add(i, to_float(xv[u].v[i]));
                    }
            }
            st.c += (float)cnt;
            if (st.c >= RUN_VALUES || s + U * step >= s1) {
                // Channel i's rows of the run again, from global memory (just read).
                st.fold([&](int i) -> Welford& { return tile[slot + i].w; }, [&](int i, Welford& w) {
                    const int runc = (int)st.c;
#pragma unroll 1
                    for (int j = 0; j < runc; ++j) {
                        const i64 e = (n * S + srun + j * step) * C + c0 + i;
                        welford_add(w, c0 + i < C ? to_float(x[e]) : 0.f);
                    }
                });
            }
        }
    }
}

// The W values at p: one 16-byte load (W = Pack<T>::N) or one scalar (W = 1), as values of T
// (the statistics' loop: as words, planes_stats_f16 took 72 registers instead of 50, the f16
// conversions of a run kept live for its replay).
template <typename T, int W>
__device__ __forceinline__ void load_unit(T (&v)[W], const T* __restrict__ p) {
    if constexpr (W == 1) {
        v[0] = *p;
    } else {
        const Pack<T> q = *reinterpret_cast<const Pack<T>*>(p);
#pragma unroll
        for (int i = 0; i < W; ++i) v[i] = q.v[i];
    }
}

// W values of T as loaded (the elementwise loop): W = Pack<T>::N held as four 32-bit words (one
// 16-byte access, and no 16-bit register per value), W = 1 as one T.
template <typename T, int W>
struct Unit {
    Pack<unsigned> r;
    __device__ __forceinline__ void load(const T* __restrict__ p) { r = *reinterpret_cast<const Pack<unsigned>*>(p); }
    __device__ __forceinline__ void floats(float (&f)[W]) const { unpack_words<T>(r, f); }
    static __device__ __forceinline__ void store(T* __restrict__ p, const float (&f)[W]) {
        *reinterpret_cast<Pack<unsigned>*>(p) = pack_words<T>(f);
    }
};
template <typename T>
struct Unit<T, 1> {
    T v;
    __device__ __forceinline__ void load(const T* __restrict__ p) { v = *p; }
    __device__ __forceinline__ void floats(float (&f)[1]) const { f[0] = to_float(v); }
    static __device__ __forceinline__ void store(T* __restrict__ p, const float (&f)[1]) { *p = from_float<T>(f[0]); }
};

// Where a thread's units lie (a unit: W = Pack<T>::N elements, one 16-byte load, or W = 1),
// stepped by the grid stride without a division per unit: the first element e of the unit is at
// offset r of plane p (contiguous: e = p·S + r), or at channel c, position s of sample n
// (channels-last: e = (n·S + s)·C + c, plane n·C + c). A step of D elements is split once into
// the same parts (dc < C, ds < S, dr < S), so one carry a level keeps every part in range.
template <bool CL>
struct UnitWalk {
    i64 n, s, c;     // contiguous: n = plane, s = offset, c unused
    i64 dn, ds, dc;  // the step's parts
    __device__ __forceinline__ void split(i64 e, FastDiv fc, FastDiv fs, i64& a, i64& b, i64& k) {
        if constexpr (CL) {
            const i64 ns = div_of(e, fc, &k);
            a = div_of(ns, fs, &b);
        } else {
            a = div_of(e, fs, &b);
            k = 0;
        }
    }
    __device__ __forceinline__ void init(i64 e, i64 step, FastDiv fc, FastDiv fs) {
        split(e, fc, fs, n, s, c);
        split(step, fc, fs, dn, ds, dc);
    }
    __device__ __forceinline__ void next(i64 C, i64 S) {
        if constexpr (CL) {
            c += dc;
            s += ds;
            if (c >= C) {
                c -= C;
                ++s;
            }
        } else {
            s += ds;
        }
        n += dn;
        if (s >= S) {
            s -= S;
            ++n;
        }
    }
    __device__ __forceinline__ i64 plane(i64 C) const { return CL ? n * C + c : n; }
};

// The contiguous reduction's loop: np ranges of L units of W values each (W = Pack<T>::N:
// 16-byte packs; W = 1: scalars), range j at xp + j·stride (gp likewise), read as one sequence
// of np·L units: thread t takes units t, t + B, t + 2B, ... (B = blockDim.x), UNROLL loaded
// before any is used (several loads in flight, across range boundaries too). The unit's
// (range, offset) is stepped as the elementwise loop's (plane, offset): UnitWalk, no division in
// the loop.
template <typename T, typename Acc, bool GRAD, int W>
__device__ __forceinline__ void planes_contig_units(const T* __restrict__ xp, const T* __restrict__ gp,
                                                    int np, i64 L, i64 stride, Acc& acc) {
    if (L <= 0) return;
    UnitWalk<false> w;  // n: the range j, s: the offset in units
    w.init(threadIdx.x, blockDim.x, fast_div(1), fast_div(L));
#pragma unroll 1
    while (w.n < np) {
        T xv[UNROLL][W], gv[UNROLL][W];
        int cnt = 0;  // units in range: a prefix of the UNROLL
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            if (w.n < np) {
                const i64 e = w.n * stride + w.s * W;
                load_unit<T, W>(xv[u], xp + e);
                if (GRAD) load_unit<T, W>(gv[u], gp + e);
                ++cnt;
            }
            w.next(1, L);
        }
        if constexpr (GRAD) {
#pragma unroll
            for (int u = 0; u < UNROLL; ++u)
                if (u < cnt) {
#pragma unroll
                    for (int i = 0; i < W; ++i) acc.add(to_float(xv[u][i]), to_float(gv[u][i]));
                }
        } else {
            welford_add_run<UNROLL * W>(acc.w, cnt * W, [&](int e) { return to_float(xv[e / W][e % W]); });
        }
    }
}

// GRAD = false: x only (StatAcc). GRAD = true: x and dy, shift m per plane (GradAcc).
// CL: the channels-last layout, a separate entry point (its per-channel accumulators would
// otherwise raise the contiguous path's register count, and with it cut its occupancy).
template <typename T, typename Acc, bool GRAD, bool CL>
__device__ __forceinline__ void planes_reduce(const T* __restrict__ x, const T* __restrict__ dy,
                                              const float* __restrict__ mplane,
                                              float* __restrict__ part, i64 N, int C, i64 S,
                                              int chunks, int P) {
    if constexpr (!CL) {
        // Contiguous: block b takes chunk k = b % chunks of the planes (n, c), n = nb·P .. nb·P
        // + P − 1 (those below N), where b / chunks = nb·C + c: P planes of one channel (the
        // host picks P > 1 only for per-channel statistics, G == 0, and whole planes) folded
        // into one partial, indexed (nb·C + c)·chunks + k. One block merge per P planes: with a
        // block per plane, BatchNorm2d [64, 256, 56, 56] gave each thread about three packs and
        // spent most of its time merging (planes_stats_f16 15 % of DRAM bandwidth, 84 % SM busy
        // on an H200).
        const int PN = Pack<T>::N;
        __shared__ Acc scratch[32];
        const int pg = (int)(blockIdx.x / (unsigned)chunks);
        const int k = (int)(blockIdx.x - (unsigned)pg * (unsigned)chunks);
        const int nb = pg / C, c = pg - nb * C;
        const i64 n0 = (i64)nb * P;
        const int np = (int)min((i64)P, N - n0);
        const i64 plane0 = n0 * C + c;
        const bool vec = ((S & (PN - 1)) == 0) && aligned16(x) && (!GRAD || aligned16(dy));
        i64 s0, s1;
        chunk_range(S, chunks, k, vec ? PN : 1, &s0, &s1);
        const T* xp = x + plane0 * S + s0;
        const T* gp = GRAD ? dy + plane0 * S + s0 : 0;
        Acc acc;
        acc.init();
        if constexpr (GRAD) acc.m = mplane[plane0];
        if (vec) planes_contig_units<T, Acc, GRAD, Pack<T>::N>(xp, gp, np, (s1 - s0) / PN, (i64)C * S, acc);
        else planes_contig_units<T, Acc, GRAD, 1>(xp, gp, np, s1 - s0, (i64)C * S, acc);
        acc = block_merge(acc, scratch);
        if (threadIdx.x == 0) acc.store(part + ((i64)pg * chunks + k) * Acc::WIDTH);
    } else {
        // Channels-last: block (TW, RH), TW·RH = 256, TW a power of two ≤ 32 chosen by the host
        // from C alone. Thread (tx, ty) owns the PN channels of pack blockIdx.y·TW + tx and rows
        // ty, ty + RH, ... of the chunk: one vector load per row when C % PN == 0 (else PN
        // scalar loads), UNROLL rows in flight. The RH row-partials of a channel are then merged
        // in order through shared memory.
        // The statistics keep their Welfords (RunStats' folded state) in the tile, each thread
        // in its own slots until the merge: only the runs (three floats a channel) in registers.
        const int PN = Pack<T>::N;
        __shared__ Acc tile[256 * PN];
        const int TW = blockDim.x, RH = blockDim.y;
        const i64 n = blockIdx.x / chunks;
        const int k = blockIdx.x % chunks;
        const int c0 = (blockIdx.y * TW + threadIdx.x) * PN;
        const bool vec = (C % PN == 0) && aligned16(x) && (!GRAD || aligned16(dy));
        i64 s0, s1;
        chunk_range(S, chunks, k, 1, &s0, &s1);
        Acc acc[PN];
#pragma unroll
        for (int i = 0; i < PN; ++i) {
            acc[i].init();
            if constexpr (GRAD) acc[i].m = c0 + i < C ? mplane[n * C + c0 + i] : 0.f;
        }
        const int slot = (threadIdx.y * TW + threadIdx.x) * PN;
        RunStats<PN> st;  // statistics only
        st.init();
        if constexpr (!GRAD) {
#pragma unroll
            for (int i = 0; i < PN; ++i) tile[slot + i].init();
        }
        if (c0 < C) {
            if (vec) planes_cl_rows<T, Acc, GRAD, true>(x, dy, n, C, S, c0, s0, s1, RH, acc, st, tile, slot);
            else planes_cl_rows<T, Acc, GRAD, false>(x, dy, n, C, S, c0, s0, s1, RH, acc, st, tile, slot);
        }
        // Rows merged by a fixed tree (row r takes row r + h, h = RH/2, RH/4, ..., 1): every
        // thread works, log2(RH) merges of its PN channels each, instead of one thread per
        // channel merging RH rows in sequence.
        if constexpr (GRAD) {
#pragma unroll
            for (int i = 0; i < PN; ++i) tile[slot + i] = acc[i];
        }
#pragma unroll 1
        for (int h = RH / 2; h > 0; h /= 2) {
            __syncthreads();
            if ((int)threadIdx.y < h) {
                const int other = ((threadIdx.y + h) * TW + threadIdx.x) * PN;
#pragma unroll
                for (int i = 0; i < PN; ++i) tile[slot + i].merge(tile[other + i]);
            }
        }
        __syncthreads();
        if (threadIdx.y == 0) {
#pragma unroll
            for (int i = 0; i < PN; ++i) {
                if (c0 + i >= C) break;
                tile[threadIdx.x * PN + i].store(part + ((n * C + c0 + i) * chunks + k) * Acc::WIDTH);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Stage B: per-group statistics, running statistics, per-plane coefficients (tiny kernels).
// ---------------------------------------------------------------------------------------------

// One block (FIN_THREADS threads, blockDim.y == 1) per group, or one warp per group (blockDim
// (32, FIN_WARPS): FIN_WARPS groups a block, which the host picks for groups of at most
// FIN_WARP_ITEMS partials): thread t merges the group's (plane, chunk) partials t, t + T, ...
// (T its threads) in index order, then they merge by a fixed butterfly (block_merge or
// warp_merge): deterministic, and no thread merges more than items / T partials (a BatchNorm
// channel of [256, 64, 112, 112] channels-last has 1 056). A warp a group spares the block-wide
// merge of 256 threads where most hold nothing: InstanceNorm's N·C groups of a few chunks each
// (16 384 blocks at [64, 256, 32, 32]; a 1 024-block finalize took 10 µs on an H200). Writes mean,
// rstd = 1/sqrt(biased var + eps) and the unbiased variance (for running statistics). With
// `nan_inf_mean` (GroupNorm) the mean of a group holding an infinity is NaN, as PyTorch's Welford
// merges make it; without (BatchNorm, InstanceNorm) it stays ±inf, as PyTorch's sums make it.
// The group's partials: BatchNorm (G == 0), items (n, k) at ((n·C + g)·chunks + k), N here the
// partial rows ⌈N / P⌉ of a channel (the host passes them); per sample,
// items (c − c0, k), consecutive from ((n·C + c0)·chunks).
#define FIN_THREADS 256
#define FIN_WARPS 8
#define FIN_WARP_ITEMS 256

// The group's threads' results merged: by the block (a block a group) or by the warp.
template <typename Acc>
__device__ __forceinline__ Acc group_merge(Acc a, Acc* scratch) {
    return blockDim.y == 1 ? block_merge(a, scratch) : warp_merge(a);
}
__device__ __forceinline__ float group_sum(float v, float* scratch) {
    return blockDim.y == 1 ? block_reduce_sum(v, scratch) : warp_reduce_sum(v);
}
__device__ __forceinline__ const float* group_part(const float* part, i64 g, i64 it, FastDiv dk,
                                                   i64 N, int C, int chunks, int G, int width) {
    if (G == 0) {
        i64 k;
        const i64 n = div_of(it, dk, &k);
        return part + ((n * C + g) * chunks + k) * width;
    }
    i64 g_in_n;
    const i64 n = div_of(g, fast_div(G), &g_in_n);
    const i64 c0 = g_in_n * (C / G);
    return part + ((n * C + c0) * chunks + it) * width;
}

extern "C" __global__ void planes_finalize_f32(const float* __restrict__ part, float* __restrict__ mean_g,
                                          float* __restrict__ rstd_g, float* __restrict__ varu_g,
                                          i64 N, int C, int chunks, int G, float eps,
                                          int nan_inf_mean) {
    __shared__ Welford scratch[32];
    const i64 gi = (i64)blockIdx.x * blockDim.y + threadIdx.y;
    if (gi >= (G == 0 ? (i64)C : N * G)) return;  // a warp's group past the last (warp mode)
    const i64 items = (G == 0 ? N : (i64)(C / G)) * chunks;
    const FastDiv dk = fast_div(chunks);
    Welford t = welford_empty();
#pragma unroll 1
    for (i64 it = threadIdx.x; it < items; it += blockDim.x) {
        const float* p = group_part(part, gi, it, dk, N, C, chunks, G, 3);
        Welford w;
        w.n = p[0]; w.mean = p[1]; w.m2 = p[2];
        t = welford_merge(t, w);
    }
    t = group_merge(t, scratch);
    if (threadIdx.x == 0) {
        mean_g[gi] = nan_inf_mean ? nan_if_inf(t.mean) : t.mean;
        rstd_g[gi] = rsqrtf(t.m2 / t.n + eps);
        varu_g[gi] = t.m2 / (t.n - 1.f);
    }
}

// One thread per channel: r = (1 − f)·r + f·stat. per_sample (InstanceNorm): the statistic is
// the batch average of the per-(n, c) values.
extern "C" __global__ void planes_running_update_f32(float* __restrict__ rm, float* __restrict__ rv,
                                          const float* __restrict__ mean_g,
                                          const float* __restrict__ varu_g, i64 N, int C,
                                          int per_sample, float factor) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float m, v;
    if (per_sample) {
        m = 0.f;
        v = 0.f;
        for (i64 n = 0; n < N; ++n) {
            m += mean_g[n * C + c];
            v += varu_g[n * C + c];
        }
        m /= (float)N;
        v /= (float)N;
    } else {
        m = mean_g[c];
        v = varu_g[c];
    }
    rm[c] = (1.f - factor) * rm[c] + factor * m;
    rv[c] = (1.f - factor) * rv[c] + factor * v;
}

// Fixed statistics (eval): mean = running_mean, rstd = 1/sqrt(running_var + eps).
extern "C" __global__ void planes_eval_stats_f32(const float* __restrict__ rm, const float* __restrict__ rv,
                                      float* __restrict__ mean_out, float* __restrict__ rstd_out,
                                      int C, float eps) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    mean_out[c] = rm[c];
    rstd_out[c] = rsqrtf(rv[c] + eps);
}

// One thread per plane (n, c): a = rstd·w_c, m = mean, k = b_c, so that y = a·(x − m) + k.
extern "C" __global__ void planes_coef_f32(const float* __restrict__ mean_g, const float* __restrict__ rstd_g,
                                      const float* __restrict__ w, const float* __restrict__ b,
                                      float* __restrict__ a, float* __restrict__ m,
                                      float* __restrict__ k, i64 N, int C, int G) {
    const i64 p = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= N * C) return;
    i64 c64;
    const i64 n = div_of(p, fast_div(C), &c64);
    const int c = (int)c64;
    const int g = group_of(n, c, C, G);
    a[p] = rstd_g[g] * (w ? w[c] : 1.f);
    m[p] = mean_g[g];
    k[p] = b ? b[c] : 0.f;
}

// Backward, a block or a warp per group (as planes_finalize_f32; NB = ⌈N / P⌉ partial rows a channel
// when G == 0, N is the batch): A = Σ w_c·Σg, B = Σ w_c·Σg(x − μ)
// over the group's partials; then for each plane b = −rstd³·B/cnt and k = −rstd·A/cnt (zero for
// fixed statistics), so that dx = a·dy + b·(x − μ) + k with a = rstd·w_c from planes_coef_f32.
extern "C" __global__ void planes_grad_finalize_f32(const float* __restrict__ part, const float* __restrict__ w,
                                         const float* __restrict__ rstd_g, float* __restrict__ bcoef,
                                         float* __restrict__ kcoef, i64 N, i64 NB, int C,
                                         i64 S, int chunks, int G, int from_input) {
    __shared__ float scratch[32];
    const i64 gi = (i64)blockIdx.x * blockDim.y + threadIdx.y;  // as planes_finalize_f32
    if (gi >= (G == 0 ? (i64)C : N * G)) return;
    const int D = G == 0 ? 1 : C / G;
    const i64 items = (G == 0 ? NB : (i64)D) * chunks;  // NB: a channel's partial rows (G == 0)
    const FastDiv dk = fast_div(chunks);
    i64 g_in_n = 0;
    const i64 n0 = G == 0 ? 0 : div_of(gi, fast_div(G), &g_in_n), n1 = G == 0 ? N : n0 + 1;
    const int c0 = G == 0 ? (int)gi : (int)g_in_n * D;
    float A = 0.f, B = 0.f;
#pragma unroll 1
    for (i64 it = threadIdx.x; it < items; it += blockDim.x) {
        const float* p = group_part(part, gi, it, dk, N, C, chunks, G, 2);
        const int c = G == 0 ? c0 : c0 + (int)div_of(it, dk);
        const float wc = w ? w[c] : 1.f;
        A += wc * p[0];
        B += wc * p[1];
    }
    A = group_sum(A, scratch);
    B = group_sum(B, scratch);
    const float r = rstd_g[gi];
    const float cnt = (float)((n1 - n0) * D) * (float)S;
    const float bb = from_input ? -r * r * r * B / cnt : 0.f;
    const float kk = from_input ? -r * A / cnt : 0.f;
    // The group's planes: (n, c0) for every n (BatchNorm), or (n0, c0 .. c0 + D − 1).
    const i64 planes = G == 0 ? N : D;
#pragma unroll 1
    for (i64 q = threadIdx.x; q < planes; q += blockDim.x) {
        const i64 pl = G == 0 ? q * C + c0 : n0 * C + c0 + q;
        bcoef[pl] = bb;
        kcoef[pl] = kk;
    }
}

// One block per channel: dw_c = Σ_n rstd(n, c)·Σg(x − μ), db_c = Σ_n Σg (N: ⌈N / P⌉ partial rows
// when G == 0, where rstd is the channel's); thread t takes the channel's (sample, chunk)
// partials t, t + blockDim.x, ... in index order, then a fixed-order block sum. (A thread per
// sample, each walking its chunks, left one thread walking all 1 056 chunks of a channel-last
// BatchNorm read as one sample.)
extern "C" __global__ void planes_grad_params_f32(const float* __restrict__ part, const float* __restrict__ rstd_g,
                                       float* __restrict__ dw, float* __restrict__ db, i64 N,
                                       int C, int chunks, int G) {
    __shared__ float scratch[32];
    const int c = blockIdx.x;
    if (c >= C) return;  // the whole block
    const FastDiv dk = fast_div(chunks);
    float sw = 0.f, sb = 0.f;
#pragma unroll 1
    for (i64 it = threadIdx.x; it < N * chunks; it += blockDim.x) {
        i64 k;
        const i64 n = div_of(it, dk, &k);
        const float* p = part + ((n * C + c) * chunks + k) * 2;
        sw += rstd_g[group_of(n, c, C, G)] * p[1];
        sb += p[0];
    }
    sw = block_reduce_sum(sw, scratch);
    sb = block_reduce_sum(sb, scratch);
    if (threadIdx.x == 0) {
        dw[c] = sw;
        db[c] = sb;
    }
}

// ---------------------------------------------------------------------------------------------
// Stage C: elementwise. out = a·v + b·(x − m) + k with per-plane coefficients (forward: v = 0
// term absent, a multiplies x − m). Grid-stride over 16-byte packs when a pack never straddles
// two planes (contiguous: S % pack == 0; channels-last: C % pack == 0), else scalar.
// Bytes: x (and dy) read once, y (dx) written once; coefficients stay in L1/L2.
// ---------------------------------------------------------------------------------------------

// Four floats from a 16-byte aligned address, in one 16-byte load.
__device__ __forceinline__ void load4(float* dst, const float* __restrict__ src) {
    const Pack<float> v = *reinterpret_cast<const Pack<float>*>(src);
#pragma unroll
    for (int i = 0; i < 4; ++i) dst[i] = v.v[i];
}

// The elementwise loop over units of W elements (W = Pack<T>::N when a pack never straddles two
// planes and the pointers are 16-byte aligned, else 1): thread t takes units t, t + stride, ...
// (stride = the grid's threads), UNROLL of them loaded before any is used (several 16-byte loads
// in flight: with one, planes_apply_f32 read and wrote at 74 % of DRAM bandwidth on an H200).
template <typename T, bool GRAD, bool CL, int W>
__device__ __forceinline__ void planes_apply_units(const T* __restrict__ x, const T* __restrict__ dy,
                                                   T* __restrict__ out, const float* __restrict__ a,
                                                   const float* __restrict__ bc,
                                                   const float* __restrict__ m,
                                                   const float* __restrict__ k, i64 total, int C,
                                                   i64 S, bool coef_vec) {
    const i64 stride = (i64)gridDim.x * blockDim.x;
    const i64 q0 = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (q0 >= total) return;
    UnitWalk<CL> w;
    w.init(q0 * W, stride * W, fast_div(C), fast_div(S));
#pragma unroll 1
    for (i64 q = q0; q < total; q += UNROLL * stride) {
        Unit<T, W> xv[UNROLL], gv[UNROLL];
        i64 pl[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            if (q + u * stride < total) {
                xv[u].load(x + (q + u * stride) * W);
                if (GRAD) gv[u].load(dy + (q + u * stride) * W);
            }
            pl[u] = w.plane(C);
            w.next(C, S);
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            if (q + u * stride >= total) break;
            // The unit's coefficients: one plane (contiguous, or W = 1), or W consecutive planes
            // (channels-last packs; the first a multiple of W, so 16-byte loads when the arrays
            // are 16-byte aligned, as device allocations are).
            float ca[W], cm[W], ck[W], cb[W];
            if (CL && W > 1 && coef_vec) {
#pragma unroll
                for (int i = 0; i < W; i += 4) {
                    load4(ca + i, a + pl[u] + i);
                    load4(cm + i, m + pl[u] + i);
                    load4(ck + i, k + pl[u] + i);
                    if (GRAD) load4(cb + i, bc + pl[u] + i);
                }
            } else {
#pragma unroll
                for (int i = 0; i < W; ++i) {
                    const i64 p = CL ? pl[u] + i : pl[u];
                    ca[i] = a[p];
                    cm[i] = m[p];
                    ck[i] = k[p];
                    if (GRAD) cb[i] = bc[p];
                }
            }
            float xf[W], gf[W], o[W];
            xv[u].floats(xf);
            if (GRAD) gv[u].floats(gf);
#pragma unroll
            for (int i = 0; i < W; ++i) {
                const float xm = xf[i] - cm[i];
                o[i] = GRAD ? ca[i] * gf[i] + cb[i] * xm + ck[i] : ca[i] * xm + ck[i];
            }
            Unit<T, W>::store(out + (q + u * stride) * W, o);
        }
    }
}

template <typename T, bool GRAD>
__device__ __forceinline__ void planes_apply(const T* __restrict__ x, const T* __restrict__ dy,
                                             T* __restrict__ out, const float* __restrict__ a,
                                             const float* __restrict__ bc,
                                             const float* __restrict__ m,
                                             const float* __restrict__ k, i64 N, int C, i64 S,
                                             int cl) {
    const int PN = Pack<T>::N;
    const i64 total = N * C * S;
    const bool vec = (cl ? (C % PN == 0) : ((S & (PN - 1)) == 0)) && aligned16(x) && aligned16(out) &&
                     (!GRAD || aligned16(dy));
    const bool coef_vec = aligned16(a) && aligned16(m) && aligned16(k) && (!GRAD || aligned16(bc));
    if (cl) {
        if (vec) planes_apply_units<T, GRAD, true, Pack<T>::N>(x, dy, out, a, bc, m, k, total / PN, C, S, coef_vec);
        else planes_apply_units<T, GRAD, true, 1>(x, dy, out, a, bc, m, k, total, C, S, coef_vec);
    } else {
        if (vec) planes_apply_units<T, GRAD, false, Pack<T>::N>(x, dy, out, a, bc, m, k, total / PN, C, S, coef_vec);
        else planes_apply_units<T, GRAD, false, 1>(x, dy, out, a, bc, m, k, total, C, S, coef_vec);
    }
}

// ---------------------------------------------------------------------------------------------
// Channels-last GroupNorm/InstanceNorm forward in one pass (x read once): a block per (sample n,
// tile of Ct channels), Ct a multiple of the group's C/G channels and of the pack, Ct / pack a
// power of two ≤ 8 (packs a position, `ppp`). The block holds its slice [S, Ct] on chip: thread t
// takes pack q = t mod ppp of positions t / ppp, t / ppp + step, ... (step = blockDim.x / ppp),
// its first TILE_KR packs in registers and the rest in shared memory, so a thread's channels are
// fixed and its coefficients are loaded once. Statistics in two passes over the on-chip copy
// (Σx, then Σ(x − mean)²: no division per element, no cancellation), per channel by lane sums,
// warp shuffles between the lanes of a pack and the warps in order, then per group: the same
// order on every GPU. The host checks the fit, the 16-byte alignment of x and y and C % pack.
// Dynamic shared memory: warps·Ct floats of lane sums, 3·Ct floats, then the cached packs.
// Bytes: x read once, y written once.
// ---------------------------------------------------------------------------------------------
#define TILE_KR 4

// Per-channel totals of the lanes' sums (PN channels a lane, pack q = lane mod ppp) into
// out[0 .. Ct): shuffles across the lanes of one pack, then the warps in order. Ends on a barrier.
template <int PN>
__device__ __forceinline__ void tile_channel_sums(float (&acc)[PN], int ppp, int Ct,
                                                  float* __restrict__ red, float* __restrict__ out) {
    for (int o = ppp; o < 32; o <<= 1)
#pragma unroll
        for (int i = 0; i < PN; ++i) acc[i] += __shfl_xor_sync(0xffffffffu, acc[i], o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    if (lane < ppp)
#pragma unroll
        for (int i = 0; i < PN; ++i) red[warp * Ct + lane * PN + i] = acc[i];
    __syncthreads();
    for (int c = threadIdx.x; c < Ct; c += blockDim.x) {
        float s = 0.f;
        for (int w = 0; w < warps; ++w) s += red[w * Ct + c];
        out[c] = s;
    }
    __syncthreads();
}

// The sum of out[] over channel c's group (Cg channels from c − c mod Cg), in channel order.
__device__ __forceinline__ float tile_group_sum(const float* __restrict__ v, int c, int Cg) {
    const int g0 = c - c % Cg;
    float s = 0.f;
    for (int j = 0; j < Cg; ++j) s += v[g0 + j];
    return s;
}

template <typename T>
__device__ __forceinline__ void planes_tile_fwd(const T* __restrict__ x, T* __restrict__ y,
                                                const float* __restrict__ w,
                                                const float* __restrict__ b,
                                                float* __restrict__ mean_out,
                                                float* __restrict__ rstd_out,
                                                float* __restrict__ varu_out, int C, int S, int Ct,
                                                int Cg, int tiles, float eps, int nan_inf_mean) {
    const int PN = Pack<T>::N;
    extern __shared__ __align__(16) unsigned char tile_bytes[];
    const int warps = blockDim.x >> 5;
    float* red = reinterpret_cast<float*>(tile_bytes);  // warps × Ct lane sums
    float* csum = red + warps * Ct;                     // per-channel totals
    float* cmean = csum + Ct;                           // the group mean of each channel
    float* crstd = cmean + Ct;                          // the group rstd of each channel
    Unit<T, PN>* cache = reinterpret_cast<Unit<T, PN>*>(crstd + Ct);
    const int n = blockIdx.x / tiles, t = blockIdx.x - n * tiles;
    const int ppp = Ct / PN, lg = __ffs(ppp) - 1;
    const int q = threadIdx.x & (ppp - 1), step = blockDim.x >> lg;
    const int pos0 = threadIdx.x >> lg, rest0 = pos0 + TILE_KR * step;
    const int c0 = t * Ct + q * PN;  // the thread's first channel
    const i64 base = (i64)n * S * C + c0;
    const T* xq = x + base;
    T* yq = y + base;
    // Cache slot of position p ≥ rest0 − pos0 + pos0: units past the register-held ones, in order.
    auto slot = [&](int p) { return (p - TILE_KR * step) * ppp + q; };

    // Pass 1: load (TILE_KR register packs, then UNROLL packs at a time into shared memory), Σx.
    Unit<T, PN> held[TILE_KR];
    float acc[PN];
#pragma unroll
    for (int i = 0; i < PN; ++i) acc[i] = 0.f;
    auto add = [&](const Unit<T, PN>& u) {
        float f[PN];
        u.floats(f);
#pragma unroll
        for (int i = 0; i < PN; ++i) acc[i] += f[i];
    };
#pragma unroll
    for (int k = 0; k < TILE_KR; ++k)
        if (pos0 + k * step < S) held[k].load(xq + (i64)(pos0 + k * step) * C);
#pragma unroll 1
    for (int p = rest0; p < S; p += UNROLL * step) {
        Unit<T, PN> v[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u)
            if (p + u * step < S) v[u].load(xq + (i64)(p + u * step) * C);
#pragma unroll
        for (int u = 0; u < UNROLL; ++u)
            if (p + u * step < S) {
                cache[slot(p + u * step)] = v[u];
                add(v[u]);
            }
    }
#pragma unroll
    for (int k = 0; k < TILE_KR; ++k)
        if (pos0 + k * step < S) add(held[k]);
    tile_channel_sums<PN>(acc, ppp, Ct, red, csum);
    const float cnt = (float)S * (float)Cg;
    for (int c = threadIdx.x; c < Ct; c += blockDim.x) cmean[c] = tile_group_sum(csum, c, Cg) / cnt;
    __syncthreads();

    // Pass 2: Σ(x − mean)² over the same on-chip values.
    float mu[PN];
#pragma unroll
    for (int i = 0; i < PN; ++i) {
        mu[i] = cmean[q * PN + i];
        acc[i] = 0.f;
    }
    auto add_sq = [&](const Unit<T, PN>& u) {
        float f[PN];
        u.floats(f);
#pragma unroll
        for (int i = 0; i < PN; ++i) {
            const float d = f[i] - mu[i];
            acc[i] += d * d;
        }
    };
#pragma unroll
    for (int k = 0; k < TILE_KR; ++k)
        if (pos0 + k * step < S) add_sq(held[k]);
#pragma unroll 4
    for (int p = rest0; p < S; p += step) add_sq(cache[slot(p)]);
    tile_channel_sums<PN>(acc, ppp, Ct, red, csum);
    for (int c = threadIdx.x; c < Ct; c += blockDim.x) {
        const float m2 = tile_group_sum(csum, c, Cg);
        const float rs = rsqrtf(m2 / cnt + eps);
        crstd[c] = rs;
        if (c % Cg == 0) {
            const i64 gi = (i64)n * (C / Cg) + (t * Ct + c) / Cg;
            mean_out[gi] = nan_inf_mean ? nan_if_inf(cmean[c]) : cmean[c];
            rstd_out[gi] = rs;
            varu_out[gi] = m2 / (cnt - 1.f);
        }
    }
    __syncthreads();

    // Apply: y = a·(x − mean) + k, a = rstd·w and k = b for the thread's PN channels, loaded once.
    float a[PN], kb[PN];
#pragma unroll
    for (int i = 0; i < PN; ++i) {
        a[i] = crstd[q * PN + i] * (w ? w[c0 + i] : 1.f);
        kb[i] = b ? b[c0 + i] : 0.f;
    }
    auto out = [&](int p, const Unit<T, PN>& u) {
        float f[PN];
        u.floats(f);
#pragma unroll
        for (int i = 0; i < PN; ++i) f[i] = a[i] * (f[i] - mu[i]) + kb[i];
        Unit<T, PN>::store(yq + (i64)p * C, f);
    };
#pragma unroll
    for (int k = 0; k < TILE_KR; ++k)
        if (pos0 + k * step < S) out(pos0 + k * step, held[k]);
#pragma unroll 4
    for (int p = rest0; p < S; p += step) out(p, cache[slot(p)]);
}

// The backward of planes_tile_fwd for input statistics (mean, rstd of each group given): the same
// blocks and thread layout with x and dy on chip (TILE_BWD_KR packs of each in registers, the
// rest in shared memory). One read of x and dy: per channel Σdy and Σdy·(x − μ), written as the
// plane's partials for dweight/dbias (part[(n·C + c)·2 + {0, 1}], summed over the batch by
// planes_grad_params_f32 with one chunk), and per group A = Σ w_c·Σdy, B = Σ w_c·Σdy·(x − μ);
// then dx = a·dy + b·(x − μ) + k with a = rstd·w_c, b = −rstd³·B/cnt, k = −rstd·A/cnt (as
// planes_grad_finalize_f32 and planes_grad_apply). Dynamic shared memory: warps·Ct floats of lane
// sums, 6·Ct floats, then the cached packs of x, then those of dy.
#define TILE_BWD_KR 2
#define TILE_BWD_UNROLL 2  // x and dy: four 16-byte loads in flight, 64 registers without spills

// Each channel c of tile t of sample n: its group's saved mean and rstd into cm[c], cr[c]. Ends
// on a barrier.
__device__ __forceinline__ void tile_group_stats(const float* __restrict__ mean_g,
                                                 const float* __restrict__ rstd_g,
                                                 float* __restrict__ cm, float* __restrict__ cr,
                                                 int n, int C, int Cg, int t, int Ct) {
    const i64 g_n = (i64)n * (C / Cg);
    for (int c = threadIdx.x; c < Ct; c += blockDim.x) {
        const i64 gi = g_n + (t * Ct + c) / Cg;
        cm[c] = mean_g[gi];
        cr[c] = rstd_g[gi];
    }
    __syncthreads();
}

// Each channel c of a tile: its group's backward coefficients b = −rstd³·B/cnt and
// k = −rstd·A/cnt, A = Σ w_c·Σdy and B = Σ w_c·Σdy·(x − μ) over the group's channels in order
// (as planes_grad_finalize_f32); `wt` is the weight at the tile's first channel (or null). The
// per-channel sums were written before a barrier; ends on a barrier.
__device__ __forceinline__ void tile_grad_coefs(const float* __restrict__ csg,
                                                const float* __restrict__ csx,
                                                const float* __restrict__ cr,
                                                const float* __restrict__ wt, float* __restrict__ cb,
                                                float* __restrict__ ck, int Ct, int Cg, float cnt) {
    for (int c = threadIdx.x; c < Ct; c += blockDim.x) {
        const int g0 = c - c % Cg;
        float A = 0.f, B = 0.f;
        for (int j = 0; j < Cg; ++j) {
            const float wc = wt ? wt[g0 + j] : 1.f;
            A += wc * csg[g0 + j];
            B += wc * csx[g0 + j];
        }
        const float r = cr[c];
        cb[c] = -r * r * r * B / cnt;
        ck[c] = -r * A / cnt;
    }
    __syncthreads();
}

template <typename T>
__device__ __forceinline__ void planes_tile_bwd(const T* __restrict__ dy, const T* __restrict__ x,
                                                const float* __restrict__ w,
                                                const float* __restrict__ mean_g,
                                                const float* __restrict__ rstd_g, T* __restrict__ dx,
                                                float* __restrict__ part, int C, int S, int Ct,
                                                int Cg, int tiles) {
    const int PN = Pack<T>::N, KR = TILE_BWD_KR;
    extern __shared__ __align__(16) unsigned char tile_bwd_bytes[];
    const int warps = blockDim.x >> 5;
    float* red = reinterpret_cast<float*>(tile_bwd_bytes);  // warps × Ct lane sums
    float* csg = red + warps * Ct;                          // Σdy a channel
    float* csx = csg + Ct;                                  // Σdy·(x − μ) a channel
    float* cm = csx + Ct;                                   // the group mean of each channel
    float* cr = cm + Ct;                                    // the group rstd of each channel
    float* cb = cr + Ct;                                    // the group's b coefficient
    float* ck = cb + Ct;                                    // the group's k coefficient
    const int n = blockIdx.x / tiles, t = blockIdx.x - n * tiles;
    const int ppp = Ct / PN, lg = __ffs(ppp) - 1;
    const int q = threadIdx.x & (ppp - 1), step = blockDim.x >> lg;
    const int pos0 = threadIdx.x >> lg, rest0 = pos0 + KR * step;
    const int held = KR * (int)blockDim.x, rest = S * ppp > held ? S * ppp - held : 0;  // cached
    Unit<T, PN>* cx = reinterpret_cast<Unit<T, PN>*>(ck + Ct);
    Unit<T, PN>* cg = cx + rest;
    const int c0 = t * Ct + q * PN;
    const i64 base = (i64)n * S * C + c0;
    const T* xq = x + base;
    const T* gq = dy + base;
    T* dq = dx + base;
    auto slot = [&](int p) { return (p - KR * step) * ppp + q; };
    tile_group_stats(mean_g, rstd_g, cm, cr, n, C, Cg, t, Ct);

    // Pass 1: load x and dy (KR register packs each, then UNROLL at a time into shared memory),
    // Σdy and Σdy·(x − μ) per lane channel.
    // The lane's group means are read from shared memory where used (held in registers beside
    // the accumulators and the packs in flight, the f16 kernel spilled).
    const float* mu = cm + q * PN;
    float sg[PN], sx[PN];
#pragma unroll
    for (int i = 0; i < PN; ++i) {
        sg[i] = 0.f;
        sx[i] = 0.f;
    }
    auto add = [&](const Unit<T, PN>& ux, const Unit<T, PN>& ug) {
        float fx[PN], fg[PN];
        ux.floats(fx);
        ug.floats(fg);
#pragma unroll
        for (int i = 0; i < PN; ++i) {
            sg[i] += fg[i];
            sx[i] += fg[i] * (fx[i] - mu[i]);
        }
    };
    Unit<T, PN> hx[KR], hg[KR];
#pragma unroll
    for (int k = 0; k < KR; ++k)
        if (pos0 + k * step < S) {
            const i64 e = (i64)(pos0 + k * step) * C;
            hx[k].load(xq + e);
            hg[k].load(gq + e);
        }
#pragma unroll 1
    for (int p = rest0; p < S; p += TILE_BWD_UNROLL * step) {
        Unit<T, PN> vx[TILE_BWD_UNROLL], vg[TILE_BWD_UNROLL];
#pragma unroll
        for (int u = 0; u < TILE_BWD_UNROLL; ++u)
            if (p + u * step < S) {
                const i64 e = (i64)(p + u * step) * C;
                vx[u].load(xq + e);
                vg[u].load(gq + e);
            }
#pragma unroll
        for (int u = 0; u < TILE_BWD_UNROLL; ++u)
            if (p + u * step < S) {
                cx[slot(p + u * step)] = vx[u];
                cg[slot(p + u * step)] = vg[u];
                add(vx[u], vg[u]);
            }
    }
#pragma unroll
    for (int k = 0; k < KR; ++k)
        if (pos0 + k * step < S) add(hx[k], hg[k]);
    tile_channel_sums<PN>(sg, ppp, Ct, red, csg);
    tile_channel_sums<PN>(sx, ppp, Ct, red, csx);
    for (int c = threadIdx.x; c < Ct; c += blockDim.x) {
        const i64 pl = (i64)n * C + t * Ct + c;
        part[pl * 2] = csg[c];
        part[pl * 2 + 1] = csx[c];
    }
    tile_grad_coefs(csg, csx, cr, w ? w + t * Ct : w, cb, ck, Ct, Cg, (float)S * (float)Cg);

    // Apply: dx = a·dy + b·(x − μ) + k for the thread's PN channels; a in registers (loaded
    // once), b and k from shared memory (16-byte reads; in registers too the kernel spilled).
    float a[PN];
#pragma unroll
    for (int i = 0; i < PN; ++i) a[i] = cr[q * PN + i] * (w ? w[c0 + i] : 1.f);
    const float* bq = cb + q * PN;
    const float* kq = ck + q * PN;
    auto out = [&](int p, const Unit<T, PN>& ux, const Unit<T, PN>& ug) {
        float fx[PN], fg[PN];
        ux.floats(fx);
        ug.floats(fg);
#pragma unroll
        for (int i = 0; i < PN; ++i) fx[i] = a[i] * fg[i] + bq[i] * (fx[i] - mu[i]) + kq[i];
        Unit<T, PN>::store(dq + (i64)p * C, fx);
    };
#pragma unroll
    for (int k = 0; k < KR; ++k)
        if (pos0 + k * step < S) out(pos0 + k * step, hx[k], hg[k]);
#pragma unroll 2
    for (int p = rest0; p < S; p += step) out(p, cx[slot(p)], cg[slot(p)]);
}

// The contiguous (NCHW) layout of planes_tile_bwd: a block per (sample n, tile of Ct planes), Ct
// whole groups, so the tile is Ct·S consecutive values of x and of dy. Teams of TS threads (a
// power of two ≥ 32) take a plane at a time: team e takes planes e, e + teams, ...; lane l of a
// team takes packs l, l + TS, ... of the plane (S / pack packs a plane, a multiple of TS; Ct a
// multiple of the teams, so that every thread holds the same R units). A thread's units r = 0 ..
// R − 1 in that order: the first TILE_BWD_KR in registers, the rest in shared memory at
// (r − KR)·blockDim + thread. Per plane: Σdy and Σdy·(x − μ) by lane, warp shuffles, then the
// team's warps in order; the rest as planes_tile_bwd, with one coefficient set a plane. Dynamic
// shared memory: Ct / teams · warps · 2 floats of warp sums and 6·Ct floats, rounded up to 16
// bytes, then the cached packs of x, then those of dy.
template <int KR, typename U>
__device__ __forceinline__ void held_set(U (&h)[KR], int r, const U& v) {
#pragma unroll
    for (int k = 0; k < KR; ++k)
        if (r == k) h[k] = v;
}
template <int KR, typename U>
__device__ __forceinline__ U held_get(const U (&h)[KR], int r) {
    U v = h[0];
#pragma unroll
    for (int k = 1; k < KR; ++k)
        if (r == k) v = h[k];
    return v;
}

template <typename T>
__device__ __forceinline__ void planes_tile_bwd_contig(const T* __restrict__ dy,
                                                       const T* __restrict__ x,
                                                       const float* __restrict__ w,
                                                       const float* __restrict__ mean_g,
                                                       const float* __restrict__ rstd_g,
                                                       T* __restrict__ dx, float* __restrict__ part,
                                                       int C, int S, int Ct, int Cg, int tiles,
                                                       int TS) {
    const int PN = Pack<T>::N, KR = TILE_BWD_KR;  // four spilled
    extern __shared__ __align__(16) unsigned char tile_bwdc_bytes[];
    const int warps = blockDim.x >> 5, lg = __ffs(TS) - 1, teams = blockDim.x >> lg;
    const int per = Ct / teams, upp = (S / PN) >> lg, R = per * upp;
    float* red = reinterpret_cast<float*>(tile_bwdc_bytes);  // per × warps × 2 warp sums
    float* csg = red + per * warps * 2;                       // Σdy a plane
    float* csx = csg + Ct;                                    // Σdy·(x − μ) a plane
    float* cm = csx + Ct;                                     // the plane's group mean
    float* cr = cm + Ct;                                      // the plane's group rstd
    float* cb = cr + Ct;                                      // the group's b coefficient
    float* ck = cb + Ct;                                      // the group's k coefficient
    Unit<T, PN>* cx = reinterpret_cast<Unit<T, PN>*>(red + ((per * warps * 2 + 6 * Ct + 3) & ~3));
    Unit<T, PN>* cg = cx + (R > KR ? (R - KR) * (int)blockDim.x : 0);
    const int n = blockIdx.x / tiles, t = blockIdx.x - n * tiles;
    const int team = threadIdx.x >> lg, l = threadIdx.x & (TS - 1), warp = threadIdx.x >> 5;
    const i64 base = ((i64)n * C + (i64)t * Ct) * S + (i64)l * PN;  // the lane's first pack
    tile_group_stats(mean_g, rstd_g, cm, cr, n, C, Cg, t, Ct);
    auto slot = [&](int r) { return (r - KR) * (int)blockDim.x + (int)threadIdx.x; };

    // Pass 1: x and dy loaded once (two units of each at a time), sums a plane.
    Unit<T, PN> hx[KR], hg[KR];
#pragma unroll 1
    for (int jj = 0; jj < per; ++jj) {
        const int j = team + jj * teams;
        const float mu = cm[j];
        const i64 pl = base + (i64)j * S;
        float sg = 0.f, sx = 0.f;
#pragma unroll 1
        for (int ii = 0; ii < upp; ii += 2) {
            Unit<T, PN> vx[2], vg[2];
#pragma unroll
            for (int u = 0; u < 2; ++u)
                if (ii + u < upp) {
                    const i64 e = pl + (i64)(ii + u) * TS * PN;
                    vx[u].load(x + e);
                    vg[u].load(dy + e);
                }
#pragma unroll
            for (int u = 0; u < 2; ++u)
                if (ii + u < upp) {
                    const int r = jj * upp + ii + u;
                    if (r < KR) {
                        held_set<KR>(hx, r, vx[u]);
                        held_set<KR>(hg, r, vg[u]);
                    } else {
                        cx[slot(r)] = vx[u];
                        cg[slot(r)] = vg[u];
                    }
                    float fx[PN], fg[PN];
                    vx[u].floats(fx);
                    vg[u].floats(fg);
#pragma unroll
                    for (int i = 0; i < PN; ++i) {
                        sg += fg[i];
                        sx += fg[i] * (fx[i] - mu);
                    }
                }
        }
        sg = warp_reduce_sum(sg);
        sx = warp_reduce_sum(sx);
        if ((threadIdx.x & 31) == 0) {
            red[(jj * warps + warp) * 2] = sg;
            red[(jj * warps + warp) * 2 + 1] = sx;
        }
    }
    __syncthreads();
    const int tw = TS >> 5;  // warps a team
    for (int c = threadIdx.x; c < Ct; c += blockDim.x) {
        const int e = c % teams, jj = c / teams;
        float a = 0.f, b = 0.f;
        for (int k = 0; k < tw; ++k) {
            a += red[(jj * warps + e * tw + k) * 2];
            b += red[(jj * warps + e * tw + k) * 2 + 1];
        }
        csg[c] = a;
        csx[c] = b;
        const i64 pi = (i64)n * C + t * Ct + c;
        part[pi * 2] = a;
        part[pi * 2 + 1] = b;
    }
    __syncthreads();
    tile_grad_coefs(csg, csx, cr, w ? w + t * Ct : w, cb, ck, Ct, Cg, (float)S * (float)Cg);

    // dx = a·dy + b·(x − μ) + k from the on-chip copies, one coefficient set a plane.
#pragma unroll 1
    for (int jj = 0; jj < per; ++jj) {
        const int j = team + jj * teams;
        const float a = cr[j] * (w ? w[t * Ct + j] : 1.f), b = cb[j], k = ck[j], mu = cm[j];
        const i64 pl = base + (i64)j * S;
#pragma unroll 2
        for (int ii = 0; ii < upp; ++ii) {
            const int r = jj * upp + ii;
            Unit<T, PN> ux, ug;
            if (r < KR) {
                ux = held_get<KR>(hx, r);
                ug = held_get<KR>(hg, r);
            } else {
                ux = cx[slot(r)];
                ug = cg[slot(r)];
            }
            float fx[PN], fg[PN];
            ux.floats(fx);
            ug.floats(fg);
#pragma unroll
            for (int i = 0; i < PN; ++i) fx[i] = a * fg[i] + b * (fx[i] - mu) + k;
            Unit<T, PN>::store(dx + pl + (i64)ii * TS * PN, fx);
        }
    }
}

#define TILE_ENTRIES(T, NAME)                                                                   \
    extern "C" __global__ void __launch_bounds__(1024) planes_tile_fwd_##NAME(                  \
        const T* x, T* y, const float* w, const float* b, float* mean, float* rstd, float* varu, \
        int C, int S, int Ct, int Cg, int tiles, float eps, int nan_inf_mean) {                 \
        planes_tile_fwd<T>(x, y, w, b, mean, rstd, varu, C, S, Ct, Cg, tiles, eps,             \
                           nan_inf_mean);                                                       \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(1024) planes_tile_bwd_##NAME(                  \
        const T* dy, const T* x, const float* w, const float* mean, const float* rstd, T* dx,   \
        float* part, int C, int S, int Ct, int Cg, int tiles) {                                 \
        planes_tile_bwd<T>(dy, x, w, mean, rstd, dx, part, C, S, Ct, Cg, tiles);               \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(1024) planes_tile_bwd_contig_##NAME(           \
        const T* dy, const T* x, const float* w, const float* mean, const float* rstd, T* dx,   \
        float* part, int C, int S, int Ct, int Cg, int tiles, int TS) {                         \
        planes_tile_bwd_contig<T>(dy, x, w, mean, rstd, dx, part, C, S, Ct, Cg, tiles, TS);    \
    }

CUNORM_FOR_DTYPES(TILE_ENTRIES)

// Blocks an SM the channels-last statistics are built for (their register cap): f32 fits three
// without spilling (80 registers; 89 uncapped); f16/bf16 need about 115–125, two.
#define STATS_CL_BLOCKS_f32 3
#define STATS_CL_BLOCKS_f16 2
#define STATS_CL_BLOCKS_bf16 2

#define PLANES_ENTRIES(T, NAME)                                                                 \
    extern "C" __global__ void planes_stats_##NAME(const T* x, float* part, i64 N, int C, i64 S, \
                                                  int chunks, int P) {                          \
        planes_reduce<T, StatAcc, false, false>(x, 0, 0, part, N, C, S, chunks, P);            \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(256, STATS_CL_BLOCKS_##NAME) planes_stats_cl_##NAME( \
        const T* x, float* part, i64 N, int C, i64 S, int chunks, int P) {                      \
        planes_reduce<T, StatAcc, false, true>(x, 0, 0, part, N, C, S, chunks, 1);             \
    }                                                                                           \
    extern "C" __global__ void planes_grad_sums_##NAME(const T* dy, const T* x, const float* m,  \
                                                      float* part, i64 N, int C, i64 S,         \
                                                      int chunks, int P) {                      \
        planes_reduce<T, GradAcc, true, false>(x, dy, m, part, N, C, S, chunks, P);            \
    }                                                                                           \
    extern "C" __global__ void planes_grad_sums_cl_##NAME(const T* dy, const T* x,               \
                                                         const float* m, float* part, i64 N,    \
                                                         int C, i64 S, int chunks, int P) {     \
        planes_reduce<T, GradAcc, true, true>(x, dy, m, part, N, C, S, chunks, 1);             \
    }                                                                                           \
    extern "C" __global__ void planes_apply_##NAME(const T* x, T* y, const float* a,             \
                                                  const float* m, const float* k, i64 N, int C, \
                                                  i64 S, int cl) {                              \
        planes_apply<T, false>(x, 0, y, a, 0, m, k, N, C, S, cl);                              \
    }                                                                                           \
    extern "C" __global__ void planes_grad_apply_##NAME(                                         \
        const T* dy, const T* x, T* dx, const float* a, const float* b, const float* m,         \
        const float* k, i64 N, int C, i64 S, int cl) {                                          \
        planes_apply<T, true>(x, dy, dx, a, b, m, k, N, C, S, cl);                             \
    }

CUNORM_FOR_DTYPES(PLANES_ENTRIES)
