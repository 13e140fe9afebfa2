// Host emulation of the CUDA features cunorm's kernels use, to run them on a CPU for logic
// checks (no GPU here). Blocks run one after another on the calling thread; the threads of a
// block are fibers (x86-64 stack switching). __syncthreads is a true block barrier; a warp
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
inline unsigned char* emu_dyn_smem = nullptr;
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
// there), waiting at __syncthreads (released when the whole block is there), or finished.
enum EmuState { EMU_RUN, EMU_SHFL, EMU_SYNC, EMU_DONE };

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
    threadIdx = {i % blockDim.x, (i / blockDim.x) % blockDim.y, i / (blockDim.x * blockDim.y)};
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

// Runs one block of `n` threads to completion. Warps are independent, as on a GPU: each warp in
// turn runs as far as it can (its lanes in step through shuffles) up to the next __syncthreads,
// so a warp that reads what another has not yet written (a missing barrier) sees stale data.
inline void emu_run_block(unsigned n, const std::function<void()>& kernel) {
    EmuBlock& b = emu_block;
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
    const unsigned warps = (n + 31) / 32;
    for (;;) {
        for (unsigned wk = 0; wk < warps; ++wk) {
            const unsigned w = emu_reverse ? warps - 1 - wk : wk;
            const unsigned lo = w * 32, hi = std::min(n, lo + 32);
            for (;;) {
                unsigned live = 0, shfl = 0;
                for (unsigned k = lo; k < hi; ++k) {
                    const unsigned i = emu_reverse ? hi - 1 - (k - lo) : k;
                    if (b.fibers[i].state == EMU_RUN) emu_enter_fiber(i);
                    live += b.fibers[i].state != EMU_DONE;
                    shfl += b.fibers[i].state == EMU_SHFL;
                }
                if (shfl == 0) break;
                threadIdx = {lo, 0, 0};
                if (shfl != live) emu_fault("a warp shuffle that not every live lane of the warp reached");
                for (unsigned i = lo; i < hi; ++i)
                    if (b.fibers[i].state == EMU_SHFL) b.fibers[i].state = EMU_RUN;
            }
        }
        unsigned waiting = 0;
        for (unsigned i = 0; i < n; ++i) waiting += b.fibers[i].state == EMU_SYNC;
        if (waiting == 0) return;
        threadIdx = {0, 0, 0};
        if (waiting != n) emu_fault("__syncthreads reached by some threads of a block after others exited");
        for (unsigned i = 0; i < n; ++i) b.fibers[i].state = EMU_RUN;
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

// Runs `kernel` over the grid; `smem` bytes of dynamic shared memory (exactly that many, so an
// access past them is caught under AddressSanitizer).
inline void emu_launch(dim3 grid, dim3 block, size_t smem, const std::function<void()>& kernel) {
    gridDim = grid;
    blockDim = block;
    // Exactly `smem` bytes, 16-byte aligned (as a GPU's dynamic shared memory), freed after.
    std::unique_ptr<unsigned char, void (*)(unsigned char*)> dyn(
        smem ? (unsigned char*)::operator new(smem, std::align_val_t{16}) : nullptr,
        [](unsigned char* p) { if (p) ::operator delete(p, std::align_val_t{16}); });
    emu_dyn_smem = dyn.get();
    const unsigned n = block.x * block.y * block.z;
    const unsigned long blocks = (unsigned long)grid.x * grid.y * grid.z;
    for (unsigned long k = 0; k < blocks; ++k) {
        unsigned long i = emu_reverse ? blocks - 1 - k : k;
        blockIdx = {(unsigned)(i % grid.x), (unsigned)(i / grid.x % grid.y), (unsigned)(i / grid.x / grid.y)};
        emu_run_block(n, kernel);
    }
}
