// Host emulation of the CUDA features cunorm's kernels use, to run them on a CPU for logic
// checks (no GPU here). Blocks (or the clusters of a cluster launch) run one after another on
// the calling thread; the threads of a block, or of all the blocks of a cluster, are fibers
// (x86-64 stack switching), each block with its own dynamic shared memory, filled with 0xff
// bytes (NaN) at launch so that a read before any write shows. __syncthreads is a true block
// barrier, cluster_sync a cluster one, and a cluster's blocks read each other's dynamic shared
// memory (distributed shared memory; a cluster kernel has no static shared memory, which is one
// per process here); a warp
// shuffle synchronizes only its warp, and warps run independently between barriers (each as
// far as it can before the next), so a missing barrier shows as a wrong result. A barrier that
// some threads reach after others have exited, or a shuffle not every lane reaches, is
// reported as divergence. Faults (misaligned 16-byte
// access, divergent barrier) print what happened and abort, as a GPU fault would end the
// context. Not for timing. Used by emu.cpp and by the fake driver (scripts/fake-cuda).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <new>
#include <sys/mman.h>
#include <vector>

#ifdef EMU_TRAFFIC
#include "traffic.h"
#endif

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#else
#define EMU_ASAN 0
#endif

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
inline dim3 threadIdx, blockIdx, blockDim, gridDim;
inline float emu_shfl[1024];
// The most fibers a launch runs at once: a cluster of 8 blocks of 1024 threads.
constexpr size_t EMU_MAX_FIBERS = 8 * 1024;
inline unsigned char* emu_dyn_smem = nullptr;
// The running launch's blocks per cluster (1 without clusters) and the dynamic shared memory of
// each block of the running cluster, `emu_smem_bytes` bytes each.
inline unsigned emu_cluster = 1;
inline std::vector<unsigned char*> emu_cluster_smem;
inline size_t emu_smem_bytes = 0;
inline dim3 emu_cluster_base;  // blockIdx of the running cluster's rank-0 block
// Run the threads of a block, and the blocks of a grid, in reverse order: a kernel whose result
// depends on the order (a race on shared or global memory) gives different outputs.
inline bool emu_reverse = false;

#define __global__
#define __launch_bounds__(...)
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __align__(n) alignas(n)
#define __shared__ static

[[noreturn]] inline void emu_fault(const char* what) {
    std::fprintf(stderr, "emulated GPU fault: %s (block %u,%u,%u thread %u,%u,%u)\n", what, blockIdx.x,
                 blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z);
    std::abort();
}

// --- fibers ----------------------------------------------------------------------------------
// emu_switch(save, to): saves the callee-saved registers and the stack pointer into *save and
// resumes the context whose stack pointer is `to`.
extern "C" void emu_switch(void** save, void* to);
asm(R"(
.text
.globl emu_switch
.type emu_switch,@function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
.size emu_switch, .-emu_switch
)");

// Where a fiber stands: runnable, waiting in a warp shuffle (released when its whole warp is
// there), waiting at __syncthreads (released when the whole block is there), waiting at
// cluster_sync (released when the whole cluster is there), or finished.
enum EmuState { EMU_RUN, EMU_SHFL, EMU_SYNC, EMU_CSYNC, EMU_DONE };

struct EmuFiber {
    void* sp = nullptr;
    EmuState state = EMU_RUN;
    char* stack = nullptr;  // lowest usable address; a guard page lies below it
    void* fake = nullptr;  // ASan's fake-stack handle
};

struct EmuBlock {
    static constexpr size_t STACK = 256 * 1024;
    std::vector<EmuFiber> fibers;
    void* sched_sp = nullptr;
    void* sched_fake = nullptr;
    const void* sched_bottom = nullptr;
    size_t sched_size = 0;
    unsigned cur = 0;
    unsigned threads = 1;  // per block: fiber i is thread i % threads of the cluster's block i / threads
    const std::function<void()>* kernel = nullptr;

    void ensure(unsigned n) {
        while (fibers.size() < n) {
            size_t page = 4096;
            char* m = (char*)mmap(nullptr, STACK + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (m == MAP_FAILED) emu_fault("cannot map a fiber stack");
            mprotect(m, page, PROT_NONE);
            EmuFiber f;
            f.stack = m + page;
            fibers.push_back(f);
        }
    }
};
inline EmuBlock emu_block;

inline void emu_enter_fiber(unsigned i) {
    EmuBlock& b = emu_block;
    b.cur = i;
#ifdef EMU_TRAFFIC
    emu_traffic.cur = i;
#endif
    const unsigned t = i % b.threads, r = i / b.threads;
    threadIdx = {t % blockDim.x, (t / blockDim.x) % blockDim.y, t / (blockDim.x * blockDim.y)};
    blockIdx = {emu_cluster_base.x + r, emu_cluster_base.y, emu_cluster_base.z};
    emu_dyn_smem = emu_cluster_smem[r];
#if EMU_ASAN
    __sanitizer_start_switch_fiber(&b.sched_fake, b.fibers[i].stack, EmuBlock::STACK);
#endif
    emu_switch(&b.sched_sp, b.fibers[i].sp);
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(b.sched_fake, nullptr, nullptr);
#endif
}

// Back to the scheduler; `dying` when the fiber will never be resumed.
inline void emu_leave_fiber(bool dying) {
    EmuBlock& b = emu_block;
    EmuFiber& f = b.fibers[b.cur];
#if EMU_ASAN
    __sanitizer_start_switch_fiber(dying ? nullptr : &f.fake, b.sched_bottom, b.sched_size);
#else
    (void)dying;
#endif
    emu_switch(&f.sp, b.sched_sp);
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(f.fake, nullptr, nullptr);
#endif
}

extern "C" inline void emu_fiber_main() {
    EmuBlock& b = emu_block;
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &b.sched_bottom, &b.sched_size);
#endif
    (*b.kernel)();
    b.fibers[b.cur].state = EMU_DONE;
    emu_leave_fiber(true);
    emu_fault("a finished fiber was resumed");
}

inline void emu_wait(EmuState why) {
    emu_block.fibers[emu_block.cur].state = why;
    emu_leave_fiber(false);
}
inline void __syncthreads() { emu_wait(EMU_SYNC); }
inline unsigned emu_cluster_rank() { return emu_block.cur / emu_block.threads; }
inline unsigned emu_cluster_blocks() { return emu_cluster; }
inline void emu_cluster_sync() { emu_wait(EMU_CSYNC); }
// The f32 at `p`'s offset in this block's dynamic shared memory, in block `rank` of the cluster.
inline float emu_cluster_load(const float* p, unsigned rank) {
    const unsigned char* base = emu_cluster_smem[emu_block.cur / emu_block.threads];
    const uintptr_t off = (uintptr_t)p - (uintptr_t)base;
    if ((uintptr_t)p < (uintptr_t)base || off + sizeof(float) > emu_smem_bytes)
        emu_fault("distributed shared memory load of an address outside the block's dynamic shared memory");
    if (rank >= emu_cluster) emu_fault("distributed shared memory load from a rank outside the cluster");
    float v;
    std::memcpy(&v, emu_cluster_smem[rank] + off, sizeof v);
    return v;
}

// Runs one block of `threads` threads, or a cluster of `emu_cluster` such blocks, to
// completion. Warps are independent, as on a GPU: each warp in turn runs as far as it can (its
// lanes in step through shuffles) up to the next barrier, so a warp that reads what another has
// not yet written (a missing barrier) sees stale data.
inline void emu_run_block(unsigned threads, const std::function<void()>& kernel) {
    EmuBlock& b = emu_block;
    const unsigned n = threads * emu_cluster;
    b.threads = threads;
    b.ensure(n);
    b.kernel = &kernel;
    for (unsigned i = 0; i < n; ++i) {
        EmuFiber& f = b.fibers[i];
        f.state = EMU_RUN;
        f.fake = nullptr;
        // Entered through emu_switch's `ret`: six zeroed registers, the entry point, and a null
        // return address for it, so that emu_fiber_main starts with the ABI's stack alignment.
        void** top = (void**)(f.stack + EmuBlock::STACK);
        top -= 2;
        top[1] = nullptr;
        top[0] = (void*)&emu_fiber_main;
        top -= 6;
        for (int r = 0; r < 6; ++r) top[r] = nullptr;
        f.sp = top;
    }
#ifdef EMU_TRAFFIC
    for (unsigned i = 0; i < n; ++i) {
        emu_traffic.thread_accesses[i] = 0;
        emu_traffic.last_chunk[i] = 0;
    }
    struct MaxAccesses {
        unsigned n;
        ~MaxAccesses() {
            for (unsigned i = 0; i < n; ++i)
                if (emu_traffic.thread_accesses[i] > emu_traffic.max_thread)
                    emu_traffic.max_thread = emu_traffic.thread_accesses[i];
        }
    } max_accesses{n};
#endif
    const unsigned bwarps = (threads + 31) / 32;
    for (;;) {
        // Each block of the cluster in turn runs as far as it can (its __syncthreads released
        // as its threads all reach one) before the next starts: a block reading another's
        // shared memory without a cluster barrier between sees it unwritten (0xff) in one order
        // or the other.
        unsigned waiting = 0, csync = 0;
        for (unsigned rk = 0; rk < emu_cluster; ++rk) {
            const unsigned r = emu_reverse ? emu_cluster - 1 - rk : rk;
            for (;;) {
                for (unsigned wk = 0; wk < bwarps; ++wk) {
                    const unsigned w = emu_reverse ? bwarps - 1 - wk : wk;
                    const unsigned lo = r * threads + w * 32, hi = std::min(r * threads + threads, lo + 32);
                    for (;;) {
                        unsigned live = 0, shfl = 0;
                        for (unsigned k = lo; k < hi; ++k) {
                            const unsigned i = emu_reverse ? hi - 1 - (k - lo) : k;
                            if (b.fibers[i].state == EMU_RUN) emu_enter_fiber(i);
                            live += b.fibers[i].state != EMU_DONE;
                            shfl += b.fibers[i].state == EMU_SHFL;
                        }
                        if (shfl == 0) break;
                        threadIdx = {lo - r * threads, 0, 0};
                        if (shfl != live) emu_fault("a warp shuffle that not every live lane of the warp reached");
                        for (unsigned i = lo; i < hi; ++i)
                            if (b.fibers[i].state == EMU_SHFL) b.fibers[i].state = EMU_RUN;
                    }
                }
                unsigned sync = 0;
                for (unsigned i = r * threads; i < (r + 1) * threads; ++i) sync += b.fibers[i].state == EMU_SYNC;
                if (sync != threads) break;
                for (unsigned i = r * threads; i < (r + 1) * threads; ++i) b.fibers[i].state = EMU_RUN;
            }
            unsigned done = 0;
            for (unsigned i = r * threads; i < (r + 1) * threads; ++i) {
                waiting += b.fibers[i].state == EMU_SYNC;
                csync += b.fibers[i].state == EMU_CSYNC;
                done += b.fibers[i].state == EMU_DONE;
            }
            // An exited block's shared memory is gone: another block reading it now (no cluster
            // barrier before the exit) reads 0xff.
            if (done == threads && emu_cluster > 1 && emu_cluster_smem[r]) std::memset(emu_cluster_smem[r], 0xff, emu_smem_bytes);
        }
        // Every block is stuck: released only when the whole cluster waits at cluster_sync.
        if (csync == n) {
            for (unsigned i = 0; i < n; ++i) b.fibers[i].state = EMU_RUN;
            continue;
        }
        if (waiting + csync == 0) return;
        threadIdx = {0, 0, 0};
        if (csync == 0) emu_fault("__syncthreads reached by some threads of a block after others exited");
        if (waiting == 0) emu_fault("cluster_sync reached by some threads of a cluster after others exited");
        emu_fault("threads of a cluster wait at different barriers (__syncthreads and cluster_sync)");
    }
}

// --- device intrinsics -----------------------------------------------------------------------
inline unsigned emu_linear_tid() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }
inline float __shfl_xor_sync(unsigned mask, float v, int o) {
    if (mask != 0xffffffffu || (blockDim.x * blockDim.y * blockDim.z) % 32 != 0 || o <= 0 || o >= 32)
        emu_fault("full-warp shuffle in a block that is not whole warps (or a bad lane mask)");
    unsigned t = emu_linear_tid();
    emu_shfl[t] = v;
    emu_wait(EMU_SHFL);
    float r = emu_shfl[t ^ o];
    emu_wait(EMU_SHFL);
    return r;
}
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
// A product rounded on its own: never contracted into a multiply-add (the volatile store).
inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
template <class A, class B> inline auto min(A a, B b) { return a < b ? a : b; }
inline float emu_h2f(unsigned short h) { _Float16 x; std::memcpy(&x, &h, 2); return (float)x; }
inline unsigned short emu_f2h(float f) { _Float16 x = (_Float16)f; unsigned short h; std::memcpy(&h, &x, 2); return h; }

// A 16-byte vector access must be 16-byte aligned on a GPU (prep.py routes every Pack cast here).
template <class P, class Q> inline P* emu_pack_ptr(Q* p) {
    if (((uintptr_t)p) & 15u) emu_fault("misaligned 16-byte vector access");
    return (P*)p;
}

// Runs `kernel` over the grid; `smem` bytes of dynamic shared memory a block (exactly that
// many, so an access past them is caught under AddressSanitizer); clusters of `cluster` blocks
// along x (grid.x a multiple of it, as the driver requires), each cluster's blocks together.
inline void emu_launch(dim3 grid, dim3 block, size_t smem, const std::function<void()>& kernel,
                       unsigned cluster = 1) {
    gridDim = grid;
    blockDim = block;
    const unsigned n = block.x * block.y * block.z;
    if (cluster == 0 || grid.x % cluster != 0 || (size_t)cluster * n > EMU_MAX_FIBERS)
        emu_fault("cluster launch: grid.x not whole clusters, or too many threads a cluster");
    emu_cluster = cluster;
    // Exactly `smem` bytes a block, 16-byte aligned (as a GPU's dynamic shared memory), freed after.
    using Smem = std::unique_ptr<unsigned char, void (*)(unsigned char*)>;
    std::vector<Smem> dyn;
    emu_cluster_smem.assign(cluster, nullptr);
    for (unsigned r = 0; r < cluster; ++r) {
        dyn.emplace_back(smem ? (unsigned char*)::operator new(smem, std::align_val_t{16}) : nullptr,
                         [](unsigned char* p) { if (p) ::operator delete(p, std::align_val_t{16}); });
        emu_cluster_smem[r] = dyn.back().get();
    }
    emu_smem_bytes = smem;
    const unsigned long clusters = (unsigned long)grid.x / cluster * grid.y * grid.z;
    const unsigned long per_row = grid.x / cluster;
    for (unsigned long k = 0; k < clusters; ++k) {
        unsigned long i = emu_reverse ? clusters - 1 - k : k;
        for (auto p : emu_cluster_smem)
            if (p) std::memset(p, 0xff, smem);
        emu_cluster_base = {(unsigned)(i % per_row) * cluster, (unsigned)(i / per_row % grid.y),
                            (unsigned)(i / per_row / grid.y)};
        emu_run_block(n, kernel);
    }
    emu_cluster = 1;
}
