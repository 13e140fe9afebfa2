// common.cuh: what every cunorm kernel shares. Header-free on purpose: NVRTC compiles it with no
// CUDA toolkit header, so a user needs only the driver and libnvrtc.
//
// - f16_t / bf16_t: 2-byte storage types with round-to-nearest-even conversions;
// - Pack<T>: 16 bytes of T (4 x f32, 8 x f16/bf16) for vector loads and stores;
// - Welford accumulation, Chan merges, warp and block reductions (fixed order: deterministic).

typedef long long i64;
typedef unsigned long long u64;

struct f16_t { unsigned short bits; };
struct bf16_t { unsigned short bits; };

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(f16_t v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
    return f;
}
__device__ __forceinline__ float to_float(bf16_t v) {
    return __uint_as_float(((unsigned)v.bits) << 16);
}

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ f16_t from_float<f16_t>(float v) {
    f16_t r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(v));
    return r;
}
template <> __device__ __forceinline__ bf16_t from_float<bf16_t>(float v) {
    unsigned u = __float_as_uint(v);
    bf16_t r;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        r.bits = (unsigned short)((u >> 16) | 0x40u);  // quiet NaN, sign kept
    } else {
        r.bits = (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
    return r;
}

// Two 2-byte values of a 32-bit word (the lower address in the low half) to f32, and two f32
// to a word, rounded to nearest even: 16-byte packs handled as four words, with no 16-bit
// register per element.
__device__ __forceinline__ void word_to_float2(unsigned u, f16_t, float& lo, float& hi) {
    f16_t a, b;
    a.bits = (unsigned short)(u & 0xffffu);
    b.bits = (unsigned short)(u >> 16);
    lo = to_float(a);
    hi = to_float(b);
}
__device__ __forceinline__ void word_to_float2(unsigned u, bf16_t, float& lo, float& hi) {
    lo = __uint_as_float(u << 16);
    hi = __uint_as_float(u & 0xffff0000u);
}
// (The paired conversion is an sm_80 instruction; older GPUs, sm_75 with CUDA 13, convert each.)
__device__ __forceinline__ unsigned float2_to_word(float lo, float hi, f16_t) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    unsigned r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
#else
    return (unsigned)from_float<f16_t>(lo).bits | ((unsigned)from_float<f16_t>(hi).bits << 16);
#endif
}
__device__ __forceinline__ unsigned float2_to_word(float lo, float hi, bf16_t) {
    return (unsigned)from_float<bf16_t>(lo).bits | ((unsigned)from_float<bf16_t>(hi).bits << 16);
}

// 16 bytes of T.
template <typename T> struct __align__(16) Pack {
    static const int N = 16 / sizeof(T);
    T v[16 / sizeof(T)];
};

// A 16-byte pack of T held as four words (Pack<unsigned>), to its 16 / sizeof(T) values as f32
// and back (rounded to nearest even).
template <typename T>
__device__ __forceinline__ void unpack_words(const Pack<unsigned>& r, float (&f)[16 / sizeof(T)]) {
    const T tag{};
#pragma unroll
    for (int i = 0; i < 4; ++i) word_to_float2(r.v[i], tag, f[2 * i], f[2 * i + 1]);
}
template <>
__device__ __forceinline__ void unpack_words<float>(const Pack<unsigned>& r, float (&f)[4]) {
#pragma unroll
    for (int i = 0; i < 4; ++i) f[i] = __uint_as_float(r.v[i]);
}
template <typename T>
__device__ __forceinline__ Pack<unsigned> pack_words(const float (&f)[16 / sizeof(T)]) {
    const T tag{};
    Pack<unsigned> r;
#pragma unroll
    for (int i = 0; i < 4; ++i) r.v[i] = float2_to_word(f[2 * i], f[2 * i + 1], tag);
    return r;
}
template <>
__device__ __forceinline__ Pack<unsigned> pack_words<float>(const float (&f)[4]) {
    Pack<unsigned> r;
#pragma unroll
    for (int i = 0; i < 4; ++i) r.v[i] = __float_as_uint(f[i]);
    return r;
}

template <typename T> __device__ __forceinline__ bool aligned16(const T* p) {
    return (((u64)p) & 15ull) == 0;
}

// ---------------------------------------------------------------------------------------------
// Welford statistics (count, mean, sum of squared deviations) and their merges.
// ---------------------------------------------------------------------------------------------

struct Welford {
    float n, mean, m2;
    static const int WIDTH = 3;  // floats, for warp_merge's shuffles
    __device__ __forceinline__ void init() { n = 0.f; mean = 0.f; m2 = 0.f; }
    __device__ __forceinline__ void merge(const Welford& o);
};

__device__ __forceinline__ Welford welford_empty() {
    Welford w;
    w.n = 0.f;
    w.mean = 0.f;
    w.m2 = 0.f;
    return w;
}

// Finite (not ±inf, not NaN), without a math header.
__device__ __forceinline__ bool is_finite(float v) { return fabsf(v) <= 3.402823466e+38f; }

// Division of 64-bit indices by a per-launch divisor without the 64-bit integer division
// subroutine (a called routine of ~70 instructions on the GPU: a throughput cliff in a loop):
// the quotient is estimated with a double reciprocal made once per thread (`fast_div`), then
// fixed up exactly in integers. Exact for 0 <= n < 2^53 (the launch layer refuses larger
// tensors) and d >= 1: d = 1 is exact, and for d >= 2 the quotient is below 2^52 and the two
// roundings (1/d, then n·(1/d)) move it by less than 1, so the truncated estimate is off by at
// most 1. The fix-up steps are straight-line (a loop would be turned back into a division by
// the compiler), one more each way than needed.
struct FastDiv {
    i64 d;
    double inv;
};

__device__ __forceinline__ FastDiv fast_div(i64 d) {
    FastDiv f;
    f.d = d;
    f.inv = 1.0 / (double)d;
    return f;
}

// n / f.d, and n % f.d into *rem when given.
__device__ __forceinline__ i64 div_of(i64 n, FastDiv f, i64* rem = 0) {
    i64 q = (i64)((double)n * f.inv);
    i64 r = n - q * f.d;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        if (r < 0) {
            --q;
            r += f.d;
        }
        if (r >= f.d) {
            ++q;
            r -= f.d;
        }
    }
    if (rem) *rem = r;
    return q;
}

// NaN for ±inf, else `v`: a LayerNorm or GroupNorm mean of a set holding an infinity, which
// PyTorch's Welford merges make NaN.
__device__ __forceinline__ float nan_if_inf(float v) {
    return (!is_finite(v) && v == v) ? __uint_as_float(0x7fc00000u) : v;
}

// An infinite or NaN input or mean: the mean then follows a plain average (+inf stays +inf,
// +inf with -inf is NaN, as PyTorch's sums give; the Welford step would turn +inf into
// inf − inf = NaN) and the variance becomes NaN.
__device__ __forceinline__ void welford_add(Welford& w, float x) {
    w.n += 1.f;
    float d = x - w.mean;
    if (is_finite(x) && is_finite(w.mean)) {
        w.mean += d / w.n;
        w.m2 += d * (x - w.mean);
    } else {
        w.mean = w.mean * ((w.n - 1.f) / w.n) + x / w.n;
        w.m2 += d * 0.f;
    }
}

// Chan et al.: exact in exact arithmetic, no cancellation.
__device__ __forceinline__ Welford welford_merge(Welford a, Welford b) {
    if (b.n == 0.f) return a;
    if (a.n == 0.f) return b;
    Welford r;
    r.n = a.n + b.n;
    float d = b.mean - a.mean;
    float fb = b.n / r.n;
    if (is_finite(a.mean) && is_finite(b.mean)) {
        r.mean = a.mean + d * fb;
        r.m2 = a.m2 + b.m2 + d * d * a.n * fb;
    } else {  // a non-finite mean: as in welford_add
        r.mean = a.mean * (a.n / r.n) + b.mean * fb;
        r.m2 = a.m2 + b.m2 + d * 0.f;
    }
    return r;
}

__device__ __forceinline__ void Welford::merge(const Welford& o) { *this = welford_merge(*this, o); }

// Butterfly merge over a warp of any accumulator `Acc` (WIDTH floats, `merge(const Acc&)`
// merging its argument after itself): partners merge (lower lane, upper lane) in that order, so
// every lane ends with bitwise the same result (a Chan merge is not symmetric in floating point).
template <typename Acc>
__device__ __forceinline__ Acc warp_merge(Acc a) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        Acc b = a;
        float* pa = reinterpret_cast<float*>(&a);
        float* pb = reinterpret_cast<float*>(&b);
#pragma unroll
        for (int i = 0; i < Acc::WIDTH; ++i) pb[i] = __shfl_xor_sync(0xffffffffu, pa[i], o);
        if (lane & o) {
            b.merge(a);
            a = b;
        } else {
            a.merge(b);
        }
    }
    return a;
}

__device__ __forceinline__ float warp_reduce_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Block-wide merge of any accumulator (as warp_merge; `init()` makes an empty one): warps merge
// by butterfly, then warp 0's lanes merge the warps' results the same way; every thread gets the
// result. blockDim.x is a multiple of 32, <= 1024. `scratch` holds 32 entries. Synchronizes.
template <typename Acc>
__device__ __forceinline__ Acc block_merge(Acc a, Acc* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    a = warp_merge(a);
    __syncthreads();  // scratch may still be read from a previous call
    if (lane == 0) scratch[warp] = a;
    __syncthreads();
    if (lane < warps) {
        a = scratch[lane];
    } else {
        a.init();
    }
    return warp_merge(a);
}

__device__ __forceinline__ Welford block_reduce_welford(Welford w, Welford* scratch) {
    return block_merge(w, scratch);
}

__device__ __forceinline__ float block_reduce_sum(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_reduce_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.f;
    return warp_reduce_sum(v);
}

// ---------------------------------------------------------------------------------------------
// Thread-block clusters (sm_90): the blocks of a cluster run at once on one GPC and read each
// other's shared memory. A kernel declares its cluster size with __cluster_dims__ (the host
// launches it as any other; the grid is whole clusters, one dimension here) through
// CUNORM_CLUSTER_DIMS. Below sm_90 that is empty and these compile to a cluster of one block
// (the host never launches a cluster kernel there).
#if __CUDA_ARCH__ >= 900
#define CUNORM_CLUSTER_DIMS(n) __cluster_dims__(n, 1, 1)
#else
#define CUNORM_CLUSTER_DIMS(n)
#endif
// cluster-primitives-begin (scripts/kernel-emu/prep.py swaps this block for the emulator's)
__device__ __forceinline__ unsigned cluster_rank() {
#if __CUDA_ARCH__ >= 900
    unsigned r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
#else
    return 0;
#endif
}
__device__ __forceinline__ unsigned cluster_blocks() {
#if __CUDA_ARCH__ >= 900
    unsigned n;
    asm volatile("mov.u32 %0, %%cluster_nctarank;" : "=r"(n));
    return n;
#else
    return 1;
#endif
}
// Every thread of every block of the cluster arrives (release: its shared-memory writes become
// visible cluster-wide) and waits for all the others (acquire). Also a block barrier.
__device__ __forceinline__ void cluster_sync() {
#if __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
#else
    __syncthreads();
#endif
}
// The f32 at the same shared-memory offset as `p` (this block's shared memory) in the block of
// cluster rank `rank` (distributed shared memory).
__device__ __forceinline__ float cluster_load(const float* p, unsigned rank) {
#if __CUDA_ARCH__ >= 900
    float v;
    asm volatile(
        "{\n\t.reg .u64 g;\n\t.reg .u32 s, d;\n\tcvta.to.shared.u64 g, %1;\n\tcvt.u32.u64 s, g;\n\t"
        "mapa.shared::cluster.u32 d, s, %2;\n\tld.shared::cluster.f32 %0, [d];\n\t}"
        : "=f"(v) : "l"(p), "r"(rank) : "memory");
    return v;
#else
    return *p;
#endif
}
// cluster-primitives-end

// The sum over a cluster of each thread's `v`, every thread of the cluster getting the same bits:
// the block's sum (block_reduce_sum, fixed order) into shared slot red[slot], a cluster barrier,
// then the blocks' sums added in rank order. red holds 32 floats of block scratch and the slots
// past them. A slot may be written again only after a later cluster_sync (the next reduction's
// or a final one): another block may still be reading it.
__device__ __forceinline__ float cluster_reduce_sum(float v, float* red, int slot) {
    v = block_reduce_sum(v, red);
    if (threadIdx.x == 0) red[slot] = v;
    cluster_sync();
    float t = 0.f;
    const unsigned n = cluster_blocks();
    for (unsigned r = 0; r < n; ++r) t += cluster_load(red + slot, r);
    return t;
}
// Two sums at once (cluster_reduce_sum's order), in slots red[slot] and red[slot + 1].
__device__ __forceinline__ void cluster_reduce_sum2(float& a, float& b, float* red, int slot) {
    a = block_reduce_sum(a, red);
    b = block_reduce_sum(b, red);
    if (threadIdx.x == 0) {
        red[slot] = a;
        red[slot + 1] = b;
    }
    cluster_sync();
    a = 0.f;
    b = 0.f;
    const unsigned n = cluster_blocks();
    for (unsigned r = 0; r < n; ++r) {
        a += cluster_load(red + slot, r);
        b += cluster_load(red + slot + 1, r);
    }
}

// Instantiates an extern "C" entry point per dtype: NAME_f32, NAME_f16, NAME_bf16. A file
// compiled as one module per dtype (first line `// cunorm-module: per-dtype`; build.rs names the
// modules <file>.f32, <file>.f16, <file>.bf16) is compiled with CUNORM_ONLY_<DTYPE> defined:
// then only that dtype's entry points, and CUNORM_WITH_F32 says whether f32's own kernels
// belong, so that a program using one dtype compiles a third of the file at first use.
#if defined(CUNORM_ONLY_F32)
#define CUNORM_FOR_DTYPES(M) M(float, f32)
#elif defined(CUNORM_ONLY_F16)
#define CUNORM_FOR_DTYPES(M) M(f16_t, f16)
#elif defined(CUNORM_ONLY_BF16)
#define CUNORM_FOR_DTYPES(M) M(bf16_t, bf16)
#else
#define CUNORM_FOR_DTYPES(M) M(float, f32) M(f16_t, f16) M(bf16_t, bf16)
#endif
#if defined(CUNORM_ONLY_F16) || defined(CUNORM_ONLY_BF16)
#define CUNORM_WITH_F32 0
#else
#define CUNORM_WITH_F32 1
#endif
