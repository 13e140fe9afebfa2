// Host emulation of the CUDA features cunorm's kernels use, to run them on a CPU for logic
// checks (no GPU here). Blocks run one after another; the threads of a block run as real
// threads, __syncthreads is a barrier, warp shuffles go through a block-wide exchange buffer
// (every kernel calls them uniformly across the block). Not for timing.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
inline std::barrier<>* emu_barrier = nullptr;
inline float emu_shfl[1024];
inline float* emu_dyn_smem = nullptr;

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __align__(n) alignas(n)
#define __shared__ static

inline void __syncthreads() { emu_barrier->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int o) {
    int t = threadIdx.x + threadIdx.y * blockDim.x;
    emu_shfl[t] = v;
    __syncthreads();
    float r = emu_shfl[t ^ o];
    __syncthreads();
    return r;
}
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
template <class A, class B> inline auto min(A a, B b) { return a < b ? a : b; }
inline float emu_h2f(unsigned short h) { _Float16 x; std::memcpy(&x, &h, 2); return (float)x; }
inline unsigned short emu_f2h(float f) { _Float16 x = (_Float16)f; unsigned short h; std::memcpy(&h, &x, 2); return h; }

// Runs `kernel` over the grid; `smem` bytes of dynamic shared memory.
inline void emu_launch(dim3 grid, dim3 block, size_t smem, const std::function<void()>& kernel) {
    gridDim = grid;
    blockDim = block;
    std::vector<float> dyn(smem / 4 + 1);
    emu_dyn_smem = dyn.data();
    const unsigned n = block.x * block.y;
    for (unsigned bx = 0; bx < grid.x; ++bx)
        for (unsigned by = 0; by < grid.y; ++by) {
            std::barrier<> bar(n);
            emu_barrier = &bar;
            std::vector<std::thread> ts;
            for (unsigned t = 0; t < n; ++t)
                ts.emplace_back([&, t] {
                    blockIdx = {bx, by, 1};
                    threadIdx = {t % block.x, t / block.x, 1};
                    kernel();
                });
            for (auto& t : ts) t.join();
        }
}
