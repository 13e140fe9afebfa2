// Utility kernels of the benchmark (`cunorm bench`), not of any op.
#include "common.cuh"

// Evicts L2 by reading `words` 16-byte words of `buf` (bigger than L2): unlike a memset, it
// leaves no dirty lines to be written back inside the next timed kernel. Each thread folds what
// it read; the fold is stored only if it equals `never` (the caller passes a value the buffer's
// contents cannot give), so the loads cannot be dropped and nothing is written.
extern "C" __global__ void l2_flush_read(const Pack<float>* __restrict__ buf, u64 words,
                                         unsigned never, unsigned* __restrict__ sink) {
    unsigned acc = 0;
    const u64 stride = (u64)gridDim.x * blockDim.x;
#pragma unroll 1
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < words; i += stride) {
        const Pack<float> p = buf[i];
        acc ^= __float_as_uint(p.v[0]) ^ __float_as_uint(p.v[1]) ^ __float_as_uint(p.v[2]) ^
               __float_as_uint(p.v[3]);
    }
    if (acc == never) sink[0] = acc;
}
