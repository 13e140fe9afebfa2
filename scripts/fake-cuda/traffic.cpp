// The __tsan_* hooks GCC's -fsanitize=thread instrumentation calls, counting device memory
// traffic for the fake driver's traffic build (see traffic.h). Compiled without instrumentation
// and linked without ThreadSanitizer's runtime: nothing here checks for races.
#include "traffic.h"

extern "C" {
__attribute__((visibility("hidden"))) EmuTraffic emu_traffic;
}

namespace {

inline void hit(const void* p, size_t n, bool store) {
    EmuTraffic& t = emu_traffic;
    if (!t.on) return;
    const uintptr_t a = (uintptr_t)p;
    int lo = 0, hi = t.ranges;  // the first range whose base is above a
    while (lo < hi) {
        const int m = (lo + hi) / 2;
        if (t.lo[m] <= a) lo = m + 1;
        else hi = m;
    }
    if (lo == 0 || a >= t.hi[lo - 1]) return;
    const uintptr_t chunk = a / 16 + 1;
    if (t.last_chunk[t.cur] != chunk || t.last_store[t.cur] != store) {
        ++t.thread_accesses[t.cur];
        t.last_chunk[t.cur] = chunk;
        t.last_store[t.cur] = store;
    }
    if (t.big[lo - 1]) (store ? t.stored : t.loaded) += n;
}

}  // namespace

#define HOOKS(n)                                                                            \
    extern "C" void __tsan_read##n(void* p) { hit(p, n, false); }                           \
    extern "C" void __tsan_write##n(void* p) { hit(p, n, true); }                           \
    extern "C" void __tsan_unaligned_read##n(void* p) { hit(p, n, false); }                 \
    extern "C" void __tsan_unaligned_write##n(void* p) { hit(p, n, true); }
HOOKS(1)
HOOKS(2)
HOOKS(4)
HOOKS(8)
HOOKS(16)
extern "C" void __tsan_read_range(void* p, unsigned long n) { hit(p, n, false); }
extern "C" void __tsan_write_range(void* p, unsigned long n) { hit(p, n, true); }
extern "C" void __tsan_init() {}
extern "C" void __tsan_func_entry(void*) {}
extern "C" void __tsan_func_exit() {}
extern "C" void __tsan_vptr_update(void**, void*) {}
extern "C" void __tsan_vptr_read(void**) {}
// Atomics the instrumented code calls instead of the plain instructions: done for real.
extern "C" unsigned char __tsan_atomic8_load(const volatile unsigned char* a, int) {
    return __atomic_load_n(a, __ATOMIC_SEQ_CST);
}
extern "C" unsigned __tsan_atomic32_load(const volatile unsigned* a, int) {
    return __atomic_load_n(a, __ATOMIC_SEQ_CST);
}
extern "C" int __tsan_atomic32_fetch_add(volatile int* a, int v, int) {
    return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);
}
