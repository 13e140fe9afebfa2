// Host emulation of the CUDA features cunorm's kernels use, to run them on a CPU for logic
// checks (no GPU here). Blocks run one after another on the calling thread; the threads of a
// block are fibers (x86-64 stack switching), and __syncthreads is a true barrier: every live
// thread of the block runs up to it before any goes on. Warp shuffles go through a block-wide
// exchange buffer (every kernel calls them uniformly across the block). A barrier that some
// threads reach after others have exited is reported as divergence. Faults (misaligned 16-byte
// access, divergent barrier) print what happened and abort, as a GPU fault would end the
// context. Not for timing. Used by emu.cpp and by the fake driver (scripts/fake-cuda).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <sys/mman.h>
#include <vector>

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
inline float* emu_dyn_smem = nullptr;

#define __global__
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

struct EmuFiber {
    void* sp = nullptr;
    char* stack = nullptr;  // lowest usable address; a guard page lies below it
    bool done = false;
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
    b.fibers[b.cur].done = true;
    emu_leave_fiber(true);
    emu_fault("a finished fiber was resumed");
}

inline void __syncthreads() { emu_leave_fiber(false); }

// Runs one block of `n` threads to completion.
inline void emu_run_block(unsigned n, const std::function<void()>& kernel) {
    EmuBlock& b = emu_block;
    b.ensure(n);
    b.kernel = &kernel;
    for (unsigned i = 0; i < n; ++i) {
        EmuFiber& f = b.fibers[i];
        f.done = false;
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
    for (;;) {
        unsigned live = 0;
        for (unsigned i = 0; i < n; ++i)
            if (!b.fibers[i].done) {
                emu_enter_fiber(i);
                live += !b.fibers[i].done;
            }
        if (live == 0) return;
        if (live != n) {
            threadIdx = {0, 0, 0};
            emu_fault("__syncthreads reached by some threads of a block after others exited");
        }
    }
}

// --- device intrinsics -----------------------------------------------------------------------
inline unsigned emu_linear_tid() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }
inline float __shfl_xor_sync(unsigned, float v, int o) {
    unsigned t = emu_linear_tid();
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
    std::vector<float> dyn(smem / 4);
    emu_dyn_smem = dyn.empty() ? nullptr : dyn.data();
    const unsigned n = block.x * block.y * block.z;
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                blockIdx = {bx, by, bz};
                emu_run_block(n, kernel);
            }
}
