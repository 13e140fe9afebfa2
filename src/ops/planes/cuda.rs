//! The planes family on CUDA: BatchNorm, InstanceNorm and GroupNorm launches
//! (`kernels/planes.cu`; GroupNorm/InstanceNorm's one-pass contiguous forward is the row kernel
//! of `kernels/rows.cu` with a per-channel affine, their one-pass channels-last forward and
//! backward `planes_tile_fwd`/`planes_tile_bwd` where a tile of a sample fits on chip).
//!
//! Two levels: the tensor level the op fronts call (`forward`, `backward`), and below it the
//! public launch layer over caller-held cudarc views (`planes_forward`, `planes_backward`,
//! re-exported as [`crate::raw`]). Every launch function checks lengths (an `Err`, never a
//! panic or an out-of-bounds launch), queues its kernels on the device's stream and returns
//! without synchronizing.

use cudarc::driver::{CudaView, CudaViewMut, LaunchArgs, LaunchConfig, PushKernelArg};

use super::{Grouping, PlaneShape, Running, Source, TensorSource};
use crate::cuda::launch::{
    aligned16, arg_or_null, check_len, grid, launch_err, pack, resident_blocks, resident_blocks_of,
    row_len, to_i32,
};
use crate::cuda::{CudaDevice, Kernel};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::ops::rows::cuda::rows_fwd_kernel;
use crate::ops::{kernels, Gradients, NormOp, NormOutput, SavedStats};
use crate::tensor::{tensor_view, MemoryFormat, Tensor};

/// Where the launch layer's forward statistics come from: the input (running statistics, when
/// given, are views updated in place) or fixed per-channel views (eval).
pub type ViewSource<'a, 'b> = Source<&'a mut CudaViewMut<'b, f32>, &'a CudaView<'b, f32>>;

pub(crate) fn forward<T: Element>(
    dev: &CudaDevice,
    x: &Tensor<T>,
    op: NormOp,
    weight: Option<&Tensor<f32>>,
    bias: Option<&Tensor<f32>>,
    eps: f64,
    source: TensorSource<'_>,
) -> Result<NormOutput<T>> {
    let grouping = Grouping::of(op);
    let s = PlaneShape::of(x.shape(), x.format())?;
    let numel = x.numel();
    let from_input = matches!(source, Source::Input { .. });
    let ng = if from_input {
        grouping.num_groups(&s)
    } else {
        s.c
    };
    let mut y = dev.alloc::<T>(numel)?;
    // Zeroed, not uninitialized: an empty input launches nothing that would write them.
    let mut mean = dev.zeros::<f32>(ng)?;
    let mut rstd = dev.zeros::<f32>(ng)?;
    let xv = tensor_view(x)?;
    let wv = weight.map(tensor_view).transpose()?;
    let bv = bias.map(tensor_view).transpose()?;
    {
        let (mut yv, mut mv, mut rv) = (
            y.slice_mut(0..numel),
            mean.slice_mut(0..ng),
            rstd.slice_mut(0..ng),
        );
        // Views bound here so they outlive the `ViewSource` that borrows them.
        let (mut rm_v, mut rv_v, fixed);
        let stats: ViewSource = match source {
            Source::Input { running: Some(r) } => {
                rm_v = r.mean.cuda_slice_mut()?.slice_mut(0..s.c);
                rv_v = r.var.cuda_slice_mut()?.slice_mut(0..s.c);
                Source::Input {
                    running: Some(Running {
                        mean: &mut rm_v,
                        var: &mut rv_v,
                        factor: r.factor,
                    }),
                }
            }
            Source::Input { running: None } => Source::Input { running: None },
            Source::Fixed { mean: rm, var } => {
                fixed = (tensor_view(rm)?, tensor_view(var)?);
                Source::Fixed {
                    mean: &fixed.0,
                    var: &fixed.1,
                }
            }
        };
        planes_forward(
            dev,
            &xv,
            &mut yv,
            s,
            grouping,
            wv.as_ref(),
            bv.as_ref(),
            eps as f32,
            stats,
            &mut mv,
            &mut rv,
        )?;
    }
    Ok(NormOutput {
        output: Tensor::from_cuda(dev, y, x.shape(), x.format()),
        stats: SavedStats::new(
            op,
            x.shape(),
            Some(Tensor::from_cuda(
                dev,
                mean,
                &[ng],
                MemoryFormat::Contiguous,
            )),
            Tensor::from_cuda(dev, rstd, &[ng], MemoryFormat::Contiguous),
            from_input,
        ),
    })
}

pub(crate) fn backward<T: Element>(
    dev: &CudaDevice,
    dy: &Tensor<T>,
    x: &Tensor<T>,
    weight: Option<&Tensor<f32>>,
    affine: bool,
    stats: &SavedStats,
) -> Result<Gradients<T>> {
    let grouping = Grouping::of(stats.op());
    let s = PlaneShape::of(x.shape(), x.format())?;
    let numel = x.numel();
    let mut dx = dev.alloc::<T>(numel)?;
    let mut dw = dev.alloc::<f32>(s.c)?;
    let mut db = dev.alloc::<f32>(s.c)?;
    let mean = stats.mean().ok_or_else(|| {
        crate::Error::InvalidArgument("backward: the saved statistics carry no mean".into())
    })?;
    {
        let (xv, gv) = (tensor_view(x)?, tensor_view(dy)?);
        let (mv, rv) = (tensor_view(mean)?, tensor_view(stats.rstd())?);
        let wv = weight.map(tensor_view).transpose()?;
        let (mut dxv, mut dwv, mut dbv) = (
            dx.slice_mut(0..numel),
            dw.slice_mut(0..s.c),
            db.slice_mut(0..s.c),
        );
        planes_backward(
            dev,
            &gv,
            &xv,
            s,
            grouping,
            wv.as_ref(),
            &mv,
            &rv,
            stats.from_input(),
            &mut dxv,
            &mut dwv,
            &mut dbv,
        )?;
    }
    let param = |v| Tensor::from_cuda(dev, v, &[s.c], MemoryFormat::Contiguous);
    Ok(Gradients {
        dx: Tensor::from_cuda(dev, dx, x.shape(), x.format()),
        dweight: affine.then(|| param(dw)),
        dbias: affine.then(|| param(db)),
    })
}

// ---------------------------------------------------------------------------------------------
// The launch layer over cudarc views
// ---------------------------------------------------------------------------------------------

/// The reduction entry point for the layout: `<kernel>` (contiguous) or `<kernel>_cl`.
fn reduce_kernel(s: &PlaneShape, kernel: &'static str) -> &'static str {
    match (s.channels_last(), kernel) {
        (true, "planes_stats") => "planes_stats_cl",
        (true, "planes_grad_sums") => "planes_grad_sums_cl",
        _ => kernel,
    }
}

/// Blocks a contiguous reduction aims for (about two per SM of an H100).
const REDUCE_BLOCKS: usize = 264;

/// Blocks a channels-last reduction aims for (about eight per SM of an H100).
const REDUCE_BLOCKS_CL: usize = 1056;

/// Spatial chunks of each sample (channels-last) or plane (contiguous), from the shape alone
/// (not the SM count), so that every GPU adds in the same order. Channels-last: at most one
/// chunk per 256 rows, as few as give the grid REDUCE_BLOCKS_CL blocks. A block whose chunk is
/// only about 256 rows (8 per thread at C = 64 f16) spends more on merging its rows' partials
/// through shared memory and writing them than on reading x: BatchNorm2d f16 channels-last
/// [256, 64, 112, 112] read its statistics at about 370 GB/s on an H200 (its forward less its
/// eval) with a chunk per 256 rows.
fn reduce_chunks(s: &PlaneShape, pn: usize) -> usize {
    if s.channels_last() {
        let (_, tiles) = cl_tiling(s.c, pn);
        REDUCE_BLOCKS_CL
            .div_ceil(s.n.max(1) * tiles)
            .clamp(1, s.s.div_ceil(256).max(1))
    } else {
        let planes = (s.n * s.c).max(1);
        let want = REDUCE_BLOCKS.div_ceil(planes);
        want.clamp(1, (s.s / 4096).max(1))
    }
}

/// Units (16-byte packs, or values where a plane is not whole packs) a contiguous per-channel
/// reduction block aims for: 16 a thread of its 256, four loop iterations of four loads.
const REDUCE_BLOCK_UNITS: usize = 4096;

/// Planes of one channel a contiguous reduction block folds into one partial (planes.cu
/// `planes_reduce`'s P): 1 but for per-channel statistics (`g_code` 0: BatchNorm, or any
/// fixed statistics) of whole planes (one chunk), where it is as many as give a block about
/// REDUCE_BLOCK_UNITS units while the grid keeps REDUCE_BLOCKS blocks (when N allows), split
/// evenly over the batch. From the shape alone, so every GPU adds in the same order.
/// `CUNORM_PLANES_PER_BLOCK=1` (read once) restores a block per plane: a benchmark knob.
fn reduce_planes(s: &PlaneShape, chunks: usize, pn: usize, g_code: i32) -> usize {
    if s.channels_last() || chunks != 1 || g_code != 0 || s.n <= 1 || planes_per_block_knob() {
        return 1;
    }
    let units = if s.s.is_multiple_of(pn) {
        s.s / pn
    } else {
        s.s
    }
    .max(1);
    let p = (REDUCE_BLOCK_UNITS / units).clamp(1, s.n);
    // Partial rows a channel: enough for the grid to keep REDUCE_BLOCKS blocks.
    let rows =
        s.n.div_ceil(p)
            .max(REDUCE_BLOCKS.div_ceil(s.c.max(1)))
            .min(s.n);
    s.n.div_ceil(rows)
}

/// How a reduction (statistics or gradient sums) reads the input: the shape its kernel sees,
/// its chunks a plane or sample, planes a block, and the partial rows a channel (⌈N/P⌉ of the
/// view) that the finalizes merge.
#[derive(Clone, Copy, Debug)]
struct Reduction {
    view: PlaneShape,
    chunks: usize,
    planes: usize,
    rows: usize,
}

impl Reduction {
    /// Per-channel statistics (`g_code` 0) of a channels-last input, or of one with S = 1 (whose
    /// two layouts are the same memory), are read as one sample of N·S rows: the channels-last
    /// kernel's coalesced loads along C, and chunks that split the whole batch (BatchNorm1d
    /// [4096, 64] had a block per value). Other reductions see the input's own shape (as does
    /// an S = 1 input with more channels than the channels-last grid takes).
    fn of(s: &PlaneShape, g_code: i32, pn: usize) -> Reduction {
        let view = if g_code == 0
            && s.n > 1
            && (s.channels_last() || s.s == 1)
            && channel_tiles(s.c).is_ok()
        {
            PlaneShape {
                n: 1,
                c: s.c,
                s: s.n * s.s,
                format: MemoryFormat::ChannelsLast,
            }
        } else {
            *s
        };
        let chunks = reduce_chunks(&view, pn);
        let planes = reduce_planes(&view, chunks, pn, g_code);
        Reduction {
            view,
            chunks,
            planes,
            rows: view.n.div_ceil(planes),
        }
    }

    /// Partials (each of the accumulator's width) the reduction writes.
    fn partials(&self) -> usize {
        self.rows * self.view.c * self.chunks
    }

    /// The kernels' integer arguments (checked: an `Err` where one does not fit its type).
    fn args(&self) -> Result<ReduceArgs> {
        let (n, c, s, _) = self.view.kernel_args()?;
        Ok(ReduceArgs {
            n,
            c,
            s,
            chunks: to_i32("chunks", self.chunks)?,
            planes: to_i32("planes", self.planes)?,
            rows: self.rows as i64,
        })
    }

    fn config(&self, pn: usize) -> Result<LaunchConfig> {
        reduce_config(&self.view, self.chunks, self.planes, pn)
    }

    fn kernel(&self, kernel: &'static str) -> &'static str {
        reduce_kernel(&self.view, kernel)
    }
}

/// A reduction's integer kernel arguments: the view's N, C, S, then chunks and P (pushed in that
/// order by `push`, after the buffers), and the partial rows a channel (the finalizes' N where
/// G == 0).
struct ReduceArgs {
    n: i64,
    c: i32,
    s: i64,
    chunks: i32,
    planes: i32,
    rows: i64,
}

impl ReduceArgs {
    fn push<'a>(&'a self, b: &mut LaunchArgs<'a>) {
        b.arg(&self.n)
            .arg(&self.c)
            .arg(&self.s)
            .arg(&self.chunks)
            .arg(&self.planes);
    }
}

/// `CUNORM_PLANES_PER_BLOCK=1`: a block per plane in the contiguous reductions (read once).
fn planes_per_block_knob() -> bool {
    static KNOB: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *KNOB.get_or_init(|| std::env::var("CUNORM_PLANES_PER_BLOCK").is_ok_and(|v| v.trim() == "1"))
}

/// `CUNORM_PLANES_TILE=0`: no one-pass channels-last GroupNorm/InstanceNorm forward or backward
/// (the reduction, finalize and elementwise launches instead).
fn planes_tile_knob_off() -> bool {
    static KNOB: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *KNOB.get_or_init(|| std::env::var("CUNORM_PLANES_TILE").is_ok_and(|v| v.trim() == "0"))
}

/// The most 16-byte packs of one position a tile takes (planes.cu: a power of two dividing 32).
const TILE_MAX_PACKS: usize = 8;

/// What a one-pass channels-last kernel holds on chip: the tensors it caches (x; x and dy), the
/// packs of each a thread keeps in registers (planes.cu `TILE_KR`, `TILE_BWD_KR`) and the
/// per-channel float arrays beside the lane sums.
#[derive(Debug, Clone, Copy)]
struct TileKind {
    tensors: usize,
    held: usize,
    arrays: usize,
}
const TILE_FWD: TileKind = TileKind {
    tensors: 1,
    held: 4,
    arrays: 3,
};
const TILE_BWD: TileKind = TileKind {
    tensors: 2,
    held: 2,
    arrays: 6,
};

/// The one-pass channels-last GroupNorm/InstanceNorm kernels (planes.cu `planes_tile_fwd`,
/// `planes_tile_bwd`): a block per (sample, tile of `ct` channels) of `threads` threads with
/// `smem` bytes of dynamic shared memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TilePlan {
    ct: usize,
    threads: usize,
    smem: usize,
}

/// What a kernel's tiling depends on besides the shape: its registers a thread, its dynamic
/// shared memory limit (after the opt-in) and its thread limit.
#[derive(Debug, Clone, Copy)]
struct KernelLimits {
    regs: u32,
    smem: usize,
    threads: u32,
}

impl KernelLimits {
    fn of(k: &Kernel) -> KernelLimits {
        KernelLimits {
            regs: k.regs,
            smem: k.max_dynamic_smem,
            threads: k.max_threads,
        }
    }
}

/// Blocks of a tile kernel an SM holds: by registers and threads ([`resident_blocks_of`]) and by
/// shared memory (`smem` a block plus 1 KiB the system reserves, of `smem_limit` + 1 KiB); at
/// least 1.
fn tile_blocks(regs: u32, threads: usize, smem: usize, smem_limit: usize) -> usize {
    resident_blocks_of(regs, threads)
        .min((smem_limit + 1024) / (smem + 1024))
        .max(1)
}

/// The tiling of a one-pass channels-last kernel, if a sample's slice of some tile fits on chip:
/// `ct` a multiple of the group's `cg` channels and of the pack `pn`, `ct/pn` a power of two of at
/// most TILE_MAX_PACKS, dividing C, and S·ct values of each tensor in `kind.held` packs a thread
/// plus at most `lim.smem` bytes of shared memory (beside the lane sums). Among the tilings that fit, the
/// first by: two or more blocks an SM (so that one block's loads overlap another's arithmetic),
/// then the longest read of a position up to 64 bytes (two DRAM sectors), then the most threads
/// an SM, then the most blocks. From the shape, the kernel's registers and its shared-memory
/// limit alone (never the SM count), so every GPU of a model sums in the same order.
fn tile_plan(
    kind: TileKind,
    s: &PlaneShape,
    cg: usize,
    elt: usize,
    lim: KernelLimits,
) -> Option<TilePlan> {
    let pn = 16 / elt;
    if cg == 0 || s.n == 0 || s.s == 0 || !s.c.is_multiple_of(pn) || i32::try_from(s.s).is_err() {
        return None;
    }
    let (mut a, mut b) = (cg, pn);
    while b != 0 {
        (a, b) = (b, a % b);
    }
    let step = cg / a * pn; // lcm(cg, pn)
    let mut best: Option<((usize, usize, usize, usize), TilePlan)> = None;
    for ct in (1..)
        .map(|m| m * step)
        .take_while(|&ct| ct <= TILE_MAX_PACKS * pn)
    {
        let ppp = ct / pn;
        if !ppp.is_power_of_two() || !s.c.is_multiple_of(ct) {
            continue;
        }
        let units = s.s.checked_mul(ppp)?;
        for threads in [128usize, 256, 512, 1024] {
            // No block with more than twice the threads its units need.
            if threads > lim.threads as usize || (threads > 128 && kind.held * threads >= 2 * units)
            {
                break;
            }
            let cached = units.saturating_sub(kind.held * threads) * 16 * kind.tensors;
            let smem = (threads / 32 + kind.arrays) * ct * 4 + cached;
            if smem > lim.smem {
                continue;
            }
            let blocks = tile_blocks(lim.regs, threads, smem, lim.smem);
            let key = (blocks.min(2), (ct * elt).min(64), blocks * threads, blocks);
            if best.is_none_or(|(k, _)| key > k) {
                best = Some((key, TilePlan { ct, threads, smem }));
            }
        }
    }
    best.map(|(_, p)| p)
}

/// The contiguous one-pass backward (planes.cu `planes_tile_bwd_contig`): a block per (sample,
/// tile of `ct` planes) of `threads` threads in teams of `ts`, `smem` bytes of dynamic shared
/// memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ContigPlan {
    ct: usize,
    threads: usize,
    ts: usize,
    smem: usize,
}

/// The tiling of the contiguous one-pass backward, if x and dy of some tile fit on chip: `ct`
/// whole groups of `cg` planes dividing C, S whole packs, teams of `ts` threads (a power of two
/// of at least a warp) dividing a plane's packs, `ct` a multiple of the teams, and the tile's
/// 2·ct·S values in TILE_BWD_KR packs of each a thread plus at most `lim.smem` bytes of shared
/// memory. Among those that fit, the first by: two or more blocks an SM, then up to eight packs
/// a thread, then the most threads and blocks an SM (smaller tiles and teams first). From the
/// shape, the kernel's registers and its shared-memory limit alone, as [`tile_plan`].
fn contig_tile_plan(
    s: &PlaneShape,
    cg: usize,
    elt: usize,
    lim: KernelLimits,
) -> Option<ContigPlan> {
    let pn = 16 / elt;
    if cg == 0 || s.n == 0 || s.s == 0 || !s.s.is_multiple_of(pn) || i32::try_from(s.s).is_err() {
        return None;
    }
    let sp = s.s / pn;
    // The most a block holds: 1 024 threads' registers and the shared memory.
    let most = lim.smem + 1024 * TILE_BWD.held * 16 * 2;
    let mut best: Option<((usize, usize, usize, usize), ContigPlan)> = None;
    for ct in (1..)
        .map(|m| m * cg)
        .take_while(|&ct| ct <= s.c && ct * s.s * elt * 2 <= most)
    {
        if !s.c.is_multiple_of(ct) {
            continue;
        }
        for threads in [128usize, 256, 512, 1024] {
            if threads > lim.threads as usize {
                break;
            }
            for ts in [32usize, 64, 128, 256, 512, 1024] {
                if ts > threads {
                    break;
                }
                let teams = threads / ts;
                if !ct.is_multiple_of(teams) || !sp.is_multiple_of(ts) {
                    continue;
                }
                let (per, units) = (ct / teams, ct * sp / threads);
                let head = (per * (threads / 32) * 2 + 6 * ct).next_multiple_of(4) * 4;
                let smem = head + units.saturating_sub(TILE_BWD.held) * threads * 16 * 2;
                if smem > lim.smem {
                    continue;
                }
                let blocks = tile_blocks(lim.regs, threads, smem, lim.smem);
                let key = (blocks.min(2), units.min(8), blocks * threads, blocks);
                if best.is_none_or(|(k, _)| key > k) {
                    let plan = ContigPlan {
                        ct,
                        threads,
                        ts,
                        smem,
                    };
                    best = Some((key, plan));
                }
            }
        }
    }
    best.map(|(_, p)| p)
}

/// The channels-last reduction's tiling of C channels in packs of `pn`: TW packs across a block
/// (the smallest power of two covering them, at most 32) and the grid rows of TW packs.
fn cl_tiling(c: usize, pn: usize) -> (usize, usize) {
    let packs = c.div_ceil(pn).max(1);
    let tw = packs.next_power_of_two().min(32);
    (tw, packs.div_ceil(tw))
}

/// The reduction launch (planes.cu `planes_reduce`). Channels-last: blocks of (TW, 256/TW)
/// threads, TW packs of `pn` channels across (the smallest power of two covering C, at most 32),
/// one grid row per TW packs.
fn reduce_config(s: &PlaneShape, chunks: usize, planes: usize, pn: usize) -> Result<LaunchConfig> {
    Ok(if s.channels_last() {
        channel_tiles(s.c)?; // the documented channel limit
        let (tw, tiles) = cl_tiling(s.c, pn);
        LaunchConfig {
            grid_dim: (grid(s.n * chunks)?, tiles as u32, 1),
            block_dim: (tw as u32, (256 / tw) as u32, 1),
            shared_mem_bytes: 0,
        }
    } else {
        LaunchConfig {
            grid_dim: (grid(s.n.div_ceil(planes) * s.c * chunks)?, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    })
}

/// Grid rows of the channels-last reduction: one per 32 channels, at most 65 535 (the grid's
/// y limit), so at most 2 097 120 channels.
fn channel_tiles(c: usize) -> Result<u32> {
    u32::try_from(c.div_ceil(32))
        .ok()
        .filter(|&t| t <= 65_535)
        .ok_or_else(|| {
            Error::Shape(format!(
                "cuda launch: {c} channels in channels-last layout exceed the 2 097 120 the \
                 reduction grid allows; pass the input contiguous (.to_format(Contiguous))"
            ))
        })
}

fn small_config(n: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (grid(n.div_ceil(256))?, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// One block of 256 threads (planes.cu `FIN_THREADS`) per group or channel: the finalize kernels.
fn block_per_config(n: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (grid(n)?, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// Groups of at most this many partials get a warp each in the finalize kernels (planes.cu
/// `FIN_WARP_ITEMS`), eight groups a block (`FIN_WARPS`); larger ones a block of 256.
const FIN_WARP_ITEMS: usize = 256;
const FIN_WARPS: usize = 8;

/// The finalize kernels' launch (`planes_finalize_f32`, `planes_grad_finalize_f32`) over `groups`
/// groups of `items` partials each: a block of 256 threads a group, or a warp a group where
/// `items` is at most FIN_WARP_ITEMS (InstanceNorm's N·C groups of a few chunks each). From the
/// shape alone, so every GPU merges in the same order.
fn finalize_config(groups: usize, items: usize) -> Result<LaunchConfig> {
    Ok(if items <= FIN_WARP_ITEMS {
        LaunchConfig {
            grid_dim: (grid(groups.div_ceil(FIN_WARPS))?, 1, 1),
            block_dim: (32, FIN_WARPS as u32, 1),
            shared_mem_bytes: 0,
        }
    } else {
        block_per_config(groups)?
    })
}

/// The work of a group in the finalize kernels, the larger of the partials it merges
/// (⌈N/P⌉·chunks per channel for `g_code` 0, else C/G·chunks) and the planes whose backward
/// coefficients it writes (N per channel, else C/G): BatchNorm1d [65 536, 64] merges 256
/// partials a channel but writes 65 536 planes' coefficients, a block's work, not a warp's.
fn group_items(s: &PlaneShape, g_code: i32, rows: usize, chunks: usize) -> usize {
    let (per, planes) = if g_code == 0 {
        (rows, s.n)
    } else {
        let d = s.c / g_code.max(1) as usize;
        (d, d)
    };
    (per * chunks).max(planes)
}

/// Packs each thread of the elementwise kernels loads before using any (planes.cu `UNROLL`).
const APPLY_UNROLL: usize = 4;

/// The elementwise launch (planes.cu `planes_apply_units`): 256-thread blocks, as many as give
/// each thread one loop iteration of APPLY_UNROLL packs, at most four waves of the blocks the
/// kernel keeps resident (whole waves: a grid-stride loop's blocks all take the same work, so a
/// last wave a third full would cost a sixth of the time). Elementwise, so the grid changes no
/// result.
fn apply_config<T: Element>(dev: &CudaDevice, k: &Kernel, numel: usize) -> Result<LaunchConfig> {
    let wave = dev.sm_count() as usize * resident_blocks(k, 256);
    let blocks = (numel / pack::<T>())
        .div_ceil(256 * APPLY_UNROLL)
        .min(wave * 4)
        .max(1);
    Ok(LaunchConfig {
        grid_dim: (grid(blocks)?, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// Per-plane coefficients (a, m, k) so that y = a·(x − m) + k.
fn coef<T: Element>(
    dev: &CudaDevice,
    s: &PlaneShape,
    g: i32,
    mean_g: &CudaView<f32>,
    rstd_g: &CudaView<f32>,
    weight: Option<&CudaView<f32>>,
    bias: Option<&CudaView<f32>>,
) -> Result<[cudarc::driver::CudaSlice<f32>; 3]> {
    let planes = s.n * s.c;
    let mut a = dev.alloc::<f32>(planes)?;
    let mut m = dev.alloc::<f32>(planes)?;
    let mut k = dev.alloc::<f32>(planes)?;
    let f = dev.function(kernels::module::<T>("planes"), "planes_coef_f32")?;
    let (n_i, c_i, _, _) = s.kernel_args()?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(mean_g).arg(rstd_g);
    arg_or_null(&mut b, weight);
    arg_or_null(&mut b, bias);
    b.arg(&mut a)
        .arg(&mut m)
        .arg(&mut k)
        .arg(&n_i)
        .arg(&c_i)
        .arg(&g);
    // SAFETY: matches planes.cu's planes_coef_f32; statistics hold the group count (checked by callers).
    unsafe { b.launch(small_config(planes)?) }.map_err(launch_err)?;
    Ok([a, m, k])
}

/// r = (1 − f)·r + f·stat per channel (InstanceNorm: batch average of per-plane statistics).
#[allow(clippy::too_many_arguments)]
fn running_update<T: Element>(
    dev: &CudaDevice,
    s: &PlaneShape,
    groups: Grouping,
    running: Running<&mut CudaViewMut<f32>>,
    mean: &CudaView<f32>,
    varu: &cudarc::driver::CudaSlice<f32>,
) -> Result<()> {
    let Running {
        mean: rm,
        var: rv,
        factor,
    } = running;
    let factor = factor as f32;
    check_len("running_mean", rm.len(), s.c)?;
    check_len("running_var", rv.len(), s.c)?;
    let (n_i, c_i, _, _) = s.kernel_args()?;
    // InstanceNorm (per-sample groups) averages its per-plane statistics over the batch.
    let per = (groups == Grouping::Instance) as i32;
    let f = dev.function(kernels::module::<T>("planes"), "planes_running_update_f32")?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(rm)
        .arg(rv)
        .arg(mean)
        .arg(varu)
        .arg(&n_i)
        .arg(&c_i)
        .arg(&per)
        .arg(&factor);
    // SAFETY: matches planes_running_update_f32; running buffers hold C floats, statistics the groups.
    unsafe { b.launch(small_config(s.c)?) }.map_err(launch_err)?;
    Ok(())
}

/// A tile kernel's launch: a block per (sample, tile of `ct` channels), and its shape arguments
/// (C, S, Ct, C/G, tiles), as every tile kernel takes them.
struct TileLaunch {
    args: [i32; 5],
    cfg: LaunchConfig,
}

impl TileLaunch {
    fn new(s: &PlaneShape, ct: usize, cg: usize, threads: usize, smem: usize) -> Result<Self> {
        let tiles = s.c / ct;
        Ok(TileLaunch {
            args: [
                to_i32("C", s.c)?,
                to_i32("S", s.s)?,
                to_i32("channels a tile", ct)?,
                to_i32("C/G", cg)?,
                to_i32("C/tile", tiles)?,
            ],
            cfg: LaunchConfig {
                grid_dim: (grid(s.n.saturating_mul(tiles))?, 1, 1),
                block_dim: (threads as u32, 1, 1),
                shared_mem_bytes: smem as u32,
            },
        })
    }

    fn push<'a>(&'a self, b: &mut LaunchArgs<'a>) {
        for a in &self.args {
            b.arg(a);
        }
    }
}

/// The one-pass channels-last GroupNorm/InstanceNorm forward (planes.cu `planes_tile_fwd`), when
/// [`tile_plan`] finds a tiling, x and y are 16-byte aligned and the knob allows: writes `y`,
/// `mean`, `rstd` and returns the groups' unbiased variances (for running statistics); `None`
/// (nothing launched) otherwise.
#[allow(clippy::too_many_arguments)]
fn tile_forward<T: Element>(
    dev: &CudaDevice,
    x: &CudaView<T>,
    y: &mut CudaViewMut<T>,
    s: &PlaneShape,
    groups: Grouping,
    cg: usize,
    weight: Option<&CudaView<f32>>,
    bias: Option<&CudaView<f32>>,
    eps: f32,
    mean: &mut CudaViewMut<f32>,
    rstd: &mut CudaViewMut<f32>,
) -> Result<Option<cudarc::driver::CudaSlice<f32>>> {
    let stream = dev.stream();
    if planes_tile_knob_off() || !aligned16(x, stream) || !aligned16(&y.as_view(), stream) {
        return Ok(None);
    }
    let k = dev.kernel(
        kernels::module::<T>("planes"),
        &kernels::name::<T>("planes_tile_fwd"),
    )?;
    let Some(plan) = tile_plan(TILE_FWD, s, cg, T::DTYPE.size(), KernelLimits::of(&k)) else {
        return Ok(None);
    };
    let tl = TileLaunch::new(s, plan.ct, cg, plan.threads, plan.smem)?;
    let mut varu = dev.alloc::<f32>(groups.num_groups(s))?;
    let nan_i = groups.welford_mean() as i32;
    let mut b = stream.launch_builder(&k.func);
    b.arg(x).arg(&mut *y);
    arg_or_null(&mut b, weight);
    arg_or_null(&mut b, bias);
    b.arg(&mut *mean).arg(&mut *rstd).arg(&mut varu);
    tl.push(&mut b);
    b.arg(&eps).arg(&nan_i);
    // SAFETY: matches planes.cu's planes_tile_fwd_*; x/y hold N·S·C values (checked by the
    // caller), mean/rstd/varu the N·G groups; C % ct == 0, S·ct values fit the plan's registers
    // and shared memory (tile_plan), and x, y are 16-byte aligned.
    unsafe { b.launch(tl.cfg) }.map_err(launch_err)?;
    Ok(Some(varu))
}

/// The one-pass GroupNorm/InstanceNorm backward for input statistics (planes.cu
/// `planes_tile_bwd` channels-last, `planes_tile_bwd_contig` contiguous, then
/// `planes_grad_params_f32` over their per-plane partials), when [`tile_plan`] or
/// [`contig_tile_plan`] finds a tiling, dy, x and dx are 16-byte aligned and the knob allows;
/// `false` (nothing launched) otherwise.
#[allow(clippy::too_many_arguments)]
fn tile_backward<T: Element>(
    dev: &CudaDevice,
    dy: &CudaView<T>,
    x: &CudaView<T>,
    s: &PlaneShape,
    g_code: i32,
    weight: Option<&CudaView<f32>>,
    mean: &CudaView<f32>,
    rstd: &CudaView<f32>,
    dx: &mut CudaViewMut<T>,
    dweight: &mut CudaViewMut<f32>,
    dbias: &mut CudaViewMut<f32>,
) -> Result<bool> {
    let stream = dev.stream();
    if planes_tile_knob_off()
        || !aligned16(dy, stream)
        || !aligned16(x, stream)
        || !aligned16(&dx.as_view(), stream)
    {
        return Ok(false);
    }
    let cl = s.channels_last();
    let base = if cl {
        "planes_tile_bwd"
    } else {
        "planes_tile_bwd_contig"
    };
    let k = dev.kernel(kernels::module::<T>("planes"), &kernels::name::<T>(base))?;
    let cg = s.c / g_code.max(1) as usize;
    let elt = T::DTYPE.size();
    let lim = KernelLimits::of(&k);
    let plan = if cl {
        tile_plan(TILE_BWD, s, cg, elt, lim).map(|p| (p.ct, p.threads, 0, p.smem))
    } else {
        contig_tile_plan(s, cg, elt, lim).map(|p| (p.ct, p.threads, p.ts, p.smem))
    };
    let Some((ct, block, ts, smem)) = plan else {
        return Ok(false);
    };
    let tl = TileLaunch::new(s, ct, cg, block, smem)?;
    let mut part = dev.alloc::<f32>(s.n * s.c * 2)?;
    let ts_i = ts as i32;
    let mut b = stream.launch_builder(&k.func);
    b.arg(dy).arg(x);
    arg_or_null(&mut b, weight);
    b.arg(mean).arg(rstd).arg(&mut *dx).arg(&mut part);
    tl.push(&mut b);
    if !cl {
        b.arg(&ts_i);
    }
    // SAFETY: matches planes.cu's planes_tile_bwd_* / planes_tile_bwd_contig_* (the team size
    // last); dy/x/dx hold N·C·S values, mean/rstd the N·G groups (checked by the caller), part
    // N·C·2 floats; the tiling fits (tile_plan, contig_tile_plan) and the tensors are 16-byte
    // aligned.
    unsafe { b.launch(tl.cfg) }.map_err(launch_err)?;
    let (n_i, one) = (s.n as i64, 1i32);
    let f = dev.function(kernels::module::<T>("planes"), "planes_grad_params_f32")?;
    let mut b = stream.launch_builder(&f);
    b.arg(&part)
        .arg(rstd)
        .arg(dweight)
        .arg(dbias)
        .arg(&n_i)
        .arg(&tl.args[0]) // C
        .arg(&one)
        .arg(&g_code);
    // SAFETY: matches planes_grad_params_f32: part holds N·C planes of one chunk, dweight/dbias C
    // floats (C > 0: tile_plan found a tile).
    unsafe { b.launch(block_per_config(s.c)?) }.map_err(launch_err)?;
    Ok(true)
}

/// BatchNorm / InstanceNorm / GroupNorm forward: writes `y`, and the statistics used into
/// `mean`/`rstd` (`groups` entries for input statistics, `C` for fixed ones).
#[allow(clippy::too_many_arguments)]
pub fn planes_forward<T: Element>(
    dev: &CudaDevice,
    x: &CudaView<T>,
    y: &mut CudaViewMut<T>,
    shape: PlaneShape,
    groups: Grouping,
    weight: Option<&CudaView<f32>>,
    bias: Option<&CudaView<f32>>,
    eps: f32,
    stats: ViewSource<'_, '_>,
    mean: &mut CudaViewMut<f32>,
    rstd: &mut CudaViewMut<f32>,
) -> Result<()> {
    let s = shape;
    let numel = s.checked_numel()?;
    check_len("x", x.len(), numel)?;
    check_len("y", y.len(), numel)?;
    for (name, p) in [("weight", &weight), ("bias", &bias)] {
        if let Some(p) = p {
            check_len(name, p.len(), s.c)?;
        }
    }
    groups.check("cuda launch", s.c)?;
    // Running statistics average per-sample statistics over the batch only when a group is one
    // channel (InstanceNorm); other per-sample groupings have no per-channel running statistics.
    if let (Source::Input { running: Some(_) }, Grouping::Groups(g)) = (&stats, groups) {
        return Err(Error::InvalidArgument(format!(
            "cuda launch: running statistics need per-channel statistics: Grouping::Channel \
             (BatchNorm) or Grouping::Instance (InstanceNorm), got Groups({g})"
        )));
    }
    // Every length is checked before the first launch: a failed call writes nothing.
    if let Source::Input { running: Some(r) } = &stats {
        check_len("running_mean", r.mean.len(), s.c)?;
        check_len("running_var", r.var.len(), s.c)?;
    }
    let (n_i, c_i, s_i, cl) = s.kernel_args()?;
    // The elementwise kernels take S = 1 as channels-last (the same memory): 16-byte packs along
    // C instead of one value a plane.
    let cl = cl.max((s.s == 1) as i32);
    let stream = dev.stream();
    let g_code = match stats {
        Source::Input { .. } => groups.code(s.c),
        Source::Fixed { .. } => 0,
    };
    // The running-statistics update is queued last, after every other launch was accepted, so
    // that a failed call leaves the running statistics as they were.
    let mut pending = None;
    match stats {
        Source::Input { running } => {
            let ng = groups.num_groups(&s);
            check_len("mean", mean.len(), ng)?;
            check_len("rstd", rstd.len(), ng)?;
            if numel == 0 {
                return Ok(());
            }
            if let (Some(g), true) = (groups.per_sample(s.c), s.channels_last()) {
                // One pass where a tile of the sample fits on chip.
                let cg = s.c / g;
                if let Some(varu) =
                    tile_forward(dev, x, y, &s, groups, cg, weight, bias, eps, mean, rstd)?
                {
                    if let Some(r) = running {
                        running_update::<T>(dev, &s, groups, r, &mean.as_view(), &varu)?;
                    }
                    return Ok(());
                }
            }
            if let (Some(g), false) = (groups.per_sample(s.c), s.channels_last()) {
                // Contiguous GroupNorm/InstanceNorm: each (n, group) is one contiguous row of
                // C/G·S values; one pass computes its statistics and output (x read once when
                // the row fits on chip).
                let mut varu = dev.alloc::<f32>(ng)?;
                let cols = (s.c / g) * s.s;
                // The cluster forward needs 16-byte rows and a channel's values in whole packs.
                let packed = aligned16(x, stream)
                    && aligned16(&y.as_view(), stream)
                    && (s.s == 1 || s.s.is_multiple_of(pack::<T>()));
                let (k, cfg, cache) =
                    rows_fwd_kernel::<T>(dev, "group_norm_fwd", ng, cols, packed)?;
                let (rows_i, cols_i, seg_i, g_i, nan_i) = (
                    ng as i64,
                    row_len("C/G·S", cols)?,
                    to_i32("S", s.s)?,
                    g as i32,
                    groups.welford_mean() as i32,
                );
                let mut b = stream.launch_builder(&k.func);
                b.arg(x).arg(&mut *y);
                arg_or_null(&mut b, weight);
                arg_or_null(&mut b, bias);
                b.arg(&mut *mean).arg(&mut *rstd).arg(&mut varu);
                b.arg(&rows_i)
                    .arg(&cols_i)
                    .arg(&seg_i)
                    .arg(&g_i)
                    .arg(&eps)
                    .arg(&cache)
                    .arg(&nan_i);
                // SAFETY: matches rows.cu's group_norm_fwd; x/y hold N·C·S, stats N·G elements.
                unsafe { b.launch(cfg) }.map_err(launch_err)?;
                if let Some(r) = running {
                    running_update::<T>(dev, &s, groups, r, &mean.as_view(), &varu)?;
                }
                return Ok(());
            }
            let red = Reduction::of(&s, g_code, pack::<T>());
            let ra = red.args()?;
            let mut part = dev.alloc::<f32>(red.partials() * 3)?;
            let f = dev.function(
                kernels::module::<T>("planes"),
                &kernels::name::<T>(red.kernel("planes_stats")),
            )?;
            let mut b = stream.launch_builder(&f);
            b.arg(x).arg(&mut part);
            ra.push(&mut b);
            // SAFETY: matches planes_stats[_cl]_*; part holds the view's ⌈N/P⌉·C·chunks·3 floats.
            unsafe { b.launch(red.config(pack::<T>())?) }.map_err(launch_err)?;

            let mut varu = dev.alloc::<f32>(ng)?;
            let f = dev.function(kernels::module::<T>("planes"), "planes_finalize_f32")?;
            let mut b = stream.launch_builder(&f);
            b.arg(&part).arg(&mut *mean).arg(&mut *rstd).arg(&mut varu);
            let nan_i = groups.welford_mean() as i32;
            // G == 0: the finalize's N is the partial rows a channel.
            b.arg(if g_code == 0 { &ra.rows } else { &n_i })
                .arg(&c_i)
                .arg(&ra.chunks)
                .arg(&g_code)
                .arg(&eps)
                .arg(&nan_i);
            let cfg = finalize_config(ng, group_items(&s, g_code, red.rows, red.chunks))?;
            // SAFETY: matches planes_finalize_f32; mean/rstd/varu hold the group count.
            unsafe { b.launch(cfg) }.map_err(launch_err)?;
            pending = running.map(|r| (r, varu));
        }
        Source::Fixed { mean: rm, var: rv } => {
            check_len("running_mean", rm.len(), s.c)?;
            check_len("running_var", rv.len(), s.c)?;
            check_len("mean", mean.len(), s.c)?;
            check_len("rstd", rstd.len(), s.c)?;
            let f = dev.function(kernels::module::<T>("planes"), "planes_eval_stats_f32")?;
            let mut b = stream.launch_builder(&f);
            b.arg(rm)
                .arg(rv)
                .arg(&mut *mean)
                .arg(&mut *rstd)
                .arg(&c_i)
                .arg(&eps);
            // SAFETY: matches planes_eval_stats_f32; all four buffers hold C floats.
            unsafe { b.launch(small_config(s.c)?) }.map_err(launch_err)?;
            if numel == 0 {
                return Ok(());
            }
        }
    }
    let [a, m, k] = coef::<T>(
        dev,
        &s,
        g_code,
        &mean.as_view(),
        &rstd.as_view(),
        weight,
        bias,
    )?;
    let f = dev.kernel(
        kernels::module::<T>("planes"),
        &kernels::name::<T>("planes_apply"),
    )?;
    let mut b = stream.launch_builder(&f.func);
    b.arg(x)
        .arg(y)
        .arg(&a)
        .arg(&m)
        .arg(&k)
        .arg(&n_i)
        .arg(&c_i)
        .arg(&s_i)
        .arg(&cl);
    // SAFETY: matches planes_apply_*; coefficient buffers hold N·C floats.
    unsafe { b.launch(apply_config::<T>(dev, &f, numel)?) }.map_err(launch_err)?;
    if let Some((r, varu)) = pending {
        running_update::<T>(dev, &s, groups, r, &mean.as_view(), &varu)?;
    }
    Ok(())
}

/// Backward of [`planes_forward`]: writes `dx`, `dweight` and `dbias` (`[C]`). `from_input`
/// says whether `mean`/`rstd` were input statistics (per group) or fixed ones (per channel).
#[allow(clippy::too_many_arguments)]
pub fn planes_backward<T: Element>(
    dev: &CudaDevice,
    dy: &CudaView<T>,
    x: &CudaView<T>,
    shape: PlaneShape,
    groups: Grouping,
    weight: Option<&CudaView<f32>>,
    mean: &CudaView<f32>,
    rstd: &CudaView<f32>,
    from_input: bool,
    dx: &mut CudaViewMut<T>,
    dweight: &mut CudaViewMut<f32>,
    dbias: &mut CudaViewMut<f32>,
) -> Result<()> {
    let s = shape;
    let numel = s.checked_numel()?;
    groups.check("cuda launch", s.c)?;
    check_len("dy", dy.len(), numel)?;
    check_len("x", x.len(), numel)?;
    check_len("dx", dx.len(), numel)?;
    check_len("dweight", dweight.len(), s.c)?;
    check_len("dbias", dbias.len(), s.c)?;
    if let Some(w) = weight {
        check_len("weight", w.len(), s.c)?;
    }
    let g_code = if from_input { groups.code(s.c) } else { 0 };
    let ng = if from_input {
        groups.num_groups(&s)
    } else {
        s.c
    };
    check_len("mean", mean.len(), ng)?;
    check_len("rstd", rstd.len(), ng)?;
    let (n_i, c_i, s_i, cl) = s.kernel_args()?;
    // The elementwise kernels take S = 1 as channels-last (the same memory): 16-byte packs along
    // C instead of one value a plane.
    let cl = cl.max((s.s == 1) as i32);
    let stream = dev.stream();
    // GroupNorm/InstanceNorm: one pass where a tile of the sample fits on chip.
    if g_code > 0
        && numel > 0
        && tile_backward(
            dev, dy, x, &s, g_code, weight, mean, rstd, dx, dweight, dbias,
        )?
    {
        return Ok(());
    }
    let red = Reduction::of(&s, g_code, pack::<T>());
    let ra = red.args()?;
    let [a, m, _] = coef::<T>(dev, &s, g_code, mean, rstd, weight, None)?;
    let mut part = dev.zeros::<f32>(red.partials() * 2)?;
    if numel > 0 {
        let f = dev.function(
            kernels::module::<T>("planes"),
            &kernels::name::<T>(red.kernel("planes_grad_sums")),
        )?;
        let mut b = stream.launch_builder(&f);
        b.arg(dy).arg(x).arg(&m).arg(&mut part);
        ra.push(&mut b);
        // SAFETY: matches planes_grad_sums[_cl]_*; part holds the view's ⌈N/P⌉·C·chunks·2 floats.
        unsafe { b.launch(red.config(pack::<T>())?) }.map_err(launch_err)?;
    }
    let planes = s.n * s.c;
    let mut bc = dev.alloc::<f32>(planes)?;
    let mut kc = dev.alloc::<f32>(planes)?;
    let fi = from_input as i32;
    let f = dev.function(kernels::module::<T>("planes"), "planes_grad_finalize_f32")?;
    let mut b = stream.launch_builder(&f);
    b.arg(&part);
    arg_or_null(&mut b, weight);
    b.arg(rstd)
        .arg(&mut bc)
        .arg(&mut kc)
        .arg(&n_i)
        .arg(&ra.rows)
        .arg(&c_i)
        .arg(&s_i)
        .arg(&ra.chunks)
        .arg(&g_code)
        .arg(&fi);
    let cfg = finalize_config(ng, group_items(&s, g_code, red.rows, red.chunks))?;
    // SAFETY: matches planes_grad_finalize_f32; coefficient buffers hold N·C floats.
    unsafe { b.launch(cfg) }.map_err(launch_err)?;

    // No channels, no parameter gradients (and no block of a zero grid clamped to one).
    if s.c > 0 {
        let f = dev.function(kernels::module::<T>("planes"), "planes_grad_params_f32")?;
        let mut b = stream.launch_builder(&f);
        b.arg(&part)
            .arg(rstd)
            .arg(dweight)
            .arg(dbias)
            .arg(&ra.rows) // N: the partial rows a channel (G > 0 takes a plane a block: N)
            .arg(&c_i)
            .arg(&ra.chunks)
            .arg(&g_code);
        // SAFETY: matches planes_grad_params_f32; dweight/dbias hold C floats.
        unsafe { b.launch(block_per_config(s.c)?) }.map_err(launch_err)?;
    }

    if numel > 0 {
        let f = dev.kernel(
            kernels::module::<T>("planes"),
            &kernels::name::<T>("planes_grad_apply"),
        )?;
        let mut b = stream.launch_builder(&f.func);
        b.arg(dy)
            .arg(x)
            .arg(dx)
            .arg(&a)
            .arg(&bc)
            .arg(&m)
            .arg(&kc)
            .arg(&n_i)
            .arg(&c_i)
            .arg(&s_i)
            .arg(&cl);
        // SAFETY: matches planes_grad_apply_*; all per-plane buffers hold N·C floats.
        unsafe { b.launch(apply_config::<T>(dev, &f, numel)?) }.map_err(launch_err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An H100's tile kernel: 64 registers (the launch bound's cap), 227 KiB of shared memory.
    const LIM: KernelLimits = KernelLimits {
        regs: 64,
        smem: 227 * 1024,
        threads: 1024,
    };

    fn shape(n: usize, c: usize, sp: usize, format: MemoryFormat) -> PlaneShape {
        PlaneShape {
            n,
            c,
            s: sp,
            format,
        }
    }

    #[test]
    fn one_pass_channels_last_tiles_fit_on_chip_and_take_whole_groups() {
        let nhwc = MemoryFormat::ChannelsLast;
        let limit = LIM.smem;
        let plan = |n, c, sp, cg, elt| tile_plan(TILE_FWD, &shape(n, c, sp, nhwc), cg, elt, LIM);
        let bwd = |n, c, sp, cg, elt| tile_plan(TILE_BWD, &shape(n, c, sp, nhwc), cg, elt, LIM);
        // The standard channels-last shapes (docs/PERF.md): GroupNorm's 32 groups, InstanceNorm.
        // [32, 512, 64, 64] f16: 16-channel groups of 128 KiB, two 512-thread blocks an SM.
        let p = plan(32, 512, 64 * 64, 16, 2).unwrap();
        assert_eq!(p.smem, (16 + 3) * 16 * 4 + (8192 - 4 * 512) * 16);
        // (n, c, s, channels a group, bytes a value) -> forward and backward (ct, threads).
        #[rustfmt::skip]
        let cases = [
            // f32: 256 KiB a group, 64 KiB of it in the registers of a 1024-thread block; the
            // backward (x and dy: 512 KiB) does not fit. f16: the backward's x and dy in a
            // 1024-thread block (64 KiB in registers, 192 KiB shared).
            ((32, 512, 64 * 64, 16, 2), Some((16, 512)), Some((16, 1024))),
            ((32, 512, 64 * 64, 16, 4), Some((16, 1024)), None),
            // [8, 256, 128, 128]: 8-channel groups, 256 KiB in f16 (the forward fits).
            ((8, 256, 128 * 128, 8, 2), Some((8, 1024)), None),
            ((8, 256, 128 * 128, 8, 4), None, None),
            // InstanceNorm [64, 256, 32, 32]: 64 bytes of a position, four 256-thread blocks an
            // SM forward, two 512-thread blocks backward.
            ((64, 256, 32 * 32, 1, 4), Some((16, 256)), Some((16, 512))),
            ((64, 256, 32 * 32, 1, 2), Some((32, 256)), Some((32, 512))),
            // [16, 64, 256, 256]: even one pack of channels is 1 MiB a sample.
            ((16, 64, 256 * 256, 1, 4), None, None),
        ];
        for ((n, c, sp, cg, elt), f, b) in cases {
            let ctt = |p: Option<TilePlan>| p.map(|p| (p.ct, p.threads));
            assert_eq!(
                ctt(plan(n, c, sp, cg, elt)),
                f,
                "forward {n} {c} {sp} {cg} {elt}"
            );
            assert_eq!(
                ctt(bwd(n, c, sp, cg, elt)),
                b,
                "backward {n} {c} {sp} {cg} {elt}"
            );
        }
        // Channels that are not whole packs, and empty inputs, take the multi-launch path.
        assert_eq!(plan(2, 6, 100, 3, 4), None);
        assert_eq!(plan(0, 8, 100, 1, 4), None);
        assert_eq!(plan(2, 8, 0, 1, 4), None);
        // Every plan: whole groups and packs a tile, tiles dividing C, a power-of-two number of
        // packs a position, the slices held by registers and shared memory.
        for n in [1, 3] {
            for c in [4, 8, 12, 24, 64, 96, 512] {
                for sp in [1, 7, 49, 1000, 4096, 20_000] {
                    for cg in [1, 2, 3, 4, 8, 16, 32] {
                        for elt in [2, 4] {
                            if c % cg != 0 {
                                continue;
                            }
                            for (kind, p) in [
                                (TILE_FWD, plan(n, c, sp, cg, elt)),
                                (TILE_BWD, bwd(n, c, sp, cg, elt)),
                            ] {
                                let Some(p) = p else { continue };
                                let (pn, ppp) = (16 / elt, p.ct * elt / 16);
                                assert!(p.ct % cg == 0 && p.ct % pn == 0 && c % p.ct == 0, "{p:?}");
                                assert!(ppp.is_power_of_two() && ppp <= TILE_MAX_PACKS, "{p:?}");
                                assert!(p.threads % 32 == 0 && p.threads <= 1024, "{p:?}");
                                let lanes = (p.threads / 32 + kind.arrays) * p.ct * 4;
                                let cached = (sp * ppp).saturating_sub(kind.held * p.threads) * 16;
                                assert_eq!(p.smem, lanes + cached * kind.tensors, "{p:?}");
                                assert!(p.smem <= limit, "{p:?}");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn host_constants_mirror_the_kernels_defines() {
        let src = include_str!("../../../kernels/planes.cu");
        let defined = |name: &str| -> Vec<String> {
            src.lines()
                .filter_map(|l| {
                    let t: Vec<&str> = l.split_whitespace().collect();
                    (t.len() >= 3 && t[0] == "#define" && t[1] == name).then(|| t[2].to_string())
                })
                .collect()
        };
        for (name, v) in [
            ("TILE_KR", TILE_FWD.held),
            ("TILE_BWD_KR", TILE_BWD.held),
            ("FIN_WARP_ITEMS", FIN_WARP_ITEMS),
            ("FIN_WARPS", FIN_WARPS),
            ("UNROLL", APPLY_UNROLL),
        ] {
            assert_eq!(
                defined(name),
                vec![v.to_string()],
                "planes.cu #define {name}"
            );
        }
    }

    #[test]
    fn contiguous_one_pass_backward_tiles_hold_whole_groups_of_x_and_dy() {
        let nchw = MemoryFormat::Contiguous;
        let limit = LIM.smem;
        let plan = |n, c, sp, cg, elt| {
            contig_tile_plan(&shape(n, c, sp, nchw), cg, elt, LIM).map(|p| (p.ct, p.threads, p.ts))
        };
        // GroupNorm [32, 512, 64, 64] f16: a 16-plane group of x and dy (256 KiB), 64 KiB in the
        // registers of a 1 024-thread block in teams of 64; f32 (512 KiB) does not fit.
        assert_eq!(plan(32, 512, 64 * 64, 16, 2), Some((16, 1024, 64)));
        assert_eq!(plan(32, 512, 64 * 64, 16, 4), None);
        assert_eq!(plan(8, 256, 128 * 128, 8, 2), None);
        // InstanceNorm [64, 256, 32, 32]: four (f32) or eight (f16) planes a 128-thread block, a
        // warp a plane, eight packs a thread; [16, 64, 256, 256] f16: a plane a 1 024-thread block.
        assert_eq!(plan(64, 256, 32 * 32, 1, 4), Some((4, 128, 32)));
        assert_eq!(plan(64, 256, 32 * 32, 1, 2), Some((8, 128, 32)));
        assert_eq!(plan(16, 64, 256 * 256, 1, 2), Some((1, 1024, 1024)));
        assert_eq!(plan(16, 64, 256 * 256, 1, 4), None);
        // Planes of partial packs, or fewer packs than a warp, take the multi-launch path.
        assert_eq!(plan(2, 4, 30, 1, 4), None);
        assert_eq!(plan(2, 4, 64, 1, 4), None);
        for n in [1, 3] {
            for c in [1, 2, 6, 16, 64, 512] {
                for sp in [128, 256, 1024, 4096, 16_384, 65_536] {
                    for cg in [1, 2, 3, 8, 16] {
                        for elt in [2, 4] {
                            if c % cg != 0 {
                                continue;
                            }
                            let Some(p) = contig_tile_plan(&shape(n, c, sp, nchw), cg, elt, LIM)
                            else {
                                continue;
                            };
                            let (teams, packs) = (p.threads / p.ts, sp * elt / 16);
                            assert!(p.ct % cg == 0 && c % p.ct == 0, "{p:?}");
                            assert!(
                                p.ts.is_power_of_two() && p.ts >= 32 && p.ts <= p.threads,
                                "{p:?}"
                            );
                            assert!(p.ct % teams == 0 && packs % p.ts == 0, "{p:?}");
                            let units = p.ct * packs / p.threads;
                            let head = (p.ct / teams * p.threads / 32 * 2 + 6 * p.ct)
                                .next_multiple_of(4)
                                * 4;
                            let cached = units.saturating_sub(TILE_BWD.held) * p.threads * 32;
                            assert_eq!(p.smem, head + cached, "{p:?}");
                            assert!(p.smem <= limit, "{p:?}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn several_planes_a_block_only_for_per_channel_statistics_of_whole_planes() {
        let nchw = MemoryFormat::Contiguous;
        for &(n, c, sp) in &[
            (64, 256, 56 * 56),
            (256, 64, 112 * 112),
            (256, 512, 7 * 7),
            (4096, 64, 1),
            (13, 3, 200),
            (1, 8, 4096),
            (3, 1000, 1),
            (100_000, 2, 3),
        ] {
            for pn in [4, 8] {
                let s = shape(n, c, sp, nchw);
                let chunks = reduce_chunks(&s, pn);
                let p = reduce_planes(&s, chunks, pn, 0);
                let rows = n.div_ceil(p);
                let units = if sp % pn == 0 { sp / pn } else { sp };
                // Every partial row holds at least one plane, and a block at most about
                // REDUCE_BLOCK_UNITS units (or one plane, when a plane alone is more).
                assert!(p >= 1 && p <= n && (rows - 1) * p < n, "{s:?}: P {p}");
                assert!(p == 1 || p * units <= REDUCE_BLOCK_UNITS, "{s:?}: P {p}");
                // The grid keeps REDUCE_BLOCKS blocks where the planes allow it.
                assert!(
                    rows * c * chunks >= REDUCE_BLOCKS.min(n * c),
                    "{s:?}: P {p}"
                );
                // Per-sample groups, chunked planes and channels-last take a plane a block.
                assert_eq!(reduce_planes(&s, chunks, pn, 3), 1);
                assert_eq!(reduce_planes(&s, 2, pn, 0), 1);
                let cl = shape(n, c, sp, MemoryFormat::ChannelsLast);
                assert_eq!(reduce_planes(&cl, reduce_chunks(&cl, pn), pn, 0), 1);
            }
        }
        // BatchNorm2d [64, 256, 56, 56]: several planes a block in f32 and f16.
        let s = shape(64, 256, 56 * 56, nchw);
        assert!(reduce_planes(&s, 1, 4, 0) > 1 && reduce_planes(&s, 1, 8, 0) > 1);
    }

    #[test]
    fn per_channel_reductions_of_channels_last_or_single_value_planes_read_one_sample() {
        let (nchw, nhwc) = (MemoryFormat::Contiguous, MemoryFormat::ChannelsLast);
        // BatchNorm1d [4096, 64] (S = 1) and BatchNorm2d channels-last: one sample of N·S rows
        // in the channels-last kernel, its chunks over the whole batch.
        for s in [shape(4096, 64, 1, nchw), shape(256, 64, 112 * 112, nhwc)] {
            let r = Reduction::of(&s, 0, 4);
            assert_eq!((r.view.n, r.view.c, r.view.s), (1, s.c, s.n * s.s));
            assert!(r.view.channels_last() && r.planes == 1 && r.rows == 1);
            assert!(r.chunks > 1 && r.partials() == s.c * r.chunks);
            assert_eq!(r.kernel("planes_stats"), "planes_stats_cl");
        }
        // Per-sample groups keep their samples; BatchNorm NCHW with planes keeps its layout.
        let inst = shape(64, 256, 32 * 32, nhwc);
        assert_eq!(Reduction::of(&inst, 256, 8).view, inst);
        let bn = shape(64, 256, 56 * 56, nchw);
        let r = Reduction::of(&bn, 0, 4);
        assert_eq!(r.view, bn);
        assert_eq!(r.kernel("planes_stats"), "planes_stats");
        assert_eq!(r.rows, bn.n.div_ceil(r.planes));
    }

    #[test]
    fn finalize_takes_a_warp_a_group_for_few_partials() {
        let warp = |cfg: LaunchConfig| cfg.block_dim == (32, FIN_WARPS as u32, 1);
        // InstanceNorm2d channels-last [64, 256, 32, 32]: 16 384 groups of a few chunks each.
        let s = shape(64, 256, 32 * 32, MemoryFormat::ChannelsLast);
        let chunks = reduce_chunks(&s, 8);
        let items = group_items(&s, 256, s.n, chunks);
        assert_eq!(items, chunks);
        let cfg = finalize_config(64 * 256, items).unwrap();
        assert!(warp(cfg) && cfg.grid_dim.0 as usize * FIN_WARPS >= 64 * 256);
        // BatchNorm2d channels-last [256, 64, 112, 112]: 64 channels of 1 056 partials (one
        // sample of N·S rows in chunks).
        let s = shape(256, 64, 112 * 112, MemoryFormat::ChannelsLast);
        let r = Reduction::of(&s, 0, 8);
        let items = group_items(&s, 0, r.rows, r.chunks);
        assert!(items == 1056 && items > FIN_WARP_ITEMS);
        let cfg = finalize_config(64, items).unwrap();
        assert!(!warp(cfg) && cfg.grid_dim.0 == 64 && cfg.block_dim == (256, 1, 1));
        // GroupNorm: C/G channels' chunks a group.
        let s = shape(2, 32, 4096, MemoryFormat::ChannelsLast);
        assert_eq!(group_items(&s, 8, s.n, 3), 4 * 3);
        // BatchNorm1d [65536, 64]: few partials a channel, but 65 536 planes' backward
        // coefficients to write: a block a channel.
        let s = shape(65_536, 64, 1, MemoryFormat::Contiguous);
        let r = Reduction::of(&s, 0, 4);
        assert!(r.rows * r.chunks <= FIN_WARP_ITEMS);
        assert!(!warp(
            finalize_config(64, group_items(&s, 0, r.rows, r.chunks)).unwrap()
        ));
    }

    #[test]
    fn single_value_planes_with_more_channels_than_the_channels_last_grid_stay_contiguous() {
        let s = shape(4, 2_097_121, 1, MemoryFormat::Contiguous);
        let r = Reduction::of(&s, 0, 4);
        assert_eq!(r.view, s);
        assert!(r.config(4).is_ok());
    }

    #[test]
    fn channels_last_grid_limit_is_an_error() {
        assert_eq!(channel_tiles(1).unwrap(), 1);
        assert_eq!(channel_tiles(2_097_120).unwrap(), 65_535);
        let e = channel_tiles(2_097_121).unwrap_err().to_string();
        assert!(
            e.contains("2097121 channels") && e.contains("contiguous"),
            "{e}"
        );
    }
}
