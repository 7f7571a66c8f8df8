//! # moe-cpu
//!
//! The CPU backend: every stage of [`moe_core::MoeStages`] for `f32`, `half::f16` and
//! `half::bf16`, over plain slices the caller owns. Arithmetic and accumulation in f32, every
//! sum in a fixed order (bitwise deterministic, whatever the thread count), no allocation in any
//! stage once the backend's one buffer of packed rows has its size ([`Cpu::prepare`] sizes it for
//! a plan; otherwise the first forward that needs it allocates it, at most 64 MiB, reused after;
//! with several threads, a second buffer of at most 8 MiB holds the few-rows items' results
//! where compute-bound items take their work on, see [`Tuning::overlap_rows`]).
//!
//! The matrix products (router, expert GEMMs, shared expert, latent projections) run on packed,
//! cache-blocked SIMD microkernels chosen at run time (AVX-512 or AVX2+FMA on x86-64, NEON on
//! aarch64, portable Rust elsewhere); f16/bf16 operands are widened to f32 while packing. With
//! bf16 operands on a CPU with AMX-BF16 ([`Isa::Amx`], Linux), work items of at least 6 rows run
//! on the tile unit instead (bf16 products, f32 sums); `MOE_CPU_AMX=0` turns that off. On a CPU
//! with AVX512-BF16 but no AMX ([`Isa::Avx512Bf16`]), bf16 operands are multiplied in pairs by
//! `vdpbf16ps` (f32 sums) instead of being widened, for the items the [`Tuning`] gives it (AMD
//! Zen 4: all; Intel, where it runs at half the FMA rate: 1-2 rows). `MOE_CPU_ISA` (`avx512`,
//! `avx2`, `generic`, ...) caps the automatic choice, for comparisons. Which kernel takes how many
//! rows is the CPU model's [`Tuning`] (by vendor; [`Cpu::with_tuning`] overrides it).
//! Where a weight-broadcast kernel takes an expert's rows (rows in the vector lanes), they are
//! transposed once per GEMM into that buffer and shared by all the expert's work items,
//! instead of once per work item.
//! [`Cpu::parallel`] spreads the work over the current rayon pool; there, where the
//! [`Tuning`] says so, the items that stream their weights for few rows (memory-bound) are cut
//! into steps that the compute-bound items take on while they run (their weights fetched into
//! L2 during those items' arithmetic, then run from there). The portable scalar path
//! ([`Kernels::Portable`]) is kept as the reference the fast paths are tested against.

mod act;
mod gemm;
mod portable;
#[cfg(feature = "trace")]
pub mod trace;

pub use gemm::{Isa, Tuning};

use bytemuck::Pod;
use core::mem::MaybeUninit;
use core::sync::atomic::{AtomicUsize, Ordering};
use gemm::{Block, MB, NB, Tiles};
use moe_core::backend::{Backend, ExpertRows, MlpWeights, MoeStages, PermuteBuffers};
use moe_core::math::{self, RouteScratch};
use moe_core::reduce::HostSlices;
use moe_core::{Element, MlpConfig, MoeConfig, MoeError, MoePlan, Result};
use portable::Portable;
use rayon::prelude::*;

/// Which kernels the backend runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Kernels {
    /// The best instruction set of this machine ([`Isa::detect`]).
    #[default]
    Auto,
    /// The portable scalar first version (the reference).
    Portable,
    /// The blocked kernels for this instruction set; the portable path if the CPU lacks it.
    Isa(Isa),
}

/// How the backend uses threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Threads {
    /// Everything on the calling thread (no rayon call, no allocation).
    #[default]
    Single,
    /// Work items spread over the current rayon pool (`ThreadPool::install` chooses it).
    Rayon,
}

/// The CPU backend.
#[derive(Clone, Copy, Debug)]
pub struct Cpu {
    /// Reject a non-finite value in the layer input `x` with [`MoeError::NonFiniteInput`]
    /// (default true; costs one pass over `x`).
    pub check_finite_input: bool,
    /// The kernels (default [`Kernels::Auto`]).
    pub kernels: Kernels,
    /// The threading (default [`Threads::Single`]).
    pub threads: Threads,
    /// Kernel choices for this CPU model (default [`Tuning::detect`]).
    pub tuning: Tuning,
}

impl Default for Cpu {
    fn default() -> Self {
        Cpu {
            check_finite_input: true,
            kernels: Kernels::Auto,
            threads: Threads::Single,
            tuning: Tuning::detect(),
        }
    }
}

impl Cpu {
    /// The backend with default options: the best kernels, on the calling thread.
    pub fn new() -> Self {
        Self::default()
    }

    /// The best kernels, with work spread over the current rayon pool (the global pool, or the
    /// pool whose `install` the forward runs in).
    pub fn parallel() -> Self {
        Cpu { threads: Threads::Rayon, ..Self::default() }
    }

    /// The portable scalar path, on the calling thread.
    pub fn portable() -> Self {
        Cpu { kernels: Kernels::Portable, ..Self::default() }
    }

    /// The same backend with kernels `k`.
    pub fn with_kernels(self, k: Kernels) -> Self {
        Cpu { kernels: k, ..self }
    }

    /// The same backend with threading `t`.
    pub fn with_threads(self, t: Threads) -> Self {
        Cpu { threads: t, ..self }
    }

    /// The same backend with kernel tuning `t`.
    pub fn with_tuning(self, t: Tuning) -> Self {
        Cpu { tuning: t, ..self }
    }

    /// Make the forwards of `plan` allocate nothing, not even the first: grow the process-wide
    /// buffer in which the expert GEMMs pack an expert's rows once for all its work items (see
    /// [`Cpu`]) to the most those forwards can use (at most 64 MiB). Without this call the
    /// first forward that packs rows ahead allocates the buffer (once; later forwards reuse
    /// it). Returns whether the buffer now has that size (false: the allocation failed or
    /// another thread's forward holds the buffer; forwards then pack rows per work item where
    /// it is short, with the same results). With several threads and
    /// [`Tuning::overlap_rows`], also the few-rows items' buffer (8 MiB; false if that failed).
    pub fn prepare(&self, plan: &MoePlan) -> bool {
        if self.isa().is_none() {
            return true;
        }
        let c = plan.config();
        let rows = plan.rows_capacity(plan.max_tokens()).max(plan.max_tokens());
        let k = [c.hidden, c.expert_width(), c.local_intermediate(), c.shared_local_intermediate()]
            .into_iter()
            .max()
            .unwrap_or(0);
        // Each row block of an expert adds at most 31 rows of padding and 15 floats.
        let blocks = rows.div_ceil(MB) + c.local_experts();
        let want = rows
            .saturating_add(blocks.saturating_mul(31))
            .saturating_mul(k)
            .saturating_add(blocks.saturating_mul(16))
            .min(PACK_CAP);
        let packed = grow_row_buffer(want);
        // The few-rows items' buffer (several threads): at most one few-rows row block per
        // expert, in column blocks of NB.
        let streamed = !matches!(self.threads, Threads::Rayon)
            || self.tuning.overlap_rows == 0
            || STREAM.try_lock().ok().is_some_and(|mut st| {
                let items = c.local_experts().saturating_mul(k.div_ceil(NB));
                let more = items.saturating_sub(st.items.len());
                let ok = st.items.try_reserve(more).is_ok() && st.left.try_reserve(more).is_ok();
                if ok && st.left.len() < items {
                    st.left.resize_with(items, || AtomicUsize::new(0));
                }
                ok && grow(&mut st.tiles, STREAM_CAP)
            });
        packed && streamed
    }

    /// The instruction set the blocked kernels use, or `None` for the portable path.
    pub fn isa(&self) -> Option<Isa> {
        match self.kernels {
            Kernels::Auto => Some(Isa::detect()),
            Kernels::Portable => None,
            Kernels::Isa(i) => i.available().then_some(i),
        }
    }
}

const NAME: &str = "cpu";

fn need<U>(what: &'static str, v: &[U], expected: usize) -> Result<()> {
    if v.len() < expected {
        Err(MoeError::ShapeMismatch { what, expected, got: v.len() })
    } else {
        Ok(())
    }
}

fn need_opt<U>(what: &'static str, v: Option<&[U]>, expected: usize) -> Result<()> {
    v.map_or(Ok(()), |v| need(what, v, expected))
}

/// `sum_i a[i] b[i]` in f32 with eight independent accumulators (a fixed order).
#[inline]
fn dot<T: Element>(a: &[T], b: &[T]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 8];
    let chunks = n / 8;
    for c in 0..chunks {
        let (x, y) = (&a[c * 8..c * 8 + 8], &b[c * 8..c * 8 + 8]);
        for l in 0..8 {
            acc[l] += x[l].to_f32() * y[l].to_f32();
        }
    }
    for i in chunks * 8..n {
        acc[i % 8] += a[i].to_f32() * b[i].to_f32();
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

impl Backend for Cpu {
    const NAME: &'static str = NAME;
    type View<'a, U: Pod>
        = &'a [U]
    where
        U: 'a;
    type ViewMut<'a, U: Pod>
        = &'a mut [U]
    where
        U: 'a;

    fn view_len<U: Pod>(v: &&[U]) -> usize {
        v.len()
    }
    fn view_mut_len<U: Pod>(v: &&mut [U]) -> usize {
        v.len()
    }
    fn as_view<'b, 'c: 'b, U: Pod>(v: &'b &'c mut [U]) -> &'b [U] {
        v
    }
    fn narrow<'b, 'c: 'b, U: Pod>(v: &'c [U]) -> &'b [U] {
        v
    }
    fn reborrow<'b, 'c: 'b, U: Pod>(v: &'b mut &'c mut [U]) -> &'b mut [U] {
        v
    }
    fn split_at<'a, U: Pod>(
        v: Self::ViewMut<'a, U>,
        mid: usize,
    ) -> (Self::ViewMut<'a, U>, Self::ViewMut<'a, U>) {
        v.split_at_mut(mid.min(v.len()))
    }
    fn misalignment(v: &&mut [u8], align: usize) -> usize {
        v.as_ptr().align_offset(align)
    }
    fn cast_bytes<'a, U: Pod>(v: Self::ViewMut<'a, u8>) -> Result<Self::ViewMut<'a, U>> {
        bytemuck::try_cast_slice_mut(v).map_err(|_| MoeError::InvalidParameter {
            what: "workspace region",
            value: 0.0,
            rule: "aligned to its element type",
        })
    }
}

impl HostSlices for Cpu {
    fn host_mut<'b, 'c: 'b, U: Pod>(v: &'b mut &'c mut [U]) -> &'b mut [U] {
        v
    }
    fn from_host<U: Pod>(s: &[U]) -> &[U] {
        s
    }
    fn from_host_mut<U: Pod>(s: &mut [U]) -> &mut [U] {
        s
    }
}

/// The row range of local expert `e` (validated against the rows buffer).
fn expert_range(offsets: &[i32], e: usize, rows: usize) -> Result<core::ops::Range<usize>> {
    let (a, b) = (offsets[e], offsets[e + 1]);
    if a < 0 || b < a || b as usize > rows {
        return Err(MoeError::InvalidParameter {
            what: "expert_offsets",
            value: b as f64,
            rule: "non-decreasing and within the rows buffer",
        });
    }
    Ok(a as usize..b as usize)
}

impl Cpu {
    /// Shared body of the expert and dense up-projections: for `n` row blocks (experts), each
    /// row's pre-activations from weight block `e` and the activation.
    #[allow(clippy::too_many_arguments)]
    fn up_rows<T: Element>(
        mlp: &MlpConfig,
        width: usize,
        inter: usize,
        e: usize,
        x_row: &[T],
        in_scale: f32,
        w: &MlpWeights<'_, Self, T>,
        out: &mut [T],
    ) {
        let base = e * inter * width;
        for i in 0..inter {
            let wr = base + i * width..base + (i + 1) * width;
            let up = in_scale * dot(x_row, &w.up[wr.clone()])
                + w.up_bias.map_or(0.0, |b| b[e * inter + i].to_f32());
            let gate = match w.gate {
                Some(g) => {
                    in_scale * dot(x_row, &g[wr])
                        + w.gate_bias.map_or(0.0, |b| b[e * inter + i].to_f32())
                }
                None => 0.0,
            };
            out[i] = T::from_f32(math::mlp_hidden(mlp, gate, up));
        }
    }

    fn check_mlp<T: Element>(
        w: &MlpWeights<'_, Self, T>,
        gated: bool,
        n: usize,
        inter: usize,
        width: usize,
    ) -> Result<()> {
        need("mlp.up", w.up, n * inter * width)?;
        if gated {
            need(
                "mlp.gate",
                w.gate.ok_or(MoeError::TensorPresence { what: "mlp.gate", required: true })?,
                n * inter * width,
            )?;
        }
        need_opt("mlp.gate_bias", w.gate_bias, n * inter)?;
        need_opt("mlp.up_bias", w.up_bias, n * inter)
    }
}

/// An output buffer written by several work items at disjoint places.
struct Shared<U>(*mut U, usize);

// SAFETY: work items write disjoint element ranges (see `Shared::slice`), and `U: Send`.
unsafe impl<U: Send> Send for Shared<U> {}
// SAFETY: as above.
unsafe impl<U: Send> Sync for Shared<U> {}

impl<U> Shared<U> {
    fn new(s: &mut [U]) -> Self {
        Shared(s.as_mut_ptr(), s.len())
    }

    /// The base pointer (a method, so that closures capture the whole `Shared`).
    fn ptr(&self) -> *mut U {
        self.0
    }

    /// Its length in elements.
    fn len(&self) -> usize {
        self.1
    }

    /// `len` elements from `at`.
    ///
    /// # Safety
    /// No other live reference may overlap `at..at + len` (each work item owns its tile).
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self, at: usize, len: usize) -> &mut [U] {
        assert!(at + len <= self.1, "validated before the work items start");
        // SAFETY: in bounds (checked above); exclusive by the caller's contract.
        unsafe { core::slice::from_raw_parts_mut(self.0.add(at), len) }
    }
}

/// A grouped `C = A · Bᵀ`: group `g` (an expert) owns the output rows `rows(g)` and the weight
/// block `g` of each present `b` (`[groups, n, k]`); output row `r` reads A row `a_row(r)`
/// (skipped when `None`). `epi(g, r, n0, main, gate)` receives the f32 results of row `r`,
/// columns `n0..n0 + main.len()`, of `b[0]` (and `b[1]`); it may write with non-temporal
/// stores ([`act::streams`]): each work item's epilogue is followed by [`act::fence`] on its
/// thread, before the item counts as done.
struct Grouped<'a, T> {
    a: &'a [T],
    k: usize,
    b: [Option<&'a [T]>; 2],
    n: usize,
    groups: usize,
}

/// Floats of the process-wide buffer of rows packed ahead of the work items
/// ([`gemm::RowPack`]): 64 MiB. A GEMM whose packed rows need more runs in batches of experts
/// that fit (an expert that alone needs more packs its rows in each work item, as without the
/// buffer).
const PACK_CAP: usize = 16 << 20;

/// At most this many groups (experts) per GEMM pack their rows ahead (the offsets live on the
/// stack); a GEMM with more packs its rows in each work item.
const PACK_GROUPS: usize = 1024;

/// The buffer of rows packed ahead, shared by the forwards of the process: allocated by the
/// first GEMM that packs rows ahead, grown up to [`PACK_CAP`] floats, then reused (no
/// allocation in a steady state). A forward that finds it in use (another thread's forward)
/// packs its rows in each work item instead.
static ROW_PACK: std::sync::Mutex<Vec<gemm::Aligned<16>>> = std::sync::Mutex::new(Vec::new());

/// Grow the row buffer to `floats` (at most [`PACK_CAP`]); whether it has them.
fn grow(buf: &mut Vec<gemm::Aligned<16>>, floats: usize) -> bool {
    let want = floats.min(PACK_CAP).div_ceil(16);
    let have = buf.len();
    if have < want && buf.try_reserve_exact(want - have).is_ok() {
        buf.resize_with(want, || gemm::Aligned([0.0; 16]));
    }
    buf.len() >= want
}

/// [`grow`] the process-wide row buffer, unless another thread's forward holds it.
fn grow_row_buffer(floats: usize) -> bool {
    ROW_PACK.try_lock().ok().is_some_and(|mut b| grow(&mut b, floats))
}

/// The few-rows items of a GEMM batch whose work the compute-bound items take on (see
/// [`Tuning::overlap_rows`]): their (group, row block, column block), the steps each has left,
/// and their result tiles (at most [`STREAM_CAP`] floats). Shared by the forwards of the
/// process, grown once and reused (no allocation in a steady state); a forward that finds it in
/// use runs its few-rows items as items.
struct Stream {
    items: Vec<[usize; 3]>,
    left: Vec<AtomicUsize>,
    tiles: Vec<gemm::Aligned<16>>,
}

static STREAM: std::sync::Mutex<Stream> =
    std::sync::Mutex::new(Stream { items: Vec::new(), left: Vec::new(), tiles: Vec::new() });

/// Floats of [`Stream`]'s result tiles (8 MiB; 2 × 7 × [`NB`] floats per item of 7 rows): a
/// batch's few-rows items past them run as items.
const STREAM_CAP: usize = 2 << 20;
/// Steps per few-rows item: one per B and group of [`gemm::NR`] columns (those past the item's
/// columns or of an absent B do nothing).
const STREAM_STEPS: usize = 2 * NB.div_ceil(gemm::NR);

/// A compute-bound item's share of the few-rows items' steps ([`gemm::Assist`]): it claims one
/// step at a time, has its weight lines fetched into L2 during the item's microkernel calls,
/// and runs it between two chunks once they were all fetched (one chunk later, so that the
/// last of them have arrived).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
struct Helper<'h> {
    next: &'h AtomicUsize,
    total: usize,
    span: &'h (dyn Fn(usize) -> Option<(*const u8, usize)> + Sync),
    run: &'h (dyn Fn(usize) + Sync),
    /// The claimed step: (index, first byte, lines, lines fetched).
    cur: Option<(usize, *const u8, usize, usize)>,
    ready: bool,
    done: bool,
}

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
impl Helper<'_> {
    fn claim(&mut self) {
        while !self.done {
            let s = self.next.fetch_add(1, Ordering::Relaxed);
            if s >= self.total {
                self.done = true;
            } else if let Some((p, n)) = (self.span)(s) {
                self.cur = Some((s, p, n, 0));
                self.ready = false;
                return;
            }
        }
    }

    /// Run the claimed step, if any (at the end of the helping item).
    fn finish(&mut self) {
        if let Some((s, ..)) = self.cur.take() {
            (self.run)(s);
        }
    }
}

impl gemm::Assist for Helper<'_> {
    fn lines(&mut self, max: usize) -> (*const u8, usize) {
        if self.cur.is_none() {
            self.claim();
        }
        match &mut self.cur {
            Some((_, p, n, f)) => {
                let c = max.min(*n - *f);
                let at = p.wrapping_add(*f * 64);
                *f += c;
                (at, c)
            }
            None => (core::ptr::null(), 0),
        }
    }

    fn between(&mut self) {
        if let Some((s, _, n, f)) = self.cur
            && f == n
        {
            if self.ready {
                self.cur = None;
                (self.run)(s);
            } else {
                self.ready = true;
            }
        }
    }
}

impl<T: Element> Grouped<'_, T> {
    fn run<R, M, E>(&self, isa: Isa, tuning: Tuning, threads: Threads, rows: R, a_row: M, epi: E)
    where
        R: Fn(usize) -> core::ops::Range<usize> + Sync,
        M: Fn(usize) -> Option<usize> + Sync,
        E: Fn(usize, usize, usize, &[f32], Option<&[f32]>) + Sync,
    {
        let (k, n) = (self.k, self.n);
        let ncb = n.div_ceil(NB);
        // Row block rb of group g. Equal row blocks (280 rows: 140 + 140, not 256 + 24): a
        // small remainder block would stream the expert's weights again through a few-rows
        // kernel.
        let blocks = |g: usize| rows(g).len().div_ceil(MB);
        let block = |g: usize, rb: usize| {
            let r = rows(g);
            let blk_rows = r.len().div_ceil(r.len().div_ceil(MB));
            let r0 = r.start + rb * blk_rows;
            r0..(r0 + blk_rows).min(r.end)
        };
        // The rows of a row block that exist: their A rows and output rows, and their count.
        let gather = |g: usize, rb: usize, a_rows: &mut [usize; MB], o_rows: &mut [usize; MB]| {
            let mut m = 0;
            for row in block(g, rb) {
                if let Some(ar) = a_row(row) {
                    a_rows[m] = ar;
                    o_rows[m] = row;
                    m += 1;
                }
            }
            m
        };
        // Floats of the row buffer reserved for a row block: room for its rows packed ahead of
        // its work items if its kernel takes them (decided again on the rows that exist).
        let reserve = |g: usize, rb: usize| {
            let len = block(g, rb).len();
            gemm::row_pack(isa, tuning, T::DTYPE, len, k)
                .map_or(0, |_| gemm::RowPack::F32(false, 0).len(len, k).next_multiple_of(16))
        };
        let reserved = |g: usize| (0..blocks(g)).map(|rb| reserve(g, rb)).sum::<usize>();
        // One job per 16-row group of each row block with a reservation.
        let groups16 = |g: usize, rb: usize| {
            if reserve(g, rb) > 0 { block(g, rb).len().div_ceil(16) } else { 0 }
        };
        // Prefix sums over the groups: reserved floats and packing jobs before group g.
        let (mut res_at, mut job_at) = ([0usize; PACK_GROUPS + 1], [0usize; PACK_GROUPS + 1]);
        let mut total = 0;
        if self.groups <= PACK_GROUPS {
            for g in 0..self.groups {
                res_at[g + 1] = res_at[g] + reserved(g);
                job_at[g + 1] = job_at[g] + (0..blocks(g)).map(|rb| groups16(g, rb)).sum::<usize>();
            }
            total = res_at[self.groups];
        }
        let mut guard = if total > 0 { ROW_PACK.try_lock().ok() } else { None };
        if let Some(buf) = guard.as_mut() {
            grow(buf, total);
        }
        let buf = guard.as_mut().map_or(Shared(core::ptr::null_mut(), 0), |b| {
            Shared(b.as_mut_ptr() as *mut f32, b.len() * 16)
        });
        // The few-rows items' steps go to the compute-bound items (see `Tuning::overlap_rows`).
        let mut stream = if matches!(threads, Threads::Rayon) && tuning.overlap_rows > 0 {
            STREAM.try_lock().ok()
        } else {
            None
        };
        let mut g0 = 0;
        while g0 < self.groups {
            // A batch of groups g0..g1 whose reservations fit the buffer (all of them when
            // they fit, or when nothing is packed ahead).
            let (g1, ahead) = if buf.len() == 0 {
                (self.groups, false)
            } else {
                // Here total > 0, so groups <= PACK_GROUPS.
                let mut g1 = g0 + 1;
                while g1 < self.groups && res_at[g1 + 1] - res_at[g0] <= buf.len() {
                    g1 += 1;
                }
                let sum = res_at[g1] - res_at[g0];
                (g1, sum > 0 && sum <= buf.len())
            };
            // Where the rows of row block rb of group g are packed in this batch.
            let at = |g: usize, rb: usize| {
                res_at[g] - res_at[g0] + (0..rb).map(|b| reserve(g, b)).sum::<usize>()
            };
            if ahead {
                let jobs = job_at[g1] - job_at[g0];
                let job = |j: usize| {
                    let j = j + job_at[g0];
                    // The group of job j: the last g with job_at[g] <= j.
                    let g = job_at[g0..g1].partition_point(|&s| s <= j) - 1 + g0;
                    let mut rem = j - job_at[g];
                    for rb in 0..blocks(g) {
                        let c = groups16(g, rb);
                        if rem >= c {
                            rem -= c;
                            continue;
                        }
                        let (mut a_rows, mut o_rows) = ([0usize; MB], [0usize; MB]);
                        let m = gather(g, rb, &mut a_rows, &mut o_rows);
                        if let Some(p) = gemm::row_pack(isa, tuning, T::DTYPE, m, k)
                            && rem < m.div_ceil(16)
                        {
                            let off = at(g, rb);
                            assert!(
                                off + p.len(m, k) <= buf.len(),
                                "inside the batch's reservation"
                            );
                            #[cfg(target_arch = "x86_64")]
                            // SAFETY: `row_pack` chose a layout of this available instruction
                            // set's kernels; the destination lies in the buffer (asserted), is
                            // 64-byte aligned (reservations are multiples of 16 floats), and
                            // no other job writes group `rem` of this block; the rows lie in
                            // `a` (checked by the caller).
                            unsafe {
                                gemm::pack_rows(
                                    isa,
                                    p,
                                    self.a,
                                    &a_rows[..m],
                                    k,
                                    rem..rem + 1,
                                    buf.ptr().add(off),
                                )
                            };
                        }
                        return;
                    }
                };
                match threads {
                    Threads::Single => (0..jobs).for_each(job),
                    Threads::Rayon => (0..jobs).into_par_iter().with_max_len(1).for_each(job),
                }
            }
            // This batch's few-rows items, when there are compute-bound items to take them on.
            // Its few-rows items of groups below `end_g` run as steps (`run_step`), their tiles
            // `tile` floats apart (2 × `rows` × NB: the most rows of any of them).
            let (mut streamed, mut end_g, mut rows_max) = (0usize, g0, 0usize);
            if let Some(st) = stream.as_mut() {
                st.items.clear();
                let mut helped = false;
                let (mut a_rows, mut o_rows) = ([0usize; MB], [0usize; MB]);
                // The groups' few-rows items in order, while their tiles fit STREAM_CAP.
                for g in g0..g1 {
                    let (len, mut most) = (st.items.len(), rows_max);
                    for rb in 0..blocks(g) {
                        let m = gather(g, rb, &mut a_rows, &mut o_rows);
                        if gemm::direct_item(isa, tuning, T::DTYPE, m, k) {
                            st.items.extend((0..ncb).map(|cb| [g, rb, cb]));
                            most = most.max(m);
                        } else if m >= tuning.overlap_rows {
                            helped = true;
                        }
                    }
                    if st.items.len() * 2 * most * NB > STREAM_CAP {
                        st.items.truncate(len);
                        break;
                    }
                    (end_g, rows_max) = (g + 1, most);
                }
                let count = st.items.len();
                if st.left.len() < count {
                    st.left.resize_with(count, || AtomicUsize::new(0));
                }
                let floats = count * 2 * rows_max * NB;
                if helped
                    && count > 0
                    && grow(&mut st.tiles, floats)
                    && st.tiles.len() * 16 >= floats
                {
                    let bs = self.b.iter().filter(|b| b.is_some()).count();
                    for (i, it) in st.items.iter().enumerate() {
                        let nb = NB.min(n - it[2] * NB);
                        st.left[i].store(bs * nb.div_ceil(gemm::NR), Ordering::Relaxed);
                    }
                    streamed = count;
                }
            }
            if streamed == 0 {
                end_g = g0;
            }
            let tile = 2 * rows_max * NB;
            let next = AtomicUsize::new(0);
            let total = streamed * STREAM_STEPS;
            let (st_items, st_left, st_tiles) = match stream.as_mut() {
                Some(st) if streamed > 0 => {
                    let Stream { items, left, tiles } = &mut **st;
                    (
                        &items[..streamed],
                        &left[..streamed],
                        Shared(tiles.as_mut_ptr() as *mut f32, tiles.len() * 16),
                    )
                }
                _ => (&[][..], &[][..], Shared(core::ptr::null_mut(), 0)),
            };
            let cols = NB.div_ceil(gemm::NR);
            // Step s: few-rows item s / STREAM_STEPS, B bi, columns j..j + NR (none past its
            // columns or for an absent B).
            let step_of = |s: usize| {
                let (it, r) = (s / STREAM_STEPS, s % STREAM_STEPS);
                let (bi, j) = (r / cols, (r % cols) * gemm::NR);
                let nb = NB.min(n - st_items[it][2] * NB);
                (self.b[bi].is_some() && j < nb).then_some((it, bi, j))
            };
            // The step's weight rows (contiguous: NR rows of k) as 64-byte lines.
            let span = |s: usize| {
                let (it, bi, j) = step_of(s)?;
                let [g, _, cb] = st_items[it];
                let nr = gemm::NR.min(NB.min(n - cb * NB) - j);
                let b = self.b[bi]?;
                let at = g * n * k + (cb * NB + j) * k;
                let w = &b[at..at + nr * k];
                Some((w.as_ptr() as *const u8, core::mem::size_of_val(w).div_ceil(64)))
            };
            let run_step = |s: usize| {
                let Some((it, bi, j)) = step_of(s) else { return };
                #[cfg(all(test, target_arch = "x86_64"))]
                tests::STEPS.fetch_add(1, Ordering::Relaxed);
                #[cfg(feature = "trace")]
                let t0 = trace::now();
                let [g, rb, cb] = st_items[it];
                let (n0, nb) = (cb * NB, NB.min(n - cb * NB));
                let (mut a_rows, mut o_rows) = ([0usize; MB], [0usize; MB]);
                let m = gather(g, rb, &mut a_rows, &mut o_rows);
                let per = n * k;
                let b0 = self.b[0].map(|b| &b[g * per..(g + 1) * per]);
                let b1 = self.b[1].map(|b| &b[g * per..(g + 1) * per]);
                let blk =
                    Block { a: self.a, a_rows: &a_rows[..m], k, b: [b0, b1], n0, nb, packed: None };
                assert!(m <= rows_max && (it + 1) * tile <= st_tiles.len(), "inside the tiles");
                let base = st_tiles.ptr().wrapping_add(it * tile);
                let out = [base, base.wrapping_add(rows_max * NB)];
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `direct_item` held for this item (so an available AVX-512 instruction
                // set); its two tiles hold rows_max >= m rows of NB floats (asserted above);
                // this step alone writes columns j..j + NR of tile bi; the rows and weights
                // were checked by the caller.
                unsafe {
                    gemm::run_direct_cols(&blk, out, bi, j)
                };
                #[cfg(not(target_arch = "x86_64"))]
                let _ = (&blk, bi, j);
                #[cfg(feature = "trace")]
                trace::record(trace::Kind::Step, g, m, gemm::NR.min(nb - j), k, t0);
                // The item's last step runs its epilogue (AcqRel: after every other step's
                // writes).
                if st_left[it].fetch_sub(1, Ordering::AcqRel) == 1 {
                    for (i, &row) in o_rows[..m].iter().enumerate() {
                        // SAFETY: row i < m of the item's tiles, all its columns written by its
                        // steps, which have all finished.
                        let main = unsafe { core::slice::from_raw_parts(out[0].add(i * NB), nb) };
                        // SAFETY: as above, for the gate B when present.
                        let gate = self.b[1].map(|_| unsafe {
                            core::slice::from_raw_parts(out[1].add(i * NB) as *const f32, nb)
                        });
                        epi(g, row, n0, main, gate);
                    }
                    act::fence();
                }
            };
            let items_of = |g: usize| blocks(g) * ncb;
            let item = |it: usize| {
                let (mut g, mut rem) = (g0, it);
                while g < g1 {
                    let c = items_of(g);
                    if rem < c {
                        break;
                    }
                    rem -= c;
                    g += 1;
                }
                if g >= g1 {
                    return;
                }
                let (rb, cb) = (rem / ncb, rem % ncb);
                let (n0, nb) = (cb * NB, NB.min(n - cb * NB));
                let (mut a_rows, mut o_rows) = ([0usize; MB], [0usize; MB]);
                let m = gather(g, rb, &mut a_rows, &mut o_rows);
                if m == 0 || (g < end_g && gemm::direct_item(isa, tuning, T::DTYPE, m, k)) {
                    // Nothing, or run as steps (`run_step`).
                    return;
                }
                let per = n * k;
                let b0 = self.b[0].map(|b| &b[g * per..(g + 1) * per]);
                let b1 = self.b[1].map(|b| &b[g * per..(g + 1) * per]);
                let packed = if ahead && reserve(g, rb) > 0 {
                    gemm::row_pack(isa, tuning, T::DTYPE, m, k).map(|p| {
                        let (off, len) = (at(g, rb), p.len(m, k));
                        assert!(off + len <= buf.len(), "inside the batch's reservation");
                        // SAFETY: inside the buffer (asserted); written by the jobs above,
                        // which have all finished; only read from now on.
                        (p, unsafe {
                            core::slice::from_raw_parts(buf.ptr().add(off) as *const f32, len)
                        })
                    })
                } else {
                    None
                };
                let blk = Block { a: self.a, a_rows: &a_rows[..m], k, b: [b0, b1], n0, nb, packed };
                // Not zeroed: the kernels write every element the epilogue reads.
                let mut tiles = MaybeUninit::<Tiles>::uninit();
                let base = tiles.as_mut_ptr() as *mut f32;
                let out = [base, base.wrapping_add(MB * NB)];
                #[cfg(feature = "trace")]
                let t0 = trace::now();
                if total > 0 && m >= tuning.overlap_rows {
                    let mut h = Helper {
                        next: &next,
                        total,
                        span: &span,
                        run: &run_step,
                        cur: None,
                        ready: false,
                        done: false,
                    };
                    // SAFETY: as below.
                    unsafe { gemm::run_block_with(isa, tuning, &blk, out, Some(&mut h)) };
                    h.finish();
                } else {
                    // SAFETY: each tile holds MB >= m rows of NB floats; `isa` is available
                    // (from `Cpu::isa`) and the row and weight bounds were checked by the
                    // caller.
                    unsafe { gemm::run_block(isa, tuning, &blk, out) };
                }
                #[cfg(feature = "trace")]
                let t0 = {
                    let bs = self.b.iter().flatten().count();
                    trace::record(trace::Kind::Item, g, m, nb * bs, k, t0);
                    trace::now()
                };
                for (i, &row) in o_rows[..m].iter().enumerate() {
                    // SAFETY: row i < m, columns < nb of the tiles of the present B's were
                    // written by `run_block`.
                    let main = unsafe { core::slice::from_raw_parts(out[0].add(i * NB), nb) };
                    // SAFETY: as above, for the gate B when present.
                    let gate = self.b[1]
                        .map(|_| unsafe { core::slice::from_raw_parts(out[1].add(i * NB), nb) });
                    epi(g, row, n0, main, gate);
                }
                act::fence();
                #[cfg(feature = "trace")]
                trace::record(trace::Kind::Epilogue, g, m, 0, k, t0);
            };
            let items: usize = (g0..g1).map(items_of).sum();
            match threads {
                Threads::Single => (0..items).for_each(item),
                // One item per rayon job (`with_max_len(1)`): left to its adaptive splitter,
                // rayon stops splitting a thread's own range after a few halvings and runs the
                // rest as one sequential leaf that no idle thread can steal from. Items differ
                // in cost (row blocks of different experts, a slower core on a shared host), so
                // the other thread idled at the end of long stages: DeepSeek-V3 f32 T=1024,
                // expert_up on 2 threads, one thread busy 100 % and the other 72-76 % of the
                // stage (timestamps around each item). With one item per job: both 99.8 %, and
                // the expert GEMMs 4398 -> 3795 ms f32, 3704 -> 2985 ms bf16 (interleaved, best
                // of 4).
                Threads::Rayon => (0..items).into_par_iter().with_max_len(1).for_each(item),
            }
            if total > 0 && next.load(Ordering::Relaxed) < total {
                // The steps no compute-bound item took: one job per thread, each taking the
                // next step until none is left.
                (0..rayon::current_num_threads()).into_par_iter().with_max_len(1).for_each(|_| {
                    loop {
                        let s = next.fetch_add(1, Ordering::Relaxed);
                        if s >= total {
                            break;
                        }
                        run_step(s);
                    }
                });
            }
            g0 = g1;
        }
    }
}

/// Check the expert row blocks and return, for each valid row, nothing: errors if a row the
/// GEMM writes or reads lies outside its buffer. `valid(row)` maps a row to its slot.
fn check_rows(
    offsets: &[i32],
    el: usize,
    sorted_slots: &[i32],
    mut valid: impl FnMut(usize, usize) -> Result<()>,
) -> Result<()> {
    need("expert_offsets", offsets, el + 1)?;
    for e in 0..el {
        for row in expert_range(offsets, e, sorted_slots.len())? {
            if let Ok(slot) = usize::try_from(sorted_slots[row]) {
                valid(row, slot)?;
            }
        }
    }
    Ok(())
}

/// Sizes of the per-token routing scratch held on the stack by each parallel routing task.
const ROUTE_STACK: usize = 4096;
/// Tokens per parallel routing task.
const ROUTE_CHUNK: usize = 16;
/// Columns per stack accumulator in the combine.
const COMBINE_CHUNK: usize = 512;

impl<T: Element> MoeStages<T> for Cpu {
    fn router_logits(
        &self,
        tokens: usize,
        hidden: usize,
        experts: usize,
        x: &[T],
        weight: &[T],
        bias: Option<&[T]>,
        logits: &mut [f32],
    ) -> Result<()> {
        let Some(isa) = self.isa() else {
            return Portable(self).router_logits(tokens, hidden, experts, x, weight, bias, logits);
        };
        need("x", x, tokens * hidden)?;
        need("router.weight", weight, experts * hidden)?;
        need_opt("router.bias", bias, experts)?;
        need("logits", logits, tokens * experts)?;
        let bad = |v: &T| !v.to_f32().is_finite();
        if let Some(i) =
            self.check_finite_input.then(|| x[..tokens * hidden].iter().position(bad)).flatten()
        {
            return Err(MoeError::NonFiniteInput { what: "x", index: i });
        }
        let out = Shared::new(&mut logits[..tokens * experts]);
        let g = Grouped { a: x, k: hidden, b: [Some(weight), None], n: experts, groups: 1 };
        g.run(
            isa,
            self.tuning,
            self.threads,
            |_| 0..tokens,
            Some,
            |_, t, n0, v, _| {
                // SAFETY: row t, columns n0..n0 + len belong to this work item only.
                let dst = unsafe { out.slice(t * experts + n0, v.len()) };
                for (j, (d, &v)) in dst.iter_mut().zip(v).enumerate() {
                    *d = v + bias.map_or(0.0, |b| b[n0 + j].to_f32());
                }
            },
        );
        Ok(())
    }

    fn route(
        &self,
        c: &MoeConfig,
        tokens: usize,
        logits: &[f32],
        selection_bias: Option<&[f32]>,
        scratch: &mut [f32],
        topk_ids: &mut [i32],
        topk_weights: &mut [f32],
    ) -> Result<()> {
        let (e, k) = (c.experts, c.top_k);
        let ng = c.router.groups.map_or(0, |g| g.n_group);
        let lane = 2 * e + ng + k;
        if self.threads == Threads::Single || lane > ROUTE_STACK || tokens < 2 * ROUTE_CHUNK {
            return Portable(self).route(
                c,
                tokens,
                logits,
                selection_bias,
                scratch,
                topk_ids,
                topk_weights,
            );
        }
        need("logits", logits, tokens * e)?;
        need_opt("router.selection_bias", selection_bias, e)?;
        need("route_scratch", scratch, lane)?;
        need("topk_ids", topk_ids, tokens * k)?;
        need("topk_weights", topk_weights, tokens * k)?;
        // Each task routes its tokens with its own stack scratch; a token's result depends on
        // its logits only, so the split does not change any bit.
        topk_ids[..tokens * k]
            .par_chunks_mut(ROUTE_CHUNK * k)
            .zip(topk_weights[..tokens * k].par_chunks_mut(ROUTE_CHUNK * k))
            .enumerate()
            .for_each(|(ci, (ids, ws))| {
                let mut buf = [0f32; ROUTE_STACK];
                let (scores, rest) = buf.split_at_mut(e);
                let (selection, rest) = rest.split_at_mut(e);
                let (groups, staging) = rest.split_at_mut(ng);
                for (j, (ids, ws)) in ids.chunks_mut(k).zip(ws.chunks_mut(k)).enumerate() {
                    let t = ci * ROUTE_CHUNK + j;
                    math::route_token(
                        c,
                        &logits[t * e..(t + 1) * e],
                        selection_bias,
                        RouteScratch {
                            scores: &mut *scores,
                            selection: &mut *selection,
                            groups: &mut *groups,
                            staging: &mut *staging,
                        },
                        ids,
                        ws,
                    );
                }
            });
        Ok(())
    }

    fn permute(
        &self,
        plan: &MoePlan,
        tokens: usize,
        topk_ids: &[i32],
        expert_map: Option<&[i32]>,
        out: PermuteBuffers<'_, Self>,
    ) -> Result<()> {
        // Already O(T K + E): one counting pass, a prefix sum, one scatter pass.
        Portable(self).permute(plan, tokens, topk_ids, expert_map, out)
    }

    fn expert_up(
        &self,
        plan: &MoePlan,
        tokens: usize,
        x: &[T],
        w: &MlpWeights<'_, Self, T>,
        rows: ExpertRows<'_, Self>,
        hidden: &mut [T],
    ) -> Result<()> {
        let Some(isa) = self.isa() else {
            return Portable(self).expert_up(plan, tokens, x, w, rows, hidden);
        };
        let c = plan.config();
        let mlp = &c.expert.mlp;
        let (d, inter, el, k) =
            (c.expert_width(), c.local_intermediate(), c.local_experts(), c.top_k);
        need("expert input", x, tokens * d)?;
        Self::check_mlp(w, mlp.gated, el, inter, d)?;
        need_opt("topk_weights", rows.weights, tokens * k)?;
        let (offsets, slots) = (rows.expert_offsets, rows.sorted_slots);
        let hl = hidden.len();
        check_rows(offsets, el, slots, |row, slot| {
            if slot / k < tokens && (row + 1) * inter > hl {
                return Err(MoeError::ShapeMismatch {
                    what: "hidden",
                    expected: (row + 1) * inter,
                    got: hl,
                });
            }
            Ok(())
        })?;
        // The rows written (those of the experts' row ranges; checked above), not the buffer,
        // which may be sized for more tokens.
        let used = usize::try_from(offsets[el]).unwrap_or(0) * inter * size_of::<T>();
        let stream = act::streams(isa, T::DTYPE, used);
        let out = Shared::new(hidden);
        let gate = if mlp.gated { w.gate } else { None };
        let g = Grouped { a: x, k: d, b: [Some(w.up), gate], n: inter, groups: el };
        let a_row =
            |row: usize| usize::try_from(slots[row]).ok().map(|s| s / k).filter(|&t| t < tokens);
        let range = |e: usize| offsets[e] as usize..offsets[e + 1] as usize;
        g.run(isa, self.tuning, self.threads, range, a_row, |e, row, n0, up, gate| {
            let s = rows.weights.map_or(1.0, |wt| wt[slots[row] as usize]);
            // SAFETY: row `row`, columns n0..n0 + len belong to this work item only.
            let dst = unsafe { out.slice(row * inter + n0, up.len()) };
            let (ub, gb) =
                (w.up_bias.map(|b| &b[e * inter..]), w.gate_bias.map(|b| &b[e * inter..]));
            act::up_row(isa, mlp, s, n0, up, gate, ub, gb, dst, stream);
        });
        Ok(())
    }

    fn expert_down(
        &self,
        plan: &MoePlan,
        tokens: usize,
        hidden: &[T],
        w: &MlpWeights<'_, Self, T>,
        rows: ExpertRows<'_, Self>,
        out: &mut [T],
    ) -> Result<()> {
        let Some(isa) = self.isa() else {
            return Portable(self).expert_down(plan, tokens, hidden, w, rows, out);
        };
        let c = plan.config();
        let (d, inter, el, k) =
            (c.expert_width(), c.local_intermediate(), c.local_experts(), c.top_k);
        need("experts.down", w.down, el * d * inter)?;
        need_opt("experts.down_bias", w.down_bias, el * d)?;
        need_opt("topk_weights", rows.weights, tokens * k)?;
        let (offsets, slots) = (rows.expert_offsets, rows.sorted_slots);
        let (hl, ol) = (hidden.len(), out.len());
        check_rows(offsets, el, slots, |row, slot| {
            if slot < tokens * k {
                need("hidden", hidden, (row + 1) * inter)?;
                if (row + 1) * d > ol {
                    return Err(MoeError::ShapeMismatch {
                        what: "expert_out",
                        expected: (row + 1) * d,
                        got: ol,
                    });
                }
            }
            let _ = hl;
            Ok(())
        })?;
        // The rows written (as in `expert_up`).
        let used = usize::try_from(offsets[el]).unwrap_or(0) * d * size_of::<T>();
        let stream = act::streams(isa, T::DTYPE, used);
        let dst_all = Shared::new(out);
        let g = Grouped { a: hidden, k: inter, b: [Some(w.down), None], n: d, groups: el };
        let a_row =
            |row: usize| usize::try_from(slots[row]).ok().filter(|&s| s < tokens * k).map(|_| row);
        let range = |e: usize| offsets[e] as usize..offsets[e + 1] as usize;
        g.run(isa, self.tuning, self.threads, range, a_row, |e, row, n0, v, _| {
            let s = rows.weights.map_or(1.0, |wt| wt[slots[row] as usize]);
            // SAFETY: row `row`, columns n0..n0 + len belong to this work item only.
            let dst = unsafe { dst_all.slice(row * d + n0, v.len()) };
            act::fill_row(dst, stream, |j| {
                let b = w.down_bias.map_or(0.0, |b| b[e * d + n0 + j].to_f32());
                T::from_f32(s * (v[j] + b))
            });
        });
        Ok(())
    }

    fn combine(
        &self,
        plan: &MoePlan,
        tokens: usize,
        width: usize,
        expert_out: &[T],
        slot_rows: &[i32],
        scale: f32,
        out: &mut [T],
    ) -> Result<()> {
        if self.isa().is_none() || width == 0 {
            return Portable(self).combine(plan, tokens, width, expert_out, slot_rows, scale, out);
        }
        let k = plan.config().top_k;
        need("slot_rows", slot_rows, tokens * k)?;
        need("out", out, tokens * width)?;
        for &r in &slot_rows[..tokens * k] {
            if r >= 0 {
                need("expert_out", expert_out, (r as usize + 1) * width)?;
            }
        }
        // Per element: 0 + the rows in slot order, then one scale and rounding (as the
        // portable path, so the same bits), vectorized along the width.
        let token = |(t, o): (usize, &mut [T])| {
            let rs = &slot_rows[t * k..(t + 1) * k];
            let mut c0 = 0;
            while c0 < width {
                let n = COMBINE_CHUNK.min(width - c0);
                let mut acc = [0f32; COMBINE_CHUNK];
                for &r in rs {
                    if r >= 0 {
                        let src = &expert_out[r as usize * width + c0..][..n];
                        for (a, s) in acc.iter_mut().zip(src) {
                            *a += s.to_f32();
                        }
                    }
                }
                for (d, &a) in o[c0..c0 + n].iter_mut().zip(&acc) {
                    *d = T::from_f32(scale * a);
                }
                c0 += n;
            }
        };
        let out = &mut out[..tokens * width];
        match self.threads {
            Threads::Single => out.chunks_mut(width).enumerate().for_each(token),
            Threads::Rayon => out.par_chunks_mut(width).enumerate().for_each(token),
        }
        Ok(())
    }

    fn mlp_up(
        &self,
        mlp: &MlpConfig,
        tokens: usize,
        in_dim: usize,
        inter: usize,
        x: &[T],
        w: &MlpWeights<'_, Self, T>,
        hidden: &mut [T],
    ) -> Result<()> {
        let Some(isa) = self.isa() else {
            return Portable(self).mlp_up(mlp, tokens, in_dim, inter, x, w, hidden);
        };
        need("x", x, tokens * in_dim)?;
        need("hidden", hidden, tokens * inter)?;
        Self::check_mlp(w, mlp.gated, 1, inter, in_dim)?;
        let out = Shared::new(&mut hidden[..tokens * inter]);
        let gate = if mlp.gated { w.gate } else { None };
        let g = Grouped { a: x, k: in_dim, b: [Some(w.up), gate], n: inter, groups: 1 };
        g.run(
            isa,
            self.tuning,
            self.threads,
            |_| 0..tokens,
            Some,
            |_, t, n0, up, gate| {
                // SAFETY: row t, columns n0..n0 + len belong to this work item only.
                let dst = unsafe { out.slice(t * inter + n0, up.len()) };
                act::up_row(isa, mlp, 1.0, n0, up, gate, w.up_bias, w.gate_bias, dst, false);
            },
        );
        Ok(())
    }

    fn linear(
        &self,
        tokens: usize,
        in_dim: usize,
        out_dim: usize,
        x: &[T],
        weight: &[T],
        bias: Option<&[T]>,
        row_scale: Option<&[f32]>,
        scale: f32,
        accumulate: bool,
        out: &mut [T],
    ) -> Result<()> {
        let Some(isa) = self.isa() else {
            return Portable(self).linear(
                tokens, in_dim, out_dim, x, weight, bias, row_scale, scale, accumulate, out,
            );
        };
        need("linear.x", x, tokens * in_dim)?;
        need("linear.weight", weight, out_dim * in_dim)?;
        need_opt("linear.bias", bias, out_dim)?;
        need_opt("linear.row_scale", row_scale, tokens)?;
        need("linear.out", out, tokens * out_dim)?;
        let dst_all = Shared::new(&mut out[..tokens * out_dim]);
        let g = Grouped { a: x, k: in_dim, b: [Some(weight), None], n: out_dim, groups: 1 };
        g.run(
            isa,
            self.tuning,
            self.threads,
            |_| 0..tokens,
            Some,
            |_, t, n0, v, _| {
                let s = scale * row_scale.map_or(1.0, |r| r[t]);
                // SAFETY: row t, columns n0..n0 + len belong to this work item only.
                let dst = unsafe { dst_all.slice(t * out_dim + n0, v.len()) };
                for (j, (d, &v)) in dst.iter_mut().zip(v).enumerate() {
                    let v = s * (v + bias.map_or(0.0, |b| b[n0 + j].to_f32()));
                    *d = T::from_f32(if accumulate { d.to_f32() + v } else { v });
                }
            },
        );
        Ok(())
    }

    fn sigmoid_gate(
        &self,
        tokens: usize,
        hidden: usize,
        x: &[T],
        weight: &[T],
        gate: &mut [f32],
    ) -> Result<()> {
        Portable(self).sigmoid_gate(tokens, hidden, x, weight, gate)
    }

    fn add_assign(&self, dst: &mut [T], src: &[T]) -> Result<()> {
        Portable(self).add_assign(dst, src)
    }
}

/// Internals exposed for the benches; not part of the API.
#[doc(hidden)]
pub mod __bench {
    use super::*;

    /// Seconds for `reps` runs of one work item of `m` rows by `n` columns over `k` (all data
    /// in cache after the first run): the microkernel throughput without memory traffic.
    pub fn block_seconds<T: Element>(
        isa: Isa,
        tuning: Tuning,
        m: usize,
        n: usize,
        k: usize,
        reps: usize,
    ) -> f64 {
        let m = m.min(MB);
        let n = n.min(NB);
        let a: Vec<T> = (0..m * k).map(|i| T::from_f32((i % 7) as f32 * 0.1)).collect();
        let b: Vec<T> = (0..n * k).map(|i| T::from_f32((i % 5) as f32 * 0.1)).collect();
        let rows: Vec<usize> = (0..m).collect();
        let blk =
            Block { a: &a, a_rows: &rows, k, b: [Some(&b), None], n0: 0, nb: n, packed: None };
        let mut tiles: Box<Tiles> = Box::new([[0.0; MB * NB]; 2]);
        let out = [tiles[0].as_mut_ptr(), tiles[1].as_mut_ptr()];
        let isa = if isa.available() { isa } else { Isa::Generic };
        // SAFETY: MB rows of NB floats per tile; `isa` is available; A and B hold every row.
        unsafe { gemm::run_block(isa, tuning, &blk, out) };
        let t0 = std::time::Instant::now();
        for _ in 0..reps {
            // SAFETY: as above.
            unsafe { gemm::run_block(isa, tuning, &blk, out) };
            std::hint::black_box(&mut tiles);
        }
        t0.elapsed().as_secs_f64()
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// A grouped GEMM's f32 results (all rows, all columns), with the row buffer free or held
    /// elsewhere (every item then packs its own rows).
    fn grouped(groups: usize, rows: usize, k: usize, n: usize, held: bool) -> Vec<u32> {
        let v = |i: usize| ((i * 7919) % 29) as f32 * 0.02 - 0.25;
        let a: Vec<f32> = (0..rows * k).map(v).collect();
        let b: Vec<f32> = (0..groups * n * k).map(|i| v(i + 3)).collect();
        let g = Grouped { a: &a, k, b: [Some(&b), None], n, groups };
        let per = rows.div_ceil(groups);
        let range = |e: usize| (e * per).min(rows)..((e + 1) * per).min(rows);
        let mut out = vec![f32::NAN; rows * n];
        let dst = Shared::new(&mut out);
        let _lock = held.then(|| ROW_PACK.lock().unwrap());
        let isa = if Isa::Avx512.available() { Isa::Avx512 } else { Isa::Generic };
        g.run(isa, Tuning::ALL_WB, Threads::Rayon, range, Some, |_, row, n0, v, _| {
            // SAFETY: each (row, column block) belongs to one work item.
            unsafe { dst.slice(row * n + n0, v.len()) }.copy_from_slice(v)
        });
        out.iter().map(|x| x.to_bits()).collect()
    }

    /// Few-rows steps run (by a compute-bound item or after them).
    pub(super) static STEPS: AtomicUsize = AtomicUsize::new(0);

    /// Few-rows items whose steps compute-bound items take on ([`Tuning::overlap_rows`]) give
    /// the bits they give as items (one thread, or no overlap), with and without a gate B,
    /// over a partial column block and a partial group of columns; a forward that finds the
    /// steps' buffer in use runs them as items.
    #[test]
    fn few_rows_items_taken_on_give_the_same_bits() {
        if !Isa::Avx512.available() {
            eprintln!("skipped: no AVX-512, no few-rows items to take on");
            return;
        }
        let sizes = [3usize, 40, 5, 7, 64, 2, 33, 1, 6];
        let at: Vec<usize> = sizes
            .iter()
            .scan(0, |s, &x| {
                *s += x;
                Some(*s - x)
            })
            .collect();
        let (groups, rows, k, n) = (sizes.len(), sizes.iter().sum::<usize>(), 300, 200);
        let v = |i: usize| ((i * 7919) % 29) as f32 * 0.02 - 0.25;
        let a: Vec<f32> = (0..rows * k).map(v).collect();
        let b0: Vec<f32> = (0..groups * n * k).map(|i| v(i + 3)).collect();
        let b1: Vec<f32> = (0..groups * n * k).map(|i| v(i + 7)).collect();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let run = |gate: bool, tuning: Tuning, threads: Threads, held: bool| {
            let g = Grouped { a: &a, k, b: [Some(&b0), gate.then_some(&b1[..])], n, groups };
            let mut out = vec![f32::NAN; 2 * rows * n];
            let dst = Shared::new(&mut out);
            let _lock = held.then(|| STREAM.lock().unwrap());
            let range = |e: usize| at[e]..at[e] + sizes[e];
            pool.install(|| {
                g.run(Isa::Avx512, tuning, threads, range, Some, |_, row, n0, m, gt| {
                    // SAFETY: each (row, column block) belongs to one work item.
                    unsafe { dst.slice(row * n + n0, m.len()) }.copy_from_slice(m);
                    if let Some(gt) = gt {
                        // SAFETY: as above, in the second half.
                        unsafe { dst.slice((rows + row) * n + n0, gt.len()) }.copy_from_slice(gt);
                    }
                })
            });
            out.iter().map(|x| x.to_bits()).collect::<Vec<u32>>()
        };
        let on = Tuning { overlap_rows: 24, ..Tuning::INTEL };
        let off = Tuning { overlap_rows: 0, ..on };
        for gate in [false, true] {
            let before = STEPS.load(Ordering::Relaxed);
            let taken = run(gate, on, Threads::Rayon, false);
            assert!(STEPS.load(Ordering::Relaxed) > before, "no step ran");
            let half = if gate { 2 * rows * n } else { rows * n };
            assert!(taken[..half].iter().all(|&x| f32::from_bits(x).is_finite()));
            assert!(taken == run(gate, off, Threads::Rayon, false), "gate {gate}: other bits");
            assert!(taken == run(gate, on, Threads::Single, false), "gate {gate}: one thread");
            assert!(taken == run(gate, on, Threads::Rayon, true), "gate {gate}: buffer held");
        }
    }

    /// Rows packed ahead in batches (a GEMM whose packed rows exceed the buffer's 64 MiB) and
    /// GEMMs with more groups than the offsets' table give the bits of per-item packing.
    #[test]
    fn batches_and_many_groups_give_the_same_bits() {
        if !Isa::Avx512.available() {
            eprintln!("skipped: no AVX-512, no kernel takes packed rows");
            return;
        }
        // 2200 rows x 8192 floats: 72 MiB of packed rows, more than PACK_CAP.
        let (rows, k) = (2200, 8192);
        assert!(rows * k > PACK_CAP);
        assert!(grouped(4, rows, k, 40, false) == grouped(4, rows, k, 40, true));
        let groups = PACK_GROUPS + 76;
        assert!(
            grouped(groups, 2 * groups, 48, 24, false) == grouped(groups, 2 * groups, 48, 24, true)
        );
        // Below the limits: packed ahead.
        assert!(grouped(8, 300, 200, 24, false) == grouped(8, 300, 200, 24, true));
    }
}
