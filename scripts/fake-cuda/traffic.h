// Memory traffic of emulated kernels (the fake driver's traffic build, EMU_TRAFFIC). The kernels'
// translation unit is compiled with GCC's -fsanitize=thread instrumentation, which calls a
// __tsan_* hook for every memory access; traffic.cpp implements those hooks (without ThreadSanitizer's
// runtime) and counts, while a launch runs:
//  - the bytes loaded from and stored to device allocations larger than 1 MiB (what DRAM would
//    move with no cache reuse; smaller buffers, such as parameters and statistics, are assumed
//    to stay in cache);
//  - the accesses each thread of the running block makes to any device allocation (a 16-byte
//    vector access once, however the host compiler splits it), and the largest such count of
//    the launch (a serial chain shows here).
#pragma once
#include <cstddef>
#include <cstdint>

struct EmuTraffic {
    // The device allocations while a launch runs, sorted by base: [lo[i], hi[i]), `big[i]` when
    // counted in bytes.
    const uintptr_t* lo = nullptr;
    const uintptr_t* hi = nullptr;
    const unsigned char* big = nullptr;
    int ranges = 0;
    bool on = false;              // counting (only while a kernel runs)
    unsigned cur = 0;             // the running thread (the shim's fiber index, < EMU_MAX_FIBERS)
    unsigned long long loaded = 0, stored = 0;  // bytes, this launch
    unsigned long long max_thread = 0;          // most accesses by one thread, this launch
    unsigned thread_accesses[8192] = {};        // per thread of the running block (or cluster)
    // Per thread: the 16-byte chunk (address / 16 + 1; 0 for none) and direction of its last
    // access. GCC lowers a kernel's 16-byte Pack access to several narrower ones (a struct
    // returned in two registers, or one access per element once it scalarizes the struct);
    // consecutive pieces of one thread within one chunk count as one access (and so do a
    // scalar fallback's consecutive element accesses to one chunk, which a GPU issues apart).
    uintptr_t last_chunk[8192] = {};
    bool last_store[8192] = {};
};
extern "C" EmuTraffic emu_traffic;
