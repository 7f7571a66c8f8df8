//! Multi-GPU collectives over NCCL (feature `nccl`): [`NcclCollective`], the
//! [`moe_core::Collective`] of the tensor-parallel reduce, and the grouped send / receive
//! all-to-all ([`NcclCollective::all_to_all`]) of the expert-parallel forward ([`crate::ep`]).
//!
//! * One communicator per rank, one rank per GPU, one thread or process per rank: rank 0 makes
//!   an [`NcclId`], sends its bytes ([`NcclId::to_bytes`]) to the other ranks, and every rank
//!   calls [`NcclCollective::new`] with it (the call blocks until all ranks have joined).
//! * Every operation is enqueued on the caller's stream (the backend's stream for
//!   `all_reduce_sum`) and never synchronizes with the host.
//! * libnccl is loaded at run time. cudarc panics when it is missing; [`nccl_available`] checks
//!   for the library and the symbols used here first, and every constructor returns
//!   [`MoeError::Unsupported`] instead of panicking.
//! * The communicator is the cudarc *result*-level handle (not `cudarc::nccl::safe::Comm`, whose
//!   operations want cudarc slices and whose `Drop` panics on an error): the views of this crate
//!   are raw device addresses.

use crate::view::{DevView, DevViewMut};
use crate::{CudaBackend, CudaElement};
use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::{result as nr, sys as ns};
use moe_core::{Collective, DType, MoeError, Result};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

const NAME: &str = "nccl";

/// The NCCL symbols this module calls; all must resolve before any is called.
const SYMBOLS: [&str; 10] = [
    "ncclGetVersion",
    "ncclGetUniqueId",
    "ncclCommInitRank",
    "ncclCommDestroy",
    "ncclCommAbort",
    "ncclAllReduce",
    "ncclSend",
    "ncclRecv",
    "ncclGroupStart",
    "ncclGroupEnd",
];

fn nccl_err(what: &'static str) -> impl Fn(nr::NcclError) -> MoeError {
    move |e| MoeError::Device { backend: NAME, what, code: e.0 as i64 }
}

fn cuda_err(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> MoeError {
    move |e| MoeError::Device { backend: NAME, what, code: e.0 as i64 }
}

fn missing() -> MoeError {
    MoeError::Unsupported { backend: NAME, what: nccl_unavailable_reason() }
}

/// Why [`nccl_available`] is false (for messages).
///
/// cudarc 0.19 opens `libnccl.so` or `libnccl.so.{13,12,11,10,9,1}`, but NCCL's runtime
/// packages (the `libnccl2` Debian package, the `nvidia-nccl-cu*` wheels) ship only
/// `libnccl.so.2`: with only that one, put a symlink named `libnccl.so` to it in a folder on
/// `LD_LIBRARY_PATH` (`scripts/gpu-run.sh multi_gpu` does).
pub fn nccl_unavailable_reason() -> &'static str {
    if nccl_available() {
        return "NCCL is available";
    }
    let mut dirs: Vec<std::path::PathBuf> = std::env::var_os("LD_LIBRARY_PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    for d in ["/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib"] {
        dirs.push(d.into());
    }
    if ns_present() {
        "libnccl lacks a function this crate calls (NCCL 2.x with send/recv needed)"
    } else if dirs.iter().any(|d| d.join("libnccl.so.2").exists()) {
        "libnccl.so.2 is installed but cudarc loads libnccl.so: add a symlink named libnccl.so \
         to it in a folder on LD_LIBRARY_PATH"
    } else {
        "no NCCL library (libnccl.so, as cudarc names it) on this machine"
    }
}

fn ns_present() -> bool {
    // SAFETY: only tries to open the library with libloading; no NCCL function is called.
    std::panic::catch_unwind(|| unsafe { ns::is_culib_present() }).unwrap_or(false)
}

/// Whether libnccl can be loaded and exports every function this module calls. cudarc (built
/// with dynamic loading) panics at the first call into a missing library or symbol; check this
/// first. Never panics.
pub fn nccl_available() -> bool {
    std::panic::catch_unwind(|| {
        // SAFETY: `is_culib_present` only tries to open the library with libloading; `culib`
        // is called only once that succeeded (it opens the same library, so it does not
        // panic), and `get` only looks symbols up: no NCCL function is called.
        unsafe {
            ns::is_culib_present()
                && SYMBOLS.iter().all(|s| ns::culib().get::<*const ()>(s.as_bytes()).is_ok())
        }
    })
    .unwrap_or(false)
}

/// The loaded NCCL's version code (e.g. 22703 for 2.27.3), or why there is none.
pub fn nccl_version() -> Result<i32> {
    if !nccl_available() {
        return Err(missing());
    }
    nr::get_nccl_version().map_err(nccl_err("ncclGetVersion"))
}

/// Element types NCCL moves and sums here (sealed).
pub trait NcclElement: bytemuck::Pod + sealed::Sealed {
    /// The NCCL data type.
    const NCCL: ns::ncclDataType_t;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
    impl Sealed for i32 {}
}

impl NcclElement for f32 {
    const NCCL: ns::ncclDataType_t = ns::ncclDataType_t::ncclFloat32;
}
impl NcclElement for half::f16 {
    const NCCL: ns::ncclDataType_t = ns::ncclDataType_t::ncclFloat16;
}
impl NcclElement for half::bf16 {
    const NCCL: ns::ncclDataType_t = ns::ncclDataType_t::ncclBfloat16;
}
impl NcclElement for i32 {
    const NCCL: ns::ncclDataType_t = ns::ncclDataType_t::ncclInt32;
}

fn dtype_of(d: DType) -> ns::ncclDataType_t {
    match d {
        DType::F32 => ns::ncclDataType_t::ncclFloat32,
        DType::F16 => ns::ncclDataType_t::ncclFloat16,
        DType::BF16 => ns::ncclDataType_t::ncclBfloat16,
    }
}

/// The unique id that ties the ranks of one communicator together (128 opaque bytes, made on
/// one rank and sent to the others).
#[derive(Clone, Copy)]
pub struct NcclId {
    bytes: [u8; 128],
}

impl std::fmt::Debug for NcclId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NcclId(..)")
    }
}

impl NcclId {
    /// A new id (`ncclGetUniqueId`; on rank 0). Errors without libnccl.
    pub fn new() -> Result<Self> {
        if !nccl_available() {
            return Err(missing());
        }
        let id = nr::get_uniqueid().map_err(nccl_err("ncclGetUniqueId"))?;
        Ok(NcclId { bytes: id.internal.map(|c| c as u8) })
    }

    /// The id received from rank 0.
    pub fn from_bytes(bytes: [u8; 128]) -> Self {
        NcclId { bytes }
    }

    /// The bytes to send to the other ranks.
    pub fn to_bytes(&self) -> [u8; 128] {
        self.bytes
    }

    fn raw(&self) -> ns::ncclUniqueId {
        ns::ncclUniqueId { internal: self.bytes.map(|b| b as core::ffi::c_char) }
    }
}

/// A rank of an NCCL communicator on one GPU: the [`Collective`] for tensor parallelism
/// (`all_reduce_sum` on the backend's stream) and the all-to-all of expert parallelism.
///
/// It counts the all-reduces and all-to-alls it has enqueued ([`Self::all_reduce_calls`],
/// [`Self::all_to_all_calls`]), so tests and benches can check the per-layer count.
///
/// Dropping it destroys the communicator (`ncclCommDestroy`, which first waits for the
/// operations already enqueued): all ranks should drop theirs, as NCCL asks. While a thread
/// unwinds from a panic it aborts the communicator instead (`ncclCommAbort`, which never
/// waits). As in any NCCL program, a rank that stops part-way leaves the others waiting in
/// their collective.
pub struct NcclCollective {
    comm: ns::ncclComm_t,
    ctx: Arc<CudaContext>,
    rank: usize,
    world: usize,
    all_reduces: AtomicUsize,
    all_to_alls: AtomicUsize,
}

// SAFETY: an NCCL communicator may be used from any host thread as long as calls on it are
// not concurrent. `NcclCollective` is `Send` (moved to the thread that drives its GPU) but not
// `Sync`, so two threads can never call into one communicator at the same time.
unsafe impl Send for NcclCollective {}

impl std::fmt::Debug for NcclCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NcclCollective(rank {} of {}, GPU {})",
            self.rank,
            self.world,
            self.ctx.ordinal()
        )
    }
}

impl NcclCollective {
    /// Join the communicator `id` as `rank` of `world`, on the GPU of `ctx`. Blocks until all
    /// `world` ranks have called it (run one thread or process per rank). Errors (never
    /// panics) without libnccl, for a rank outside the world, or when NCCL fails.
    pub fn new(ctx: &Arc<CudaContext>, rank: usize, world: usize, id: &NcclId) -> Result<Self> {
        if !nccl_available() {
            return Err(missing());
        }
        if world == 0 || rank >= world {
            return Err(MoeError::InvalidParameter {
                what: "nccl rank",
                value: rank as f64,
                rule: "0 <= rank < world and world > 0",
            });
        }
        let as_int = |what: &'static str, v: usize| {
            i32::try_from(v).map_err(|_| MoeError::InvalidParameter {
                what,
                value: v as f64,
                rule: "fits in i32",
            })
        };
        let (nranks, r) = (as_int("nccl world", world)?, as_int("nccl rank", rank)?);
        // NCCL creates the communicator on the current device.
        ctx.bind_to_thread().map_err(cuda_err("cuCtxSetCurrent"))?;
        let mut comm: ns::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` is a valid out-pointer; the id is a plain 128-byte value; the library
        // and `ncclCommInitRank` were checked to be present.
        unsafe { nr::comm_init_rank(&mut comm, nranks, id.raw(), r) }
            .map_err(nccl_err("ncclCommInitRank"))?;
        Ok(NcclCollective {
            comm,
            ctx: ctx.clone(),
            rank,
            world,
            all_reduces: AtomicUsize::new(0),
            all_to_alls: AtomicUsize::new(0),
        })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Ranks in the communicator.
    pub fn world_size(&self) -> usize {
        self.world
    }

    /// The context of this rank's GPU.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// All-reduces enqueued so far through [`Collective::all_reduce_sum`].
    pub fn all_reduce_calls(&self) -> usize {
        self.all_reduces.load(Ordering::SeqCst)
    }

    /// All-to-alls enqueued so far through [`Self::all_to_all`].
    pub fn all_to_all_calls(&self) -> usize {
        self.all_to_alls.load(Ordering::SeqCst)
    }

    fn check_stream(&self, stream: &CudaStream) -> Result<()> {
        if stream.context().ordinal() != self.ctx.ordinal() {
            return Err(MoeError::Unsupported {
                backend: NAME,
                what: "a stream on another GPU than the communicator's",
            });
        }
        self.ctx.bind_to_thread().map_err(cuda_err("cuCtxSetCurrent"))
    }

    /// Open a group (`ncclGroupStart`): the operations enqueued until [`NcclGroup::end`] (or
    /// the group's drop) are issued together, as NCCL requires for send / receive pairs that
    /// would otherwise wait on each other. Groups nest.
    pub fn group(&self) -> Result<NcclGroup<'_>> {
        nr::group_start().map_err(nccl_err("ncclGroupStart"))?;
        Ok(NcclGroup { _comm: self, open: true })
    }

    /// Sum `len` elements at `ptr` over all ranks, in place, on `stream`.
    fn all_reduce_raw(
        &self,
        stream: &CudaStream,
        ptr: u64,
        len: usize,
        dtype: ns::ncclDataType_t,
    ) -> Result<()> {
        self.check_stream(stream)?;
        self.all_reduces.fetch_add(1, Ordering::SeqCst);
        if len == 0 {
            return Ok(());
        }
        // SAFETY: `ptr` addresses `len` elements of `dtype` on this communicator's GPU (a view
        // the caller holds exclusively for the call); in place is allowed by NCCL; the stream
        // belongs to the same GPU (checked above).
        unsafe {
            nr::all_reduce(
                ptr as *const core::ffi::c_void,
                ptr as *mut core::ffi::c_void,
                len,
                dtype,
                ns::ncclRedOp_t::ncclSum,
                self.comm,
                stream.cu_stream() as ns::cudaStream_t,
            )
        }
        .map_err(nccl_err("ncclAllReduce"))?;
        Ok(())
    }

    /// All-to-all of variable-sized blocks of rows (`row` elements each) on `stream`: this rank
    /// sends `send_counts[p]` rows to rank `p`, taken from `send` in rank order, and receives
    /// `recv_counts[p]` rows from rank `p` into `recv`, in rank order. Every rank must call it
    /// with matching counts (what rank `a` sends to `b` is what `b` receives from `a`).
    ///
    /// Grouped `ncclSend` / `ncclRecv` pairs (zero-row blocks are skipped on both sides); the
    /// block a rank keeps is a device copy on the stream. May be called inside an outer
    /// [`Self::group`] to fuse several all-to-alls.
    pub fn all_to_all<U: NcclElement>(
        &self,
        stream: &CudaStream,
        send: DevView<'_, U>,
        send_counts: &[usize],
        recv: DevViewMut<'_, U>,
        recv_counts: &[usize],
        row: usize,
    ) -> Result<()> {
        let w = self.world;
        if send_counts.len() != w || recv_counts.len() != w {
            return Err(MoeError::ShapeMismatch {
                what: "all_to_all counts (one per rank)",
                expected: w,
                got: if send_counts.len() != w { send_counts.len() } else { recv_counts.len() },
            });
        }
        let total = |c: &[usize]| c.iter().try_fold(0usize, |a, &n| a.checked_add(n));
        let elems = |rows: Option<usize>| rows.and_then(|r| r.checked_mul(row));
        let (ns_, nr_) = (elems(total(send_counts)), elems(total(recv_counts)));
        match (ns_, nr_) {
            (Some(s), Some(r)) if s <= send.len && r <= recv.len => {}
            (s, r) => {
                let (what, expected, got) = if s.is_none_or(|s| s > send.len) {
                    ("all_to_all send buffer", s.unwrap_or(usize::MAX), send.len)
                } else {
                    ("all_to_all receive buffer", r.unwrap_or(usize::MAX), recv.len)
                };
                return Err(MoeError::ShapeMismatch { what, expected, got });
            }
        }
        if send_counts[self.rank] != recv_counts[self.rank] {
            return Err(MoeError::ShapeMismatch {
                what: "all_to_all block kept by this rank",
                expected: send_counts[self.rank],
                got: recv_counts[self.rank],
            });
        }
        self.check_stream(stream)?;
        self.all_to_alls.fetch_add(1, Ordering::SeqCst);
        let size = std::mem::size_of::<U>() as u64;
        let cu = stream.cu_stream();
        let group = self.group()?;
        let (mut so, mut ro) = (0u64, 0u64);
        for p in 0..w {
            let (sn, rn) = (send_counts[p] * row, recv_counts[p] * row);
            let (src, dst) = (send.ptr + so * size, recv.ptr + ro * size);
            if p == self.rank {
                if sn > 0 {
                    // SAFETY: both ranges lie inside the views (checked above: the blocks'
                    // sum fits), on this GPU, and do not overlap (distinct views); the copy is
                    // ordered on the caller's stream.
                    unsafe {
                        cudarc::driver::result::memcpy_dtod_async(dst, src, sn * size as usize, cu)
                    }
                    .map_err(cuda_err("cuMemcpyDtoDAsync"))?;
                }
            } else {
                if sn > 0 {
                    // SAFETY: `src .. src + sn` lies inside `send` (checked above), on this
                    // communicator's GPU; `p` is a valid peer; issued inside a group.
                    unsafe {
                        nr::send(
                            src as *const core::ffi::c_void,
                            sn,
                            U::NCCL,
                            p as i32,
                            self.comm,
                            cu as ns::cudaStream_t,
                        )
                    }
                    .map_err(nccl_err("ncclSend"))?;
                }
                if rn > 0 {
                    // SAFETY: `dst .. dst + rn` lies inside `recv` (checked above), which the
                    // caller holds exclusively; `p` is a valid peer; issued inside a group.
                    unsafe {
                        nr::recv(
                            dst as *mut core::ffi::c_void,
                            rn,
                            U::NCCL,
                            p as i32,
                            self.comm,
                            cu as ns::cudaStream_t,
                        )
                    }
                    .map_err(nccl_err("ncclRecv"))?;
                }
            }
            so += sn as u64;
            ro += rn as u64;
        }
        group.end()
    }
}

impl Drop for NcclCollective {
    fn drop(&mut self) {
        if self.comm.is_null() {
            return;
        }
        let _ = self.ctx.bind_to_thread();
        // SAFETY: `comm` was created by `ncclCommInitRank` and is released exactly once, here;
        // errors are ignored (nothing can be done about them in a drop, and it must not panic).
        // While unwinding from a panic the other ranks may never join a destroy, so the
        // communicator is aborted instead (local, never waits).
        let _ = unsafe {
            if std::thread::panicking() {
                nr::comm_abort(self.comm)
            } else {
                nr::comm_destroy(self.comm)
            }
        };
    }
}

impl<T: CudaElement> Collective<CudaBackend, T> for NcclCollective {
    fn world_size(&self) -> usize {
        self.world
    }
    fn rank(&self) -> usize {
        self.rank
    }
    fn all_reduce_sum(&self, backend: &CudaBackend, buf: DevViewMut<'_, T>) -> Result<()> {
        self.all_reduce_raw(backend.stream(), buf.ptr, buf.len, dtype_of(T::DTYPE))
    }
}

/// An open NCCL group ([`NcclCollective::group`]). [`Self::end`] closes it and reports
/// NCCL's error; dropping it without `end` closes it too (on an error path), ignoring errors.
#[must_use = "a group issues its operations when it ends"]
pub struct NcclGroup<'c> {
    _comm: &'c NcclCollective,
    open: bool,
}

impl NcclGroup<'_> {
    /// Close the group (`ncclGroupEnd`), issuing its operations.
    pub fn end(mut self) -> Result<()> {
        self.open = false;
        nr::group_end().map_err(nccl_err("ncclGroupEnd"))?;
        Ok(())
    }
}

impl Drop for NcclGroup<'_> {
    fn drop(&mut self) {
        if self.open {
            let _ = nr::group_end();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_nccl_is_an_error_not_a_panic() {
        // Without libnccl: Err(Unsupported); with it: Ok. Never a panic.
        let id = NcclId::new();
        println!(
            "nccl available: {}, version: {:?}, id: {:?}",
            nccl_available(),
            nccl_version(),
            id
        );
        match id {
            Ok(id) => assert_eq!(NcclId::from_bytes(id.to_bytes()).to_bytes(), id.to_bytes()),
            Err(e) => {
                assert!(!nccl_available());
                assert!(matches!(e, MoeError::Unsupported { backend: "nccl", .. }), "{e}");
                assert!(nccl_version().is_err());
            }
        }
    }

    #[test]
    fn id_bytes_round_trip() {
        let mut b = [0u8; 128];
        b.iter_mut().enumerate().for_each(|(i, v)| *v = (i * 7) as u8);
        let id = NcclId::from_bytes(b);
        assert_eq!(id.to_bytes(), b);
        assert_eq!(id.raw().internal[127] as u8, b[127]);
    }
}
