// A fake CUDA driver: a libcuda.so.1 that cudarc loads like the real one, and that runs
// cunorm's kernels (their own source, through ../kernel-emu/shim.h) on the CPU. It lets the
// whole Rust CUDA path run on a machine without a GPU: device discovery, NVRTC CUBIN loading,
// argument packing, launch configurations, copies, events, and the results checked by
// tests/cuda.rs against the CPU oracle. Not a GPU: no timing, no real concurrency, no hardware
// codegen. It reports itself by name ("cunorm fake CUDA device") so no result can be mistaken
// for a GPU's.
//
// It is strict where the real driver is strict, and stricter where a GPU would fault:
//  - a CUBIN must be an ELF for the device's architecture (sm_90) and contain the kernel;
//  - launches are checked like the driver does: block and grid limits, dynamic shared memory
//    against the opt-in attribute, and threads per block against the kernel's register count
//    read from the CUBIN (65 536 registers per block, allocated per warp in units of 256);
//  - every pointer argument must point into a live allocation, every copy and memset must stay
//    inside one, 16-byte vector accesses must be aligned, barriers must not diverge;
//  - built with -fsanitize=address (run.sh asan), every kernel access is bounds-checked.
// Environment: FAKECUDA_NO_CLUSTERS=1 (cuOccupancyMaxActiveClusters answers 0),
// FAKECUDA_SMS (SM count, default 4), FAKECUDA_ORDER=reverse (threads and blocks
// in reverse order: a race shows as a changed result), FAKECUDA_LOG=1 (print every launch),
// FAKECUDA_COVERAGE=FILE (append "kernel launches" lines at exit), FAKECUDA_SMEM_OPTIN=BYTES
// (the opt-in shared memory per block, default an H100's), FAKECUDA_TRAFFIC_LOG=1 (the traffic
// build: each launch's counts).
//
// Built with -DEMU_TRAFFIC and the kernels instrumented (traffic.h, run.sh), it also counts each
// launch's device memory traffic; `fakecuda_traffic_take` (exported beside the driver API) hands
// the totals since its last call to `cunorm bench --traffic`.
#include "shim.h"
#include "kernels_emu.inc"

#include <chrono>
#include <map>
#include <set>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
enum : CUresult {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_NOT_INITIALIZED = 3,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_IMAGE = 200,
    CUDA_ERROR_NO_BINARY_FOR_GPU = 209,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES = 701,
    CUDA_ERROR_NOT_SUPPORTED = 801,
};

#define API extern "C" __attribute__((visibility("default"))) CUresult

namespace {

constexpr int ARCH = 90;
constexpr int H100_SMEM_OPTIN = 232448;  // H100: 227 KiB per block after opting in
constexpr int DEFAULT_SMEM = 48 * 1024;

std::recursive_mutex mu;
bool initialized = false;
std::map<uintptr_t, size_t> allocs;  // device allocations: base -> bytes
size_t live_bytes = 0;                // their total

#ifdef EMU_TRAFFIC
unsigned long long traffic_totals[4] = {};  // see fakecuda_traffic_take

// Runs one launch with traffic counting on, over the allocations live now. With
// FAKECUDA_TRAFFIC_LOG=1 each launch's counts go to stderr.
template <class F> void traffic_launch(const std::string& name, F&& run) {
    std::vector<uintptr_t> lo, hi;
    std::vector<unsigned char> big;
    for (auto& [base, n] : allocs) {
        lo.push_back(base);
        hi.push_back(base + n);
        big.push_back(n > (1u << 20));
    }
    EmuTraffic& t = emu_traffic;
    t.lo = lo.data();
    t.hi = hi.data();
    t.big = big.data();
    t.ranges = (int)lo.size();
    t.loaded = t.stored = t.max_thread = 0;
    t.on = true;
    run();
    t.on = false;
    traffic_totals[0] += 1;
    traffic_totals[1] += t.loaded;
    traffic_totals[2] += t.stored;
    traffic_totals[3] = std::max(traffic_totals[3], t.max_thread);
    if (std::getenv("FAKECUDA_TRAFFIC_LOG"))
        std::fprintf(stderr, "fakecuda traffic: %s loaded %llu stored %llu max accesses per thread %llu\n",
                     name.c_str(), t.loaded, t.stored, t.max_thread);
}
#endif

int sms() {
    const char* s = std::getenv("FAKECUDA_SMS");
    return s ? std::max(1, std::atoi(s)) : 4;
}

// The opt-in shared memory per block: an H100's, or FAKECUDA_SMEM_OPTIN bytes (101376, 99 KiB,
// as sm_86/sm_89 GPUs: shorter rows then take the kernels for rows beyond shared memory).
int max_smem_optin() {
    const char* s = std::getenv("FAKECUDA_SMEM_OPTIN");
    return s ? std::max(DEFAULT_SMEM, std::atoi(s)) : H100_SMEM_OPTIN;
}

void complain(const std::string& what) { std::fprintf(stderr, "fakecuda: %s\n", what.c_str()); }

// Whether [p, p + n) lies inside one live allocation (n = 0: p inside or at its end).
bool inside(uintptr_t p, size_t n) {
    auto it = allocs.upper_bound(p);
    if (it == allocs.begin()) return false;
    --it;
    return p >= it->first && p + n <= it->first + it->second;
}

CUresult range(CUdeviceptr p, size_t n, const char* call) {
    if (n == 0 || inside(p, n)) return CUDA_SUCCESS;
    complain(std::string(call) + ": " + std::to_string(n) + " bytes at 0x" + std::to_string(p) +
             " are not inside one device allocation");
    return CUDA_ERROR_INVALID_VALUE;
}

// --- kernels ---------------------------------------------------------------------------------
struct Entry {
    // Copies the arguments from the driver's parameter array (as the driver does at launch) and
    // returns the kernel call; fails when a pointer argument is outside device memory.
    std::function<bool(void**, std::function<void()>*, std::string*)> bind;
    // Blocks per cluster the kernel declares (__cluster_dims__; prep.py reads it from the source).
    unsigned cluster = 1;
};

template <class... A, size_t... I>
Entry entry_impl(void (*f)(A...), std::index_sequence<I...>) {
    Entry e;
    e.bind = [f](void** p, std::function<void()>* call, std::string* err) {
        auto args = std::make_tuple(*static_cast<std::decay_t<A>*>(p[I])...);
        bool ok = true;
        auto check = [&](auto v, size_t i) {
            if constexpr (std::is_pointer_v<decltype(v)>) {
                uintptr_t a = (uintptr_t)v;
                if (a != 0 && !inside(a, 0)) {
                    ok = false;
                    *err += "argument " + std::to_string(i) + " points outside device memory; ";
                }
            }
        };
        (check(std::get<I>(args), I), ...);
        *call = [f, args] { std::apply(f, args); };
        return ok;
    };
    return e;
}
template <class... A> Entry emu_entry(void (*f)(A...), unsigned cluster) {
    Entry e = entry_impl(f, std::index_sequence_for<A...>{});
    e.cluster = cluster;
    return e;
}

const std::map<std::string, Entry>& registry() {
    static const std::map<std::string, Entry> r = {
#include "kernels_registry.inc"
    };
    return r;
}

// What the CUBIN says about one kernel.
struct KernelInfo {
    int regs = -1;
    int static_smem = 0;
};

struct Module {
    std::map<std::string, KernelInfo> kernels;
};

struct Function {
    std::string name;
    const Entry* entry;
    KernelInfo info;
    int max_dynamic_smem;
    long launches = 0;
};

std::map<std::string, long> launch_counts;

// Threads per block the register file allows: 65 536 registers, per warp in units of 256.
int max_threads(int regs) {
    int per_warp = ((std::max(regs, 1) * 32 + 255) / 256) * 256;
    int warps = 65536 / per_warp;
    return std::min(1024, warps * 32);
}

template <class T> T rd(const uint8_t* b, size_t off) {
    T v;
    std::memcpy(&v, b + off, sizeof v);
    return v;
}

// Parses a CUBIN: architecture, kernels, register counts (EIATTR_REGCOUNT in .nv.info) and
// static shared memory (.nv.shared.<kernel>, less the 1 KiB the system reserves).
CUresult parse_cubin(const uint8_t* b, Module* m) {
    if (std::memcmp(b, "\x7f" "ELF", 4) != 0 || b[4] != 2) {
        complain("cuModuleLoadData: not a 64-bit ELF (PTX or garbage?): cunorm must load CUBIN");
        return CUDA_ERROR_INVALID_IMAGE;
    }
    if (rd<uint16_t>(b, 18) != 190) {
        complain("cuModuleLoadData: ELF is not for a CUDA GPU");
        return CUDA_ERROR_INVALID_IMAGE;
    }
    // e_flags holds the SM: bits 8-15 in the CUDA 13 ELF ABI (OSABI 0x41), bits 0-7 before.
    const uint32_t flags = rd<uint32_t>(b, 48);
    int arch = b[7] == 0x41 ? (flags >> 8) & 0xff : flags & 0xff;
    if (arch != ARCH) {
        complain("cuModuleLoadData: CUBIN for sm_" + std::to_string(arch) + " on an sm_" +
                 std::to_string(ARCH) + " device");
        return CUDA_ERROR_NO_BINARY_FOR_GPU;
    }
    uint64_t shoff = rd<uint64_t>(b, 40);
    uint16_t shentsize = rd<uint16_t>(b, 58), shnum = rd<uint16_t>(b, 60), shstrndx = rd<uint16_t>(b, 62);
    auto sec = [&](int i, int field) -> uint64_t {  // field offsets of Elf64_Shdr
        size_t o = shoff + (size_t)i * shentsize;
        switch (field) {
            case 0: return rd<uint32_t>(b, o);        // sh_name
            case 1: return rd<uint32_t>(b, o + 4);    // sh_type
            case 4: return rd<uint64_t>(b, o + 24);   // sh_offset
            case 5: return rd<uint64_t>(b, o + 32);   // sh_size
            case 6: return rd<uint32_t>(b, o + 40);   // sh_link
        }
        return 0;
    };
    auto secname = [&](int i) { return std::string((const char*)b + sec(shstrndx, 4) + sec(i, 0)); };
    std::vector<std::string> syms;
    bool reserved = false;
    for (int i = 0; i < shnum; ++i) {
        if (sec(i, 1) == 2) {  // SHT_SYMTAB
            size_t str = sec(sec(i, 6), 4);
            for (size_t o = sec(i, 4); o < sec(i, 4) + sec(i, 5); o += 24)
                syms.push_back(std::string((const char*)b + str + rd<uint32_t>(b, o)));
        }
        if (secname(i).rfind(".nv.shared.reserved", 0) == 0) reserved = true;
    }
    for (int i = 0; i < shnum; ++i) {
        std::string n = secname(i);
        if (n.rfind(".text.", 0) == 0) m->kernels[n.substr(6)];
    }
    for (int i = 0; i < shnum; ++i) {
        std::string n = secname(i);
        if (n.rfind(".nv.shared.", 0) == 0 && m->kernels.count(n.substr(11))) {
            int s = (int)sec(i, 5) - (reserved ? 1024 : 0);
            m->kernels[n.substr(11)].static_smem = std::max(0, s);
        }
        if (n == ".nv.info") {
            size_t o = sec(i, 4), end = o + sec(i, 5);
            while (o < end) {
                uint8_t fmt = b[o], attr = b[o + 1];
                if (fmt == 4) {
                    uint16_t sz = rd<uint16_t>(b, o + 2);
                    if (attr == 0x2f && sz == 8) {  // EIATTR_REGCOUNT: symbol, count
                        uint32_t si = rd<uint32_t>(b, o + 4), v = rd<uint32_t>(b, o + 8);
                        if (si < syms.size() && m->kernels.count(syms[si])) m->kernels[syms[si]].regs = (int)v;
                    }
                    o += 4 + sz;
                } else if (fmt == 3) {
                    o += 4;
                } else if (fmt == 2) {
                    o += 3;
                } else {
                    o += 2;
                }
            }
        }
    }
    for (auto& [name, k] : m->kernels)
        if (k.regs < 0) {
            complain("cuModuleLoadData: no register count for " + name);
            return CUDA_ERROR_INVALID_IMAGE;
        }
    return CUDA_SUCCESS;
}

double now_ms() {
    using namespace std::chrono;
    return duration<double, std::milli>(steady_clock::now().time_since_epoch()).count();
}

struct Event {
    double t = 0;
};
struct Context {
    int device = 0;
};
Context primary;
thread_local Context* current = nullptr;

struct Coverage {
    ~Coverage() {
        const char* f = std::getenv("FAKECUDA_COVERAGE");
        if (!f) return;
        if (FILE* o = std::fopen(f, "a")) {
            for (auto& [k, n] : launch_counts) std::fprintf(o, "%s %ld\n", k.c_str(), n);
            std::fclose(o);
        }
    }
} coverage;

}  // namespace

#define LOCK std::lock_guard<std::recursive_mutex> lock_(mu)
static void pool_sync();  // the memory pool at a synchronization (below)
static size_t pool_cached = 0;  // bytes the memory pool caches (below)
#define NEED_INIT \
    if (!initialized) return CUDA_ERROR_NOT_INITIALIZED

// --- initialization, devices, contexts ---------------------------------------------------------
API cuInit(unsigned) {
    LOCK;
    initialized = true;
    const char* order = std::getenv("FAKECUDA_ORDER");
    emu_reverse = order && std::string(order) == "reverse";
    return CUDA_SUCCESS;
}
API cuDriverGetVersion(int* v) {
    *v = 13000;
    return CUDA_SUCCESS;
}
API cuDeviceGetCount(int* n) {
    NEED_INIT;
    *n = 1;
    return CUDA_SUCCESS;
}
API cuDeviceGet(CUdevice* d, int ordinal) {
    NEED_INIT;
    if (ordinal != 0) return CUDA_ERROR_INVALID_DEVICE;
    *d = 0;
    return CUDA_SUCCESS;
}
API cuDeviceGetName(char* name, int len, CUdevice) {
    std::snprintf(name, len, "cunorm fake CUDA device (CPU emulation, sm_90 limits; not a GPU)");
    return CUDA_SUCCESS;
}
API cuDeviceTotalMem_v2(size_t* bytes, CUdevice) {
    *bytes = 80ull << 30;
    return CUDA_SUCCESS;
}
API cuDeviceGetAttribute(int* v, int attr, CUdevice) {
    switch (attr) {
        case 1: *v = 1024; break;               // MAX_THREADS_PER_BLOCK
        case 2: case 3: *v = 1024; break;       // MAX_BLOCK_DIM_X, Y
        case 4: *v = 64; break;                 // MAX_BLOCK_DIM_Z
        case 5: *v = 2147483647; break;         // MAX_GRID_DIM_X
        case 6: case 7: *v = 65535; break;      // MAX_GRID_DIM_Y, Z
        case 8: *v = DEFAULT_SMEM; break;       // MAX_SHARED_MEMORY_PER_BLOCK
        case 10: *v = 32; break;                // WARP_SIZE
        case 12: *v = 65536; break;             // MAX_REGISTERS_PER_BLOCK
        case 13: *v = 1980000; break;           // CLOCK_RATE (kHz)
        case 16: *v = sms(); break;             // MULTIPROCESSOR_COUNT
        case 36: *v = 2619000; break;           // MEMORY_CLOCK_RATE (kHz)
        case 37: *v = 5120; break;              // GLOBAL_MEMORY_BUS_WIDTH
        case 38: *v = 50 << 20; break;          // L2_CACHE_SIZE
        case 75: *v = ARCH / 10; break;         // COMPUTE_CAPABILITY_MAJOR
        case 76: *v = ARCH % 10; break;         // COMPUTE_CAPABILITY_MINOR
        case 97: *v = max_smem_optin(); break;    // MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
        case 115: *v = 1; break;                // MEMORY_POOLS_SUPPORTED
        default: *v = 0; break;
    }
    return CUDA_SUCCESS;
}
API cuDevicePrimaryCtxRetain(void** ctx, CUdevice) {
    NEED_INIT;
    *ctx = &primary;
    return CUDA_SUCCESS;
}
API cuDevicePrimaryCtxRelease_v2(CUdevice) { return CUDA_SUCCESS; }
API cuCtxSetCurrent(void* ctx) {
    current = (Context*)ctx;
    return CUDA_SUCCESS;
}
API cuCtxGetCurrent(void** ctx) {
    *ctx = current;
    return CUDA_SUCCESS;
}
API cuCtxGetDevice(CUdevice* d) {
    *d = 0;
    return CUDA_SUCCESS;
}
API cuCtxSynchronize() { pool_sync(); return CUDA_SUCCESS; }

// Error codes this driver returns: name and message, as the real driver words them.
struct ErrorText {
    CUresult code;
    const char* name;
    const char* text;
};
const ErrorText* error_text(CUresult e) {
    static const ErrorText table[] = {
        {CUDA_SUCCESS, "CUDA_SUCCESS", "no error"},
        {CUDA_ERROR_INVALID_VALUE, "CUDA_ERROR_INVALID_VALUE", "invalid argument"},
        {CUDA_ERROR_OUT_OF_MEMORY, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"},
        {CUDA_ERROR_NOT_INITIALIZED, "CUDA_ERROR_NOT_INITIALIZED", "initialization error"},
        {CUDA_ERROR_INVALID_DEVICE, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"},
        {CUDA_ERROR_INVALID_IMAGE, "CUDA_ERROR_INVALID_IMAGE", "device kernel image is invalid"},
        {CUDA_ERROR_NO_BINARY_FOR_GPU, "CUDA_ERROR_NO_BINARY_FOR_GPU",
         "no kernel image is available for execution on the device"},
        {CUDA_ERROR_INVALID_HANDLE, "CUDA_ERROR_INVALID_HANDLE", "invalid resource handle"},
        {CUDA_ERROR_NOT_FOUND, "CUDA_ERROR_NOT_FOUND", "named symbol not found"},
        {CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES, "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES",
         "too many resources requested for launch"},
        {CUDA_ERROR_NOT_SUPPORTED, "CUDA_ERROR_NOT_SUPPORTED", "operation not supported"},
    };
    for (const auto& t : table)
        if (t.code == e) return &t;
    return nullptr;
}
API cuGetErrorString(CUresult e, const char** s) {
    const ErrorText* t = error_text(e);
    *s = t ? t->text : "unknown error";
    return t ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}
API cuGetErrorName(CUresult e, const char** s) {
    const ErrorText* t = error_text(e);
    *s = t ? t->name : "CUDA_ERROR_UNKNOWN";
    return t ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

// --- streams and events (everything runs synchronously at the call) -------------------------
API cuStreamCreate(void** s, unsigned) {
    *s = new int(0);
    return CUDA_SUCCESS;
}
API cuStreamCreateWithPriority(void** s, unsigned, int) { return cuStreamCreate(s, 0); }
API cuStreamDestroy_v2(void* s) {
    delete (int*)s;
    return CUDA_SUCCESS;
}
API cuStreamSynchronize(void*) { pool_sync(); return CUDA_SUCCESS; }
API cuStreamQuery(void*) { return CUDA_SUCCESS; }
API cuStreamWaitEvent(void*, void*, unsigned) { return CUDA_SUCCESS; }
API cuLaunchHostFunc(void*, void (*fn)(void*), void* data) {
    fn(data);
    return CUDA_SUCCESS;
}
API cuEventCreate(void** e, unsigned) {
    *e = new Event;
    return CUDA_SUCCESS;
}
API cuEventDestroy_v2(void* e) {
    delete (Event*)e;
    return CUDA_SUCCESS;
}
API cuEventRecord(void* e, void*) {
    ((Event*)e)->t = now_ms();
    return CUDA_SUCCESS;
}
API cuEventSynchronize(void*) { pool_sync(); return CUDA_SUCCESS; }
API cuEventQuery(void*) { return CUDA_SUCCESS; }
API cuEventElapsedTime(float* ms, void* a, void* b) {
    *ms = (float)(((Event*)b)->t - ((Event*)a)->t);
    return CUDA_SUCCESS;
}
API cuEventElapsedTime_v2(float* ms, void* a, void* b) { return cuEventElapsedTime(ms, a, b); }

// --- memory ------------------------------------------------------------------------------------
API cuMemAlloc_v2(CUdeviceptr* p, size_t n) {
    LOCK;
    NEED_INIT;
    void* m = nullptr;
    // More than the device's free memory (cuDeviceTotalMem less live allocations and what the
    // pool caches) is out of memory, as on a GPU.
    if (n > (80ull << 30) || live_bytes + pool_cached + n > (80ull << 30)) return CUDA_ERROR_OUT_OF_MEMORY;
    if (n == 0 || posix_memalign(&m, 256, n) != 0) return n == 0 ? CUDA_ERROR_INVALID_VALUE : CUDA_ERROR_OUT_OF_MEMORY;
    std::memset(m, 0xa5, n);  // uninitialized device memory is garbage, not zeros
    allocs[(uintptr_t)m] = n;
    live_bytes += n;
    *p = (CUdeviceptr)m;
    return CUDA_SUCCESS;
}
// The memory pool of stream-ordered allocation (one per device, a dummy handle), modelled as the
// driver keeps it: memory freed with cuMemFreeAsync stays reserved by the pool (`pool_cached`)
// and is reused by cuMemAllocAsync; a synchronization releases cached memory until the pool's
// reserved bytes (in use + cached) are within the release threshold (0 unless set, as on a
// GPU); cuMemPoolTrimTo(keep) releases it until they are within `keep`. Memory the pool holds
// counts as used in cuMemGetInfo, and cuMemAlloc (not from the pool) cannot have it.
static int pool_tag;
static std::set<uintptr_t> pool_allocs;  // live cuMemAllocAsync allocations
static size_t pool_used = 0;
static unsigned long long pool_threshold = 0;
static void pool_release_to(unsigned long long keep) {
    LOCK;
    const unsigned long long room = keep > pool_used ? keep - pool_used : 0;
    if (pool_cached > room) pool_cached = (size_t)room;
}
static void pool_sync() { pool_release_to(pool_threshold); }
API cuMemAllocAsync(CUdeviceptr* p, size_t n, void*) {
    LOCK;
    // The pool reuses what it caches: only the rest must be free on the device.
    const size_t reuse = std::min(pool_cached, n);
    pool_cached -= reuse;
    CUresult r = cuMemAlloc_v2(p, n);
    if (r != CUDA_SUCCESS) {
        pool_cached += reuse;
        return r;
    }
    pool_allocs.insert((uintptr_t)*p);
    pool_used += n;
    return r;
}
API cuMemFree_v2(CUdeviceptr p) {
    LOCK;
    auto it = allocs.find((uintptr_t)p);
    if (it == allocs.end()) {
        complain("cuMemFree: not an allocation");
        return CUDA_ERROR_INVALID_VALUE;
    }
    live_bytes -= it->second;
    allocs.erase(it);
    std::free((void*)p);
    return CUDA_SUCCESS;
}
API cuMemFreeAsync(CUdeviceptr p, void*) {
    LOCK;
    auto it = allocs.find((uintptr_t)p);
    const size_t n = it == allocs.end() ? 0 : it->second;
    CUresult r = cuMemFree_v2(p);
    if (r == CUDA_SUCCESS && pool_allocs.erase((uintptr_t)p)) {
        pool_used -= n;
        pool_cached += n;
    }
    return r;
}
API cuDeviceGetMemPool(void** pool, CUdevice) {
    *pool = &pool_tag;
    return CUDA_SUCCESS;
}
API cuMemPoolSetAttribute(void* pool, int attr, void* value) {
    if (pool != &pool_tag || attr != 4 || value == nullptr) {
        complain("cuMemPoolSetAttribute: not the pool's release threshold (attribute 4)");
        return CUDA_ERROR_INVALID_VALUE;
    }
    LOCK;
    pool_threshold = *(const unsigned long long*)value;
    return CUDA_SUCCESS;
}
API cuMemPoolGetAttribute(void* pool, int attr, void* value) {
    if (pool != &pool_tag || value == nullptr || (attr != 4 && attr != 5 && attr != 7)) {
        complain("cuMemPoolGetAttribute: modelled: release threshold (4), reserved (5), used (7)");
        return CUDA_ERROR_INVALID_VALUE;
    }
    LOCK;
    *(unsigned long long*)value = attr == 4 ? pool_threshold : attr == 5 ? pool_used + pool_cached : pool_used;
    return CUDA_SUCCESS;
}
API cuMemPoolTrimTo(void* pool, size_t keep) {
    if (pool != &pool_tag) {
        complain("cuMemPoolTrimTo: not the pool");
        return CUDA_ERROR_INVALID_VALUE;
    }
    pool_release_to(keep);
    return CUDA_SUCCESS;
}
API cuMemGetInfo_v2(size_t* free_b, size_t* total) {
    LOCK;
    *total = 80ull << 30;
    *free_b = *total - std::min<size_t>(*total, live_bytes + pool_cached);
    return CUDA_SUCCESS;
}
API cuMemHostAlloc(void** p, size_t n, unsigned) {
    *p = std::malloc(n ? n : 1);
    return *p ? CUDA_SUCCESS : CUDA_ERROR_OUT_OF_MEMORY;
}
API cuMemFreeHost(void* p) {
    std::free(p);
    return CUDA_SUCCESS;
}
API cuMemcpyHtoD_v2(CUdeviceptr d, const void* h, size_t n) {
    LOCK;
    if (CUresult r = range(d, n, "cuMemcpyHtoD")) return r;
    std::memcpy((void*)d, h, n);
    return CUDA_SUCCESS;
}
API cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void* h, size_t n, void*) { return cuMemcpyHtoD_v2(d, h, n); }
API cuMemcpyDtoH_v2(void* h, CUdeviceptr d, size_t n) {
    LOCK;
    if (CUresult r = range(d, n, "cuMemcpyDtoH")) return r;
    std::memcpy(h, (const void*)d, n);
    return CUDA_SUCCESS;
}
API cuMemcpyDtoHAsync_v2(void* h, CUdeviceptr d, size_t n, void*) { return cuMemcpyDtoH_v2(h, d, n); }
API cuMemcpyDtoD_v2(CUdeviceptr d, CUdeviceptr s, size_t n) {
    LOCK;
    if (CUresult r = range(d, n, "cuMemcpyDtoD dst")) return r;
    if (CUresult r = range(s, n, "cuMemcpyDtoD src")) return r;
    std::memmove((void*)d, (const void*)s, n);
    return CUDA_SUCCESS;
}
API cuMemcpyDtoDAsync_v2(CUdeviceptr d, CUdeviceptr s, size_t n, void*) { return cuMemcpyDtoD_v2(d, s, n); }
API cuMemsetD8_v2(CUdeviceptr d, unsigned char v, size_t n) {
    LOCK;
    if (CUresult r = range(d, n, "cuMemsetD8")) return r;
    std::memset((void*)d, v, n);
    return CUDA_SUCCESS;
}
API cuMemsetD8Async(CUdeviceptr d, unsigned char v, size_t n, void*) { return cuMemsetD8_v2(d, v, n); }

// --- modules and launches --------------------------------------------------------------------
API cuModuleLoadData(void** module, const void* image) {
    LOCK;
    NEED_INIT;
    auto* m = new Module;
    if (CUresult r = parse_cubin((const uint8_t*)image, m)) {
        delete m;
        return r;
    }
    *module = m;
    return CUDA_SUCCESS;
}
API cuModuleUnload(void* module) {
    delete (Module*)module;
    return CUDA_SUCCESS;
}
API cuModuleGetFunction(void** f, void* module, const char* name) {
    LOCK;
    auto* m = (Module*)module;
    auto k = m->kernels.find(name);
    auto e = registry().find(name);
    if (k == m->kernels.end() || e == registry().end()) {
        complain(std::string("cuModuleGetFunction: no kernel ") + name);
        return CUDA_ERROR_NOT_FOUND;
    }
    *f = new Function{name, &e->second, k->second, DEFAULT_SMEM - k->second.static_smem};
    return CUDA_SUCCESS;
}
API cuFuncGetAttribute(int* v, int attr, void* fp) {
    auto* f = (Function*)fp;
    switch (attr) {
        case 0: *v = max_threads(f->info.regs); break;  // MAX_THREADS_PER_BLOCK
        case 1: *v = f->info.static_smem; break;        // SHARED_SIZE_BYTES
        case 4: *v = f->info.regs; break;               // NUM_REGS
        case 8: *v = f->max_dynamic_smem; break;        // MAX_DYNAMIC_SHARED_SIZE_BYTES
        default: *v = 0; break;
    }
    return CUDA_SUCCESS;
}
API cuFuncSetAttribute(void* fp, int attr, int v) {
    LOCK;
    auto* f = (Function*)fp;
    if (attr == 8) {
        if (v < 0 || v + f->info.static_smem > max_smem_optin()) {
            complain(f->name + ": dynamic shared memory " + std::to_string(v) + " B exceeds the opt-in limit");
            return CUDA_ERROR_INVALID_VALUE;
        }
        f->max_dynamic_smem = v;
    }
    return CUDA_SUCCESS;
}
API cuFuncSetCacheConfig(void*, int) { return CUDA_SUCCESS; }

API cuLaunchKernel(void* fp, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                   unsigned smem, void*, void** params, void** extra) {
    LOCK;
    auto* f = (Function*)fp;
    const unsigned long threads = (unsigned long)bx * by * bz;
    std::string cfg = f->name + " grid (" + std::to_string(gx) + "," + std::to_string(gy) + "," +
                      std::to_string(gz) + ") block (" + std::to_string(bx) + "," + std::to_string(by) + "," +
                      std::to_string(bz) + ") smem " + std::to_string(smem);
    if (std::getenv("FAKECUDA_LOG")) complain("launch " + cfg);
    if (!gx || !gy || !gz || !bx || !by || !bz || threads > 1024 || bx > 1024 || by > 1024 || bz > 64 ||
        gx > 2147483647u || gy > 65535 || gz > 65535 || extra != nullptr || params == nullptr) {
        complain("invalid launch configuration: " + cfg);
        return CUDA_ERROR_INVALID_VALUE;
    }
    if ((int)threads > max_threads(f->info.regs)) {
        complain("too many resources requested for launch: " + cfg + " with " + std::to_string(f->info.regs) +
                 " registers per thread allows " + std::to_string(max_threads(f->info.regs)) + " threads");
        return CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES;
    }
    if ((int)smem > f->max_dynamic_smem) {
        complain("dynamic shared memory above the function's limit (" + std::to_string(f->max_dynamic_smem) +
                 " B; opt in with cuFuncSetAttribute): " + cfg);
        return CUDA_ERROR_INVALID_VALUE;
    }
    // A kernel with compile-time cluster dimensions takes a grid of whole clusters.
    const unsigned cluster = f->entry->cluster;
    if (cluster > 1 && (gx % cluster != 0 || threads * cluster > 8 * 1024)) {
        complain("cluster launch with a grid that is not whole clusters of " + std::to_string(cluster) + ": " + cfg);
        return CUDA_ERROR_INVALID_VALUE;
    }
    std::function<void()> call;
    std::string err;
    if (!f->entry->bind(params, &call, &err)) {
        complain("illegal address: " + cfg + ": " + err);
        std::abort();  // a GPU would fault and poison the context
    }
    ++launch_counts[f->name];
#ifdef EMU_TRAFFIC
    traffic_launch(f->name, [&] { emu_launch({gx, gy, gz}, {bx, by, bz}, smem, call, cluster); });
#else
    emu_launch({gx, gy, gz}, {bx, by, bz}, smem, call, cluster);
#endif
    return CUDA_SUCCESS;
}

// The clusters of a launch configuration that can be resident at once: blocks an SM by
// registers, threads and shared memory (as max_threads), over the SMs, in whole clusters; a
// cluster of more than 8 blocks (non-portable, which cunorm never asks for) gets 0.
struct LaunchConfigView {
    unsigned gx, gy, gz, bx, by, bz, smem;
    void* stream;
    void* attrs;
    unsigned nattrs;
};
API cuOccupancyMaxActiveClusters(int* n, void* fp, const LaunchConfigView* c) {
    LOCK;
    auto* f = (Function*)fp;
    const unsigned cluster = f->entry->cluster;
    const int threads = (int)(c->bx * c->by * c->bz);
    if (!n || threads <= 0 || threads > max_threads(f->info.regs)) return CUDA_ERROR_INVALID_VALUE;
    const int per_warp = ((std::max(f->info.regs, 1) * 32 + 255) / 256) * 256;
    const int warps = (threads + 31) / 32;
    int blocks = std::min(65536 / (per_warp * warps), 2048 / threads);
    const int smem = (int)c->smem + f->info.static_smem;
    if (smem > 0) blocks = std::min(blocks, max_smem_optin() / smem);
    // FAKECUDA_NO_CLUSTERS=1: no cluster is ever resident (the host must fall back).
    const bool none = std::getenv("FAKECUDA_NO_CLUSTERS") && std::string(std::getenv("FAKECUDA_NO_CLUSTERS")) == "1";
    *n = cluster > 8 || none ? 0 : blocks * sms() / (int)cluster;
    return CUDA_SUCCESS;
}

#ifdef EMU_TRAFFIC
// Totals since the last call: out[0] launches, out[1] bytes loaded from and out[2] bytes stored
// to allocations larger than 1 MiB, out[3] the most accesses one thread made to device memory
// in any of those launches. Returns 0; only the traffic build exports it.
extern "C" __attribute__((visibility("default"))) int fakecuda_traffic_take(unsigned long long* out) {
    LOCK;
    for (int i = 0; i < 4; ++i) out[i] = traffic_totals[i];
    for (auto& v : traffic_totals) v = 0;
    return 0;
}
#endif

// NVRTC itself opens libcuda and asks for the driver's private export tables; a fake has none,
// and NVRTC compiles without them.
API cuGetExportTable(const void** table, const void*) {
    *table = nullptr;
    return CUDA_ERROR_NOT_SUPPORTED;
}
