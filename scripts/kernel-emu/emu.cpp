// Runs cunorm's CUDA kernels on the CPU (shim.h) with the launch sequences of src/ops/{rows,planes}/cuda.rs
// and checks every output against a naive double-precision reference. Logic check only: it
// proves indexing, reductions, chunking, layouts and coefficient algebra, not GPU behaviour.
#include <bit>
#include "shim.h"
#include "kernels_emu.inc"  // common.cuh + rows.cu + planes.cu, preprocessed by run.sh

#include <cstdio>
#include <random>
#include <string>
#include <type_traits>

static int failures = 0, checks = 0, multi_plane_cases = 0, merged_cases = 0, tile_cases = 0, contig_tile_cases = 0,
           cluster_cases = 0;
static const int SMS = 3;  // a small "GPU" so grid-stride loops and chunking are exercised
static const size_t SMEM_OPTIN = 227 * 1024;  // H100's opt-in shared memory per block

// As rows_fwd_config (src/ops/rows/cuda.rs): threads, whether the row is cached (it fits the
// dynamic shared memory left beside the kernel's static scratch, 384 B), blocks.
template <class T> void rows_cfg(size_t rows, int cols, unsigned* threads, int* cache, unsigned* blocks) {
    const int PN = 16 / sizeof(T);
    *threads = std::min<size_t>(1024, std::max<size_t>(32, ((cols + PN - 1) / PN + 31) / 32 * 32));
    *cache = (size_t)cols * sizeof(T) + 384 <= SMEM_OPTIN;
    *blocks = std::min<size_t>(rows, SMS * 32);
}

template <class T> float tf(T v) { return to_float(v); }
template <class T> std::vector<T> cast(const std::vector<double>& v) {
    std::vector<T> o(v.size());
    for (size_t i = 0; i < v.size(); ++i) o[i] = from_float<T>((float)v[i]);
    return o;
}
template <class T> std::vector<double> widen(const std::vector<T>& v) {
    std::vector<double> o(v.size());
    for (size_t i = 0; i < v.size(); ++i) o[i] = tf(v[i]);
    return o;
}
std::vector<double> randn(size_t n, unsigned seed, double mean = 0) {
    std::mt19937 g(seed);
    std::normal_distribution<double> d(mean, 1.0);
    std::vector<double> v(n);
    for (auto& x : v) x = d(g);
    return v;
}
void expect(const std::string& what, const std::vector<double>& got, const std::vector<double>& want, double atol, double rtol) {
    ++checks;
    double worst = 0;
    size_t wi = 0;
    bool bad = got.size() != want.size();
    for (size_t i = 0; !bad && i < got.size(); ++i) {
        double e = std::fabs(got[i] - want[i]);
        double lim = atol + rtol * std::fabs(want[i]);
        if (!(e <= lim)) {
            bad = true;
            wi = i;
            worst = e;
        }
    }
    if (bad) {
        ++failures;
        printf("FAIL %s: element %zu got %.7g want %.7g (err %.3g)\n", what.c_str(), wi,
               wi < got.size() ? got[wi] : NAN, wi < want.size() ? want[wi] : NAN, worst);
    }
}

// Naive reference over groups (as tests/common/oracle.rs).
struct Ref {
    std::vector<double> y, mean, rstd, dx, dw, db;
};
template <class G, class P>
Ref reference(const std::vector<double>& x, const std::vector<double>& g, const std::vector<double>* w,
              const std::vector<double>* b, size_t groups, size_t params, G group, P param, bool center, double eps) {
    Ref r;
    std::vector<double> cnt(groups), sum(groups), sq(groups), su(groups), sux(groups);
    for (size_t i = 0; i < x.size(); ++i) { cnt[group(i)] += 1; sum[group(i)] += x[i]; }
    r.mean.resize(groups);
    for (size_t k = 0; k < groups; ++k) r.mean[k] = center ? sum[k] / cnt[k] : 0;
    for (size_t i = 0; i < x.size(); ++i) { double d = x[i] - r.mean[group(i)]; sq[group(i)] += d * d; }
    r.rstd.resize(groups);
    for (size_t k = 0; k < groups; ++k) r.rstd[k] = 1 / std::sqrt(sq[k] / cnt[k] + eps);
    r.y.resize(x.size()); r.dx.resize(x.size()); r.dw.assign(params, 0); r.db.assign(params, 0);
    auto xh = [&](size_t i) { return (x[i] - r.mean[group(i)]) * r.rstd[group(i)]; };
    for (size_t i = 0; i < x.size(); ++i) {
        size_t p = param(i);
        r.y[i] = xh(i) * (w ? (*w)[p] : 1) + (b ? (*b)[p] : 0);
        double u = g[i] * (w ? (*w)[p] : 1);
        su[group(i)] += u; sux[group(i)] += u * xh(i);
        r.dw[p] += g[i] * xh(i); r.db[p] += g[i];
    }
    for (size_t i = 0; i < x.size(); ++i) {
        size_t k = group(i), p = param(i);
        double u = g[i] * (w ? (*w)[p] : 1);
        r.dx[i] = r.rstd[k] * (u - (center ? su[k] / cnt[k] : 0) - xh(i) * sux[k] / cnt[k]);
    }
    return r;
}

template <class T> constexpr bool is_bf16 = std::is_same_v<T, bf16_t>;
template <class T> double tol_abs() { return sizeof(T) == 4 ? 2e-5 : is_bf16<T> ? 3e-2 : 4e-3; }
template <class T> double tol_rel() { return sizeof(T) == 4 ? 2e-5 : is_bf16<T> ? 1.6e-2 : 2e-3; }
template <class T> const char* tname() { return sizeof(T) == 4 ? "f32" : is_bf16<T> ? "bf16" : "f16"; }

// ---------------------------------------------------------------------------------------------
template <class T>
void rows_case(size_t rows, int cols, bool center, bool affine) {
    std::string tag = std::string(center ? "layer_norm" : "rms_norm") + " " + tname<T>() + " " +
                      std::to_string(rows) + "x" + std::to_string(cols) + (affine ? " affine" : "");
    auto xd = widen(cast<T>(randn(rows * cols, 1)));
    auto gd = widen(cast<T>(randn(rows * cols, 2)));
    auto wd = widen(cast<float>(randn(cols, 3, 1))), bd = widen(cast<float>(randn(cols, 4)));
    auto x = cast<T>(xd), g = cast<T>(gd);
    auto w = cast<float>(wd), b = cast<float>(bd);
    std::vector<T> y(rows * cols), dx(rows * cols);
    std::vector<float> mean(rows), rstd(rows), dw(cols), db(cols);
    const float eps = 1e-5f;
    // forward, as raw::rows_forward
    unsigned threads, blocks;
    int cache;
    rows_cfg<T>(rows, cols, &threads, &cache, &blocks);
    const float* wp = affine ? w.data() : nullptr;
    const float* bp = affine && center ? b.data() : nullptr;
    emu_launch({blocks}, {threads}, cache ? cols * sizeof(T) : 0, [&] {
        if (center) rows_fwd<T, true>(x.data(), y.data(), wp, bp, mean.data(), rstd.data(), nullptr, rows, cols, 1, 1, eps, cache, 1);
        else rows_fwd<T, false>(x.data(), y.data(), wp, nullptr, nullptr, rstd.data(), nullptr, rows, cols, 1, 1, eps, cache, 0);
    });
    // backward, as raw::rows_backward launches the long-rows kernels (tile_geometry in
    // src/ops/rows/cuda.rs): the row sums, then column tiles over chunks of rows.
    const size_t bpacks = (cols + 16 / sizeof(T) - 1) / (16 / sizeof(T));
    const size_t tthreads = std::min<size_t>(256, (bpacks + 31) / 32 * 32), tiles = (bpacks + tthreads - 1) / tthreads;
    size_t chunk = std::clamp<size_t>((rows * tiles + 1023) / 1024, 32, 128);
    chunk = std::max(chunk, (rows + ((1u << 24) / cols) - 1) / ((1u << 24) / cols));
    const size_t parts = (rows + chunk - 1) / chunk;
    std::vector<float> sums(2 * rows, NAN), pw(parts * cols, NAN), pb(parts * cols, NAN);
    unsigned bt = std::min<size_t>(1024, std::max<size_t>(32, (bpacks + 31) / 32 * 32));
    emu_launch({(unsigned)std::min<size_t>(rows, SMS * 16)}, {bt}, 0, [&] {
        if (center) rows_bwd_sums<T, true>(g.data(), x.data(), wp, mean.data(), rstd.data(), sums.data(), rows, cols);
        else rows_bwd_sums<T, false>(g.data(), x.data(), wp, nullptr, rstd.data(), sums.data(), rows, cols);
    });
    emu_launch({(unsigned)tiles, (unsigned)parts}, {(unsigned)tthreads}, 0, [&] {
        if (center) rows_bwd_tile<T, true>(g.data(), x.data(), wp, mean.data(), rstd.data(), sums.data(), dx.data(), pw.data(), pb.data(), rows, cols, (int)chunk);
        else rows_bwd_tile<T, false>(g.data(), x.data(), wp, nullptr, rstd.data(), sums.data(), dx.data(), pw.data(), pb.data(), rows, cols, (int)chunk);
    });
    // Two-stage column sums when there are more than 64 partial rows (col_sum in cuda.rs).
    auto col_sum = [&](std::vector<float>& part, size_t nparts, std::vector<float>& out) {
        int P = (int)nparts, C = cols;
        if (P <= 64) {
            emu_launch({(unsigned)((C + 255) / 256)}, {256}, 0, [&] { rows_col_sum_f32(part.data(), out.data(), P, C, P); });
            return;
        }
        int chunks = (P + 63) / 64;
        std::vector<float> mid((size_t)chunks * C, NAN);
        emu_launch({(unsigned)((C + 255) / 256), (unsigned)chunks}, {256}, 0, [&] { rows_col_sum_f32(part.data(), mid.data(), P, C, 64); });
        emu_launch({(unsigned)((C + 255) / 256)}, {256}, 0, [&] { rows_col_sum_f32(mid.data(), out.data(), chunks, C, chunks); });
    };
    col_sum(pw, parts, dw);
    col_sum(pb, parts, db);
    std::vector<double>* wr = affine ? &wd : nullptr;
    std::vector<double>* br = affine && center ? &bd : nullptr;
    Ref r = reference(xd, gd, wr, br, rows, cols, [&](size_t i) { return i / cols; },
                      [&](size_t i) { return i % cols; }, center, eps);
    auto round = [](const std::vector<double>& v) { return widen(cast<T>(v)); };
    expect(tag + " y", widen(y), round(r.y), tol_abs<T>(), tol_rel<T>());
    if (center) expect(tag + " mean", widen(mean), r.mean, 1e-5, 1e-5);
    expect(tag + " rstd", widen(rstd), r.rstd, 1e-5, 1e-4);
    expect(tag + " dx", widen(dx), round(r.dx), tol_abs<T>() * 5, tol_rel<T>() * 5);
    expect(tag + " dw", widen(dw), r.dw, 1e-3, 1e-4);
    expect(tag + " db", widen(db), r.db, 1e-3, 1e-4);

    // The wide forward (rows_fwd with KR = ROWS_WIDE_K), on a small block so that the rows
    // here split between registers (ROWS_WIDE_K packs per thread) and shared memory, as
    // rows_fwd_kernel launches it for rows longer than shared memory: shared memory for the
    // packs past the registers' (none for rows of partial packs, which it reads uncached).
    for (unsigned wt : {32u, 96u}) {
        std::fill(y.begin(), y.end(), from_float<T>(NAN));
        std::fill(mean.begin(), mean.end(), NAN);
        std::fill(rstd.begin(), rstd.end(), NAN);
        const size_t wpn = 16 / sizeof(T), wpacks = cols / wpn;
        const size_t held = (size_t)ROWS_WIDE_K * wt;
        const size_t wsmem = cols % wpn == 0 && wpacks > held ? (wpacks - held) * 16 : 0;
        emu_launch({blocks}, {wt}, wsmem, [&] {
            if (center) rows_fwd<T, true, ROWS_WIDE_K>(x.data(), y.data(), wp, bp, mean.data(), rstd.data(), nullptr, rows, cols, 1, 1, eps, 1, 1);
            else rows_fwd<T, false, ROWS_WIDE_K>(x.data(), y.data(), wp, nullptr, nullptr, rstd.data(), nullptr, rows, cols, 1, 1, eps, 1, 0);
        });
        const std::string wtag = tag + " wide" + std::to_string(wt);
        expect(wtag + " y", widen(y), round(r.y), tol_abs<T>(), tol_rel<T>());
        if (center) expect(wtag + " mean", widen(mean), r.mean, 1e-5, 1e-5);
        expect(wtag + " rstd", widen(rstd), r.rstd, 1e-5, 1e-4);
    }

    // The cluster forward (rows_fwd_cluster), on clusters of 4 and 8 blocks of 32 and 64
    // threads so that the sweep's rows span the cluster's blocks (packs split unevenly, some
    // threads holding none), with fewer clusters than rows (the row stride); rows of whole packs.
    if (cols % (16 / sizeof(T)) == 0)
        for (unsigned cs : {4u, 8u})
            for (unsigned ct : {32u, 64u}) {
                const size_t cpacks = cols / (16 / sizeof(T));
                if (cpacks > (size_t)cs * ct * ROWS_CLUSTER_K) continue;
                std::fill(y.begin(), y.end(), from_float<T>(NAN));
                std::fill(mean.begin(), mean.end(), NAN);
                std::fill(rstd.begin(), rstd.end(), NAN);
                const unsigned clusters = (unsigned)std::min<size_t>(rows, 3);
                emu_launch({clusters * cs}, {ct}, 34 * 4, [&] {
                    if (center) rows_fwd_cluster<T, true>(x.data(), y.data(), wp, bp, mean.data(), rstd.data(), nullptr, rows, cols, 1, 1, eps, 1);
                    else rows_fwd_cluster<T, false>(x.data(), y.data(), wp, nullptr, nullptr, rstd.data(), nullptr, rows, cols, 1, 1, eps, 0);
                }, cs);
                const std::string ctag = tag + " cluster" + std::to_string(cs) + "x" + std::to_string(ct);
                expect(ctag + " y", widen(y), round(r.y), tol_abs<T>(), tol_rel<T>());
                if (center) expect(ctag + " mean", widen(mean), r.mean, 1e-5, 1e-5);
                expect(ctag + " rstd", widen(rstd), r.rstd, 1e-5, 1e-4);
                ++cluster_cases;
                // The cluster backward (rows_bwd_cluster, ROWS_CLUSTER_BWD_K packs of x and dy a
                // thread) on the same clusters, chunks of 2 rows (one partial row each), then the
                // column sums; the statistics are the forward's just checked.
                if (cpacks > (size_t)cs * ct * ROWS_CLUSTER_BWD_K) continue;
                const size_t bchunk = 2, bparts = (rows + bchunk - 1) / bchunk;
                std::vector<float> cpw(bparts * cols, NAN), cpb(bparts * cols, NAN);
                std::fill(dx.begin(), dx.end(), from_float<T>(NAN));
                std::fill(dw.begin(), dw.end(), NAN);
                std::fill(db.begin(), db.end(), NAN);
                const size_t bsmem = (64 + 2 * ROWS_CLUSTER_BWD_K * ct * (16 / sizeof(T))) * 4;
                emu_launch({(unsigned)bparts * cs}, {ct}, bsmem, [&] {
                    if (center) rows_bwd_cluster<T, true>(g.data(), x.data(), wp, mean.data(), rstd.data(), dx.data(), cpw.data(), cpb.data(), rows, cols, (int)bchunk);
                    else rows_bwd_cluster<T, false>(g.data(), x.data(), wp, nullptr, rstd.data(), dx.data(), cpw.data(), cpb.data(), rows, cols, (int)bchunk);
                }, cs);
                col_sum(cpw, bparts, dw);
                col_sum(cpb, bparts, db);
                expect(ctag + " dx", widen(dx), round(r.dx), tol_abs<T>() * 5, tol_rel<T>() * 5);
                expect(ctag + " dw", widen(dw), r.dw, 1e-3, 1e-4);
                expect(ctag + " db", widen(db), r.db, 1e-3, 1e-4);
                ++cluster_cases;
            }

    // The register-resident kernels, as raw::rows_forward/rows_backward launch them when a row
    // fits (RegTeam in src/ops/rows/cuda.rs, with 1024 threads allowed).
    const int PN = 16 / sizeof(T);
    const size_t packs = (cols + PN - 1) / PN;
    auto team = [&](size_t max_k, size_t* tpr, size_t* k, size_t* per_block) {
        if (packs <= 32 * max_k) { *tpr = 32; *k = std::max<size_t>(1, (packs + 31) / 32); *per_block = 4; return true; }
        *tpr = ((packs + max_k - 1) / max_k + 31) / 32 * 32;
        *k = (packs + *tpr - 1) / *tpr;
        *per_block = 1;
        return *tpr <= 1024;
    };
    size_t tpr, k, per_block;
    if (team(4, &tpr, &k, &per_block)) {
        std::fill(y.begin(), y.end(), from_float<T>(NAN));
        std::fill(mean.begin(), mean.end(), NAN);
        std::fill(rstd.begin(), rstd.end(), NAN);
        unsigned blocks_r = (unsigned)std::min<size_t>((rows + per_block - 1) / per_block, 1u << 20);
        auto fwd = [&]<int KM>() {
            emu_launch({blocks_r}, {(unsigned)(tpr * per_block)}, 0, [&] {
                if (center) rows_fwd_reg<T, true, KM>(x.data(), y.data(), wp, bp, mean.data(), rstd.data(), rows, cols, eps, (int)tpr, (int)k);
                else rows_fwd_reg<T, false, KM>(x.data(), y.data(), wp, nullptr, nullptr, rstd.data(), rows, cols, eps, (int)tpr, (int)k);
            });
        };
        if (k == 1) fwd.template operator()<1>();
        else if (k == 2) fwd.template operator()<2>();
        else fwd.template operator()<4>();
        expect(tag + " reg y", widen(y), round(r.y), tol_abs<T>(), tol_rel<T>());
        if (center) expect(tag + " reg mean", widen(mean), r.mean, 1e-5, 1e-5);
        expect(tag + " reg rstd", widen(rstd), r.rstd, 1e-5, 1e-4);
    }
    // The team forward (rows of whole packs), as raw::rows_forward launches it (TeamShape in
    // src/ops/rows/cuda.rs) for several packs-per-thread limits, on at most two blocks so that
    // the grid-stride loop runs with teams past the last row.
    {
        if (cols % PN == 0) {
            for (size_t kmax : {8, 2, 1}) {
                size_t ttpr, tk;
                if (packs <= 32) { ttpr = std::max<size_t>(4, std::bit_ceil(packs)); tk = 1; }
                else {
                    tk = std::min(kmax, std::bit_ceil((packs + 31) / 32));
                    ttpr = std::max<size_t>(32, std::bit_ceil((packs + tk - 1) / tk));
                }
                if (ttpr > 1024) continue;
                const size_t block = std::max<size_t>(ttpr, 128), teams = block / ttpr;
                const unsigned blocks_t = (unsigned)std::min<size_t>((rows + teams - 1) / teams, 2);
                std::fill(y.begin(), y.end(), from_float<T>(NAN));
                std::fill(mean.begin(), mean.end(), NAN);
                std::fill(rstd.begin(), rstd.end(), NAN);
                auto fwd = [&]<int KM>() {
                    emu_launch({blocks_t}, {(unsigned)block}, 0, [&] {
                        if (center) rows_fwd_team<T, true, KM>(x.data(), y.data(), wp, bp, mean.data(), rstd.data(), rows, cols, eps, (int)ttpr);
                        else rows_fwd_team<T, false, KM>(x.data(), y.data(), wp, nullptr, nullptr, rstd.data(), rows, cols, eps, (int)ttpr);
                    });
                };
                if (tk == 1) fwd.template operator()<1>();
                else if (tk == 2) fwd.template operator()<2>();
                else if (tk == 4) fwd.template operator()<4>();
                else fwd.template operator()<8>();
                const std::string ttag = tag + " team" + std::to_string(tk) + "x" + std::to_string(ttpr);
                expect(ttag + " y", widen(y), round(r.y), tol_abs<T>(), tol_rel<T>());
                if (center) expect(ttag + " mean", widen(mean), r.mean, 1e-5, 1e-5);
                expect(ttag + " rstd", widen(rstd), r.rstd, 1e-5, 1e-4);
            }
        }
    }
    if (team(4, &tpr, &k, &per_block)) {
        std::fill(dx.begin(), dx.end(), from_float<T>(NAN));
        // teams as raw::rows_backward, with a smaller floor so that small row counts still
        // spread over several teams here
        size_t teams = std::max<size_t>(1, std::min<size_t>(rows, std::max<size_t>(3, std::min<size_t>(8192, rows * 3 * sizeof(T) / 128))));
        size_t blocks_r = (teams + per_block - 1) / per_block, parts_r = blocks_r * per_block;
        std::vector<float> qw(parts_r * cols, NAN), qb(parts_r * cols, NAN);
        auto bwd = [&]<int KM>() {
            emu_launch({(unsigned)blocks_r}, {(unsigned)(tpr * per_block)}, per_block * 2 * cols * sizeof(float), [&] {
                if (center) rows_bwd_reg<T, true, KM>(g.data(), x.data(), wp, mean.data(), rstd.data(), dx.data(), qw.data(), qb.data(), rows, cols, (int)tpr, (int)k);
                else rows_bwd_reg<T, false, KM>(g.data(), x.data(), wp, nullptr, rstd.data(), dx.data(), qw.data(), qb.data(), rows, cols, (int)tpr, (int)k);
            });
        };
        if (k == 1) bwd.template operator()<1>();
        else if (k == 2) bwd.template operator()<2>();
        else bwd.template operator()<4>();
        col_sum(qw, parts_r, dw);
        col_sum(qb, parts_r, db);
        expect(tag + " reg dx", widen(dx), round(r.dx), tol_abs<T>() * 5, tol_rel<T>() * 5);
        expect(tag + " reg dw", widen(dw), r.dw, 1e-3, 1e-4);
        expect(tag + " reg db", widen(db), r.db, 1e-3, 1e-4);
        // The team backward (CUNORM_ROWS_PATH=team): the same teams, rows of whole packs only,
        // teams wider than a warp two to a block (RegTeam::widened), one partial row a block.
        if (cols % PN == 0) {
            const size_t per_t = tpr <= 32 ? per_block : (2 * tpr <= 1024 ? 2 : 1);
            const size_t blocks_t = std::max<size_t>(1, std::min<size_t>(teams, (rows + per_t - 1) / per_t));
            std::fill(dx.begin(), dx.end(), from_float<T>(NAN));
            std::fill(qw.begin(), qw.end(), NAN);
            std::fill(qb.begin(), qb.end(), NAN);
            auto tbwd = [&]<int KM>() {
                emu_launch({(unsigned)blocks_t}, {(unsigned)(tpr * per_t)}, per_t * 2 * cols * sizeof(float), [&] {
                    if (center) rows_bwd_team<T, true, KM>(g.data(), x.data(), wp, mean.data(), rstd.data(), dx.data(), qw.data(), qb.data(), rows, cols, (int)tpr, (int)k);
                    else rows_bwd_team<T, false, KM>(g.data(), x.data(), wp, nullptr, rstd.data(), dx.data(), qw.data(), qb.data(), rows, cols, (int)tpr, (int)k);
                });
            };
            if (k == 1) tbwd.template operator()<1>();
            else if (k == 2) tbwd.template operator()<2>();
            else tbwd.template operator()<4>();
            col_sum(qw, blocks_t, dw);
            col_sum(qb, blocks_t, db);
            expect(tag + " team dx", widen(dx), round(r.dx), tol_abs<T>() * 5, tol_rel<T>() * 5);
            expect(tag + " team dw", widen(dw), r.dw, 1e-3, 1e-4);
            expect(tag + " team db", widen(db), r.db, 1e-3, 1e-4);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// G = 0: BatchNorm (group per channel); G > 0: groups per sample.
template <class T>
void planes_case(long N, int C, long S, int G, bool cl, bool eval) {
    std::string tag = std::string(G == 0 ? "batch" : (G == C ? "instance" : "group")) + " " + tname<T>() + " " +
                      std::to_string(N) + "x" + std::to_string(C) + "x" + std::to_string(S) + " G=" +
                      std::to_string(G) + (cl ? " nhwc" : " nchw") + (eval ? " eval" : "");
    const size_t numel = N * C * S;
    // Logical (n, c, s) data, stored physically per layout.
    auto xl = widen(cast<T>(randn(numel, 11, 0.5))), gl = widen(cast<T>(randn(numel, 12)));
    auto phys = [&](long n, int c, long s) { return cl ? (n * S + s) * C + c : (n * C + c) * S + s; };
    // A tensor as stored, widened in logical (n, c, s) order.
    auto logical = [&](const std::vector<T>& v) {
        std::vector<double> o(numel);
        for (long n = 0; n < N; ++n) for (int c = 0; c < C; ++c) for (long s = 0; s < S; ++s)
            o[(n * C + c) * S + s] = tf(v[phys(n, c, s)]);
        return o;
    };
    std::vector<double> xp(numel), gp(numel);
    for (long n = 0; n < N; ++n) for (int c = 0; c < C; ++c) for (long s = 0; s < S; ++s) {
        xp[phys(n, c, s)] = xl[(n * C + c) * S + s];
        gp[phys(n, c, s)] = gl[(n * C + c) * S + s];
    }
    auto x = cast<T>(xp), g = cast<T>(gp);
    auto wd = widen(cast<float>(randn(C, 13, 1))), bd = widen(cast<float>(randn(C, 14)));
    auto w = cast<float>(wd), b = cast<float>(bd);
    auto rm0 = widen(cast<float>(randn(C, 15))), rv0 = randn(C, 16);
    for (auto& v : rv0) v = 0.5 + std::fabs(v);
    rv0 = widen(cast<float>(rv0));
    auto rm = cast<float>(rm0), rv = cast<float>(rv0);
    const float eps = 1e-5f, factor = 0.3f;
    const size_t groups = eval || G == 0 ? C : N * G;
    std::vector<float> mean(groups), rstd(groups);
    std::vector<T> y(numel), dx(numel);
    // chunks, grid and block as planes/cuda.rs reduce_chunks and reduce_config, for cpn channels
    // a thread (a pack, in both reductions).
    // The view the reduction kernel sees (planes/cuda.rs Reduction::of): per-channel statistics
    // (gc == 0) of a channels-last input, or of one with S = 1, as one channels-last sample of
    // N·S rows; else the input's own shape.
    struct Reduce { long n, s; bool cl; int chunks, planes; long rows; dim3 grid, block; };
    auto reduce_geometry = [&](long cpn, int gc) {
        Reduce r;
        const bool merged = gc == 0 && N > 1 && (cl || S == 1);
        r.n = merged ? 1 : N;
        r.s = merged ? N * S : S;
        r.cl = merged || cl;
        const long n = r.n, s = r.s;
        const unsigned cpacks = (unsigned)std::max<long>(1, (C + cpn - 1) / cpn);
        unsigned tw = 1;
        while (tw < cpacks && tw < 32) tw *= 2;
        if (r.cl) {
            const long tiles = (cpacks + tw - 1) / tw, want = (1056 + n * tiles - 1) / (n * tiles);
            r.chunks = (int)std::max<long>(1, std::min<long>(want, std::max<long>(1, (s + 255) / 256)));
        } else {
            long planes = std::max<long>(1, n * C);
            long want = (2 * SMS + planes - 1) / planes;
            r.chunks = std::max<long>(1, std::min<long>(want, std::max<long>(1, s / 4096)));
        }
        // Planes a contiguous block folds (reduce_planes): per-channel statistics of whole planes,
        // about 4 096 units a block, the grid kept at 2·SMS blocks, split evenly over the batch.
        r.planes = 1;
        if (!r.cl && r.chunks == 1 && gc == 0 && n > 1) {
            const long units = std::max<long>(1, s % cpn == 0 ? s / cpn : s);
            const long p = std::clamp<long>(4096 / units, 1, n);
            const long rows = std::min<long>(n, std::max<long>((n + p - 1) / p, (2 * SMS + C - 1) / C));
            r.planes = (int)((n + rows - 1) / rows);
        }
        r.rows = (n + r.planes - 1) / r.planes;
        // channels-last: TW packs of channels across (power of two ≤ 32), 256 / TW rows
        r.grid = r.cl ? dim3{(unsigned)(n * r.chunks), (cpacks + tw - 1) / tw} : dim3{(unsigned)(r.rows * C * r.chunks)};
        r.block = r.cl ? dim3{tw, 256 / tw} : dim3{256};
        return r;
    };
    const int gcode = eval ? 0 : G;
    const Reduce rs = reduce_geometry(16 / sizeof(T), G), rg = reduce_geometry(16 / sizeof(T), gcode);
    if (rs.planes > 1 || rg.planes > 1) ++multi_plane_cases;
    if (rs.n != N || rg.n != N) ++merged_cases;
    auto small = [](size_t n) { return dim3{(unsigned)std::max<size_t>(1, (n + 255) / 256)}; };
    // The finalizes as planes/cuda.rs finalize_config and group_items: a warp a group (eight a
    // block) for groups of at most 256 partials and planes, else a block of 256 threads a group.
    auto fin_warp = [&](long per, int ch, int gc) { return std::max<long>(per * ch, gc == 0 ? N : C / gc) <= 256; };
    auto fin_block = [&](long per, int ch, int gc) { return fin_warp(per, ch, gc) ? dim3{32, 8} : dim3{256}; };
    auto fin_grid = [&](size_t groups, long per, int ch, int gc) {
        return fin_warp(per, ch, gc) ? dim3{(unsigned)((groups + 7) / 8)} : dim3{(unsigned)groups};
    };
    const bool fused = !eval && G > 0 && !cl;  // as raw::planes_forward: one pass per group
    if (fused) {
        std::vector<float> varu(groups);
        int cols = (C / G) * S;
        unsigned threads, blocks;
        int cache;
        rows_cfg<T>(groups, cols, &threads, &cache, &blocks);
        emu_launch({blocks}, {threads}, cache ? cols * sizeof(T) : 0, [&] {
            rows_fwd<T, true>(x.data(), y.data(), w.data(), b.data(), mean.data(), rstd.data(), varu.data(), groups, cols, S, G, eps, cache, 1);
        });
        // The wide forward on a 32-thread block (registers hold 4·32 packs, shared memory the
        // rest), against the kernel above.
        {
            const size_t wpn = 16 / sizeof(T), held = ROWS_WIDE_K * 32;
            const bool packed = cols % wpn == 0 && (S == 1 || S % wpn == 0);
            const size_t wsmem = packed && cols / wpn > held ? (cols / wpn - held) * 16 : 0;
            std::vector<T> y2(y.size(), from_float<T>(NAN));
            std::vector<float> m2(groups, NAN), r2(groups, NAN), v2(groups, NAN);
            emu_launch({blocks}, {32}, wsmem, [&] {
                rows_fwd<T, true, ROWS_WIDE_K>(x.data(), y2.data(), w.data(), b.data(), m2.data(), r2.data(), v2.data(), groups, cols, S, G, eps, 1, 1);
            });
            expect(tag + " wide y", widen(y2), widen(y), tol_abs<T>(), tol_rel<T>());
            expect(tag + " wide mean", widen(m2), widen(mean), 1e-5, 1e-5);
            expect(tag + " wide rstd", widen(r2), widen(rstd), 1e-5, 1e-4);
            expect(tag + " wide varu", widen(v2), widen(varu), 1e-5, 1e-4);
        }
        // The cluster forward (clusters of 4 blocks of 32 threads, two clusters striding over
        // the groups) against the kernel above, where the groups are whole packs.
        const size_t cpn = 16 / sizeof(T);
        if (cols % cpn == 0 && (S == 1 || S % cpn == 0) && cols / cpn <= 4 * 32 * ROWS_CLUSTER_K) {
            std::vector<T> y2(y.size(), from_float<T>(NAN));
            std::vector<float> m2(groups, NAN), r2(groups, NAN), v2(groups, NAN);
            emu_launch({8}, {32}, 34 * 4, [&] {
                rows_fwd_cluster<T, true>(x.data(), y2.data(), w.data(), b.data(), m2.data(), r2.data(), v2.data(), groups, cols, S, G, eps, 1);
            }, 4);
            expect(tag + " cluster y", widen(y2), widen(y), tol_abs<T>(), tol_rel<T>());
            expect(tag + " cluster mean", widen(m2), widen(mean), 1e-5, 1e-5);
            expect(tag + " cluster rstd", widen(r2), widen(rstd), 1e-5, 1e-4);
            expect(tag + " cluster varu", widen(v2), widen(varu), 1e-5, 1e-4);
            ++cluster_cases;
        }
        if (G == C)
            emu_launch(small(C), {256}, 0, [&] { planes_running_update_f32(rm.data(), rv.data(), mean.data(), varu.data(), N, C, 1, factor); });
    } else if (!eval) {
        std::vector<float> part(rs.rows * C * rs.chunks * 3, NAN), varu(groups);
        emu_launch(rs.grid, rs.block, 0, [&] {
            if (rs.cl) planes_reduce<T, StatAcc, false, true>(x.data(), nullptr, nullptr, part.data(), rs.n, C, rs.s, rs.chunks, 1);
            else planes_reduce<T, StatAcc, false, false>(x.data(), nullptr, nullptr, part.data(), rs.n, C, rs.s, rs.chunks, rs.planes);
        });
        emu_launch(fin_grid(groups, G == 0 ? rs.rows : C / G, rs.chunks, G), fin_block(G == 0 ? rs.rows : C / G, rs.chunks, G), 0, [&] { planes_finalize_f32(part.data(), mean.data(), rstd.data(), varu.data(), G == 0 ? rs.rows : N, C, rs.chunks, G, eps, 1); });
        if (G == 0 || G == C)
            emu_launch(small(C), {256}, 0, [&] { planes_running_update_f32(rm.data(), rv.data(), mean.data(), varu.data(), N, C, G == C, factor); });
    } else {
        emu_launch(small(C), {256}, 0, [&] { planes_eval_stats_f32(rm.data(), rv.data(), mean.data(), rstd.data(), C, eps); });
    }
    std::vector<float> a(N * C), m(N * C), k(N * C), bc(N * C), kc(N * C), dw(C), db(C);
    const int PN = 16 / sizeof(T);
    // The elementwise grid as planes/cuda.rs apply_config: four packs a thread, at most four waves
    // of two resident blocks an SM.
    dim3 agrid{(unsigned)std::max<size_t>(1, std::min<size_t>(SMS * 2 * 4, (numel / PN + 1023) / 1024))};
    if (!fused) {
        emu_launch(small(N * C), {256}, 0, [&] { planes_coef_f32(mean.data(), rstd.data(), w.data(), b.data(), a.data(), m.data(), k.data(), N, C, gcode); });
        emu_launch(agrid, {256}, 0, [&] { planes_apply<T, false>(x.data(), nullptr, y.data(), a.data(), nullptr, m.data(), k.data(), N, C, S, cl || S == 1); });
    }
    // backward
    emu_launch(small(N * C), {256}, 0, [&] { planes_coef_f32(mean.data(), rstd.data(), w.data(), nullptr, a.data(), m.data(), k.data(), N, C, gcode); });
    const int chunks = rg.chunks;
    std::vector<float> part2(rg.rows * C * chunks * 2, 0.f);
    emu_launch(rg.grid, rg.block, 0, [&] {
        if (rg.cl) planes_reduce<T, GradAcc, true, true>(x.data(), g.data(), m.data(), part2.data(), rg.n, C, rg.s, chunks, 1);
        else planes_reduce<T, GradAcc, true, false>(x.data(), g.data(), m.data(), part2.data(), rg.n, C, rg.s, chunks, rg.planes);
    });
    emu_launch(fin_grid(groups, gcode == 0 ? rg.rows : C / gcode, chunks, gcode), fin_block(gcode == 0 ? rg.rows : C / gcode, chunks, gcode), 0, [&] { planes_grad_finalize_f32(part2.data(), w.data(), rstd.data(), bc.data(), kc.data(), N, rg.rows, C, S, chunks, gcode, !eval); });
    emu_launch({(unsigned)C}, {256}, 0, [&] { planes_grad_params_f32(part2.data(), rstd.data(), dw.data(), db.data(), rg.rows, C, chunks, gcode); });
    emu_launch(agrid, {256}, 0, [&] { planes_apply<T, true>(x.data(), g.data(), dx.data(), a.data(), bc.data(), m.data(), kc.data(), N, C, S, cl || S == 1); });

    // Reference on logical data.
    auto grp = [&](size_t i) -> size_t {
        long n = i / (C * S); int c = (i / S) % C;
        return (G == 0 || eval) ? c : n * G + c / (C / G);
    };
    auto par = [&](size_t i) -> size_t { return (i / S) % C; };
    Ref r;
    if (!eval) {
        r = reference(xl, gl, &wd, &bd, groups, C, grp, par, true, eps);
    } else {
        // Fixed statistics: y = (x − rm)/√(rv + eps)·w + b; dx = g·w·r; dw = r·Σ g(x − rm); db = Σ g.
        r.y.resize(numel); r.dx.resize(numel); r.dw.assign(C, 0); r.db.assign(C, 0);
        for (size_t i = 0; i < numel; ++i) {
            int c = par(i);
            double rs = 1 / std::sqrt(rv0[c] + eps), xh = (xl[i] - rm0[c]) * rs;
            r.y[i] = xh * wd[c] + bd[c];
            r.dx[i] = gl[i] * wd[c] * rs;
            r.dw[c] += gl[i] * xh;
            r.db[c] += gl[i];
        }
    }
    const std::vector<double> yl = logical(y), dxl = logical(dx);
    auto round = [](const std::vector<double>& v) { return widen(cast<T>(v)); };
    expect(tag + " y", yl, round(r.y), tol_abs<T>(), tol_rel<T>());
    if (!eval) {
        expect(tag + " mean", widen(mean), r.mean, 1e-5, 1e-5);
        expect(tag + " rstd", widen(rstd), r.rstd, 1e-5, 1e-4);
    }
    expect(tag + " dx", dxl, round(r.dx), tol_abs<T>() * 5, tol_rel<T>() * 5);
    expect(tag + " dweight", widen(dw), r.dw, 1e-3, 1e-4);
    expect(tag + " dbias", widen(db), r.db, 1e-3, 1e-4);
    if (!eval && G > 0 && cl && C % PN == 0) {
        // The one-pass channels-last forward and backward (planes/cuda.rs tile_forward,
        // tile_backward): every tiling the host may pick (ct a multiple of C/G and of the pack,
        // ct / pack a power of two ≤ 8 dividing C), each on blocks of 32 and 96 threads (packs in
        // registers, the rest in shared memory), against the reference.
        const int Cg = C / G;
        for (int ct = PN; ct <= 8 * PN; ct += PN) {
            const int ppp = ct / PN;
            if (ct % Cg || C % ct || (ppp & (ppp - 1))) continue;
            for (unsigned threads : {32u, 96u}) {
                if (threads % ppp) continue;
                const size_t units = S * ppp, held = TILE_KR * threads;
                const size_t smem = (threads / 32 + 3) * ct * 4 + (units > held ? units - held : 0) * 16;
                std::vector<T> y2(numel, from_float<T>(NAN));
                std::vector<float> m2(groups, NAN), r2(groups, NAN), v2(groups, NAN);
                emu_launch({(unsigned)(N * (C / ct))}, {threads}, smem, [&] {
                    planes_tile_fwd<T>(x.data(), y2.data(), w.data(), b.data(), m2.data(), r2.data(), v2.data(), C, (int)S, ct, Cg, C / ct, eps, 1);  // the NaN-mean flag as the finalize above (finite inputs)
                });
                std::vector<double> vref(groups);
                const double cnt = (double)S * Cg;
                for (size_t gi = 0; gi < groups; ++gi) vref[gi] = (1 / (r.rstd[gi] * r.rstd[gi]) - eps) * cnt / (cnt - 1);
                const std::string tt = tag + " tile ct=" + std::to_string(ct) + " threads=" + std::to_string(threads);
                expect(tt + " y", logical(y2), round(r.y), tol_abs<T>(), tol_rel<T>());
                expect(tt + " mean", widen(m2), r.mean, 1e-5, 1e-5);
                expect(tt + " rstd", widen(r2), r.rstd, 1e-5, 1e-4);
                if (cnt > 1) expect(tt + " varu", widen(v2), vref, 1e-5, 1e-4);
                // The backward (planes/cuda.rs tile_backward): x and dy on chip (TILE_BWD_KR packs
                // of each a thread in registers), then planes_grad_params_f32 over one chunk a plane.
                const size_t bheld = TILE_BWD_KR * threads;
                const size_t bsmem = (threads / 32 + 6) * ct * 4 + 2 * (units > bheld ? units - bheld : 0) * 16;
                std::vector<T> dx2(numel, from_float<T>(NAN));
                std::vector<float> part(N * C * 2, NAN), dw2(C, NAN), db2(C, NAN);
                emu_launch({(unsigned)(N * (C / ct))}, {threads}, bsmem, [&] {
                    planes_tile_bwd<T>(g.data(), x.data(), w.data(), m2.data(), r2.data(), dx2.data(), part.data(), C, (int)S, ct, Cg, C / ct);
                });
                emu_launch({(unsigned)C}, {256}, 0, [&] { planes_grad_params_f32(part.data(), r2.data(), dw2.data(), db2.data(), N, C, 1, G); });
                expect(tt + " dx", logical(dx2), round(r.dx), tol_abs<T>() * 5, tol_rel<T>() * 5);
                expect(tt + " dweight", widen(dw2), r.dw, 1e-3, 1e-4);
                expect(tt + " dbias", widen(db2), r.db, 1e-3, 1e-4);
                ++tile_cases;
            }
        }
    }
    if (!eval && G > 0 && !cl && S % PN == 0) {
        // The contiguous one-pass backward (planes/cuda.rs tile_backward, contig_tile_plan):
        // every tile of whole groups dividing C, on blocks of 32 to 256 threads in teams of 32 to
        // 256 that divide the tile's planes and the plane's packs (the host's blocks start at 128),
        // against the reference (the statistics from the forward above).
        const int Cg = C / G, sp = (int)(S / PN);
        for (int ct = Cg; ct <= C; ct += Cg) {
            if (C % ct) continue;
            for (unsigned threads : {32u, 64u, 128u, 256u})
                for (int ts : {32, 64, 128, 256}) {
                    const int teams = (int)threads / ts;
                    if (ts > (int)threads || ct % teams || sp % ts) continue;
                    const size_t units = (size_t)ct * sp / threads, held = TILE_BWD_KR;
                    const size_t head = ((size_t)(ct / teams) * (threads / 32) * 2 + 6 * ct + 3) / 4 * 4 * 4;
                    const size_t bsmem = head + (units > held ? units - held : 0) * threads * 32;
                    std::vector<T> dx2(numel, from_float<T>(NAN));
                    std::vector<float> part(N * C * 2, NAN), dw2(C, NAN), db2(C, NAN);
                    emu_launch({(unsigned)(N * (C / ct))}, {threads}, bsmem, [&] {
                        planes_tile_bwd_contig<T>(g.data(), x.data(), w.data(), mean.data(), rstd.data(), dx2.data(), part.data(), C, (int)S, ct, Cg, C / ct, ts);
                    });
                    emu_launch({(unsigned)C}, {256}, 0, [&] { planes_grad_params_f32(part.data(), rstd.data(), dw2.data(), db2.data(), N, C, 1, G); });
                    const std::string tt = tag + " contiguous tile ct=" + std::to_string(ct) + " threads=" +
                                           std::to_string(threads) + " team=" + std::to_string(ts);
                    expect(tt + " dx", widen(dx2), round(r.dx), tol_abs<T>() * 5, tol_rel<T>() * 5);
                    expect(tt + " dweight", widen(dw2), r.dw, 1e-3, 1e-4);
                    expect(tt + " dbias", widen(db2), r.db, 1e-3, 1e-4);
                    ++contig_tile_cases;
                }
        }
    }
    if (!eval && (G == 0 || G == C)) {
        // Running statistics: batch statistic, or the batch average of per-plane ones (IN).
        std::vector<double> em(C, 0), ev(C, 0);
        for (int c = 0; c < C; ++c) {
            long nn = G == 0 ? 1 : N;
            for (long j = 0; j < nn; ++j) {
                size_t gi = G == 0 ? c : j * C + c;
                double cnt = G == 0 ? N * S : S;
                double var = 1 / (r.rstd[gi] * r.rstd[gi]) - eps;
                em[c] += r.mean[gi] / nn;
                ev[c] += var * cnt / (cnt - 1) / nn;
            }
            em[c] = (1 - factor) * rm0[c] + factor * em[c];
            ev[c] = (1 - factor) * rv0[c] + factor * ev[c];
        }
        expect(tag + " running_mean", widen(rm), em, 1e-5, 1e-5);
        expect(tag + " running_var", widen(rv), ev, 1e-5, 1e-4);
    }
}

template <class T> void all() {
    for (auto [rows, cols] : std::vector<std::pair<size_t, int>>{{5, 13}, {7, 1}, {3, 4099}, {2, 1024}, {9, 64}, {2, 12289}, {300, 128}, {70, 96}, {3000, 40}, {5, 8192}, {3, 2056}, {21, 2048}})
        for (bool center : {true, false})
            for (bool affine : {true, false}) rows_case<T>(rows, cols, center, affine);
    struct P { long n; int c; long s; int g; };
    for (P p : std::vector<P>{{4, 3, 35, 0}, {2, 5, 1, 0}, {33, 8, 1, 0}, {2, 16, 40, 0}, {1, 3, 9000, 0},
                              {2, 3, 35, 3}, {1, 4, 33, 4}, {3, 40, 17, 40},
                              {2, 4, 4, 2}, {3, 6, 35, 3}, {2, 5, 3, 1}, {2, 32, 64, 8}, {1, 4, 700, 2},
                              {1, 2, 30000, 1}, {2, 4, 8000, 2}, {3, 16, 1, 2},
                              // channels-last: one chunk a sample, 8 rows a thread (folds into a
                              // non-empty Welford; reduce_chunks at N ≥ 1056)
                              {1056, 4, 2048, 0},
                              // several planes a block (BatchNorm, contiguous): 7 + 6 planes
                              // of 50 packs; 3 + 3 + 3 of 514 packs (more than a block's 256
                              // threads)
                              {13, 3, 200, 0}, {9, 2, 2056, 0},
                              // the one-pass channels-last forward: tiles of 1 to 8 packs a
                              // position, groups of 16 and of one channel
                              {2, 64, 50, 4}, {3, 64, 45, 64},
                              // the contiguous one-pass backward: planes of 32 to 256 packs
                              {2, 8, 256, 2}, {3, 6, 512, 6}, {2, 16, 1024, 4}})
        for (bool cl : {false, true}) {
            planes_case<T>(p.n, p.c, p.s, p.g, cl, false);
            if (p.g == 0 || p.g == p.c) planes_case<T>(p.n, p.c, p.s, p.g, cl, true);
        }
}

int main() {
    all<float>();
    all<f16_t>();
    all<bf16_t>();
    printf("%d checks, %d failed (%d planes cases with several planes a block, %d read as one sample of N·S rows, "
           "%d one-pass channels-last tilings, %d contiguous, %d cluster forwards and backwards)\n",
           checks, failures, multi_plane_cases, merged_cases, tile_cases, contig_tile_cases, cluster_cases);
    if (multi_plane_cases == 0 || merged_cases == 0 || tile_cases == 0 || contig_tile_cases == 0 || cluster_cases == 0)
        return 1;
    return failures ? 1 : 0;
}
