//! The reduce across tensor-parallel ranks, with its state in the type.
//!
//! A forward produces a [`Partial`] output: this rank's share of the sum. Partials of one rank
//! can be merged (routed + shared, or the layer's output with any other partial sum: the merged
//! all-reduce), and a partial becomes a [`Reduced`] output only through [`Partial::reduce`],
//! which performs exactly one all-reduce when the world has more than one rank and none
//! otherwise. A `Reduced` cannot be reduced again or merged into a partial:
//!
//! ```compile_fail
//! # use moe_core::reduce::*;
//! fn twice<'o, B: moe_core::Backend + moe_core::MoeStages<f32>, C: Collective<B, f32>>(
//!     b: &B, c: &C, p: Partial<'o, B, f32>) {
//!     let r = p.reduce(b, c).unwrap();
//!     let _ = r.reduce(b, c); // no such method: a reduced output is never reduced again
//! }
//! ```
//!
//! ```compile_fail
//! # use moe_core::reduce::*;
//! fn mix<'o, B: moe_core::Backend + moe_core::MoeStages<f32>, C: Collective<B, f32>>(
//!     b: &B, c: &C, mut p: Partial<'o, B, f32>, q: Partial<'o, B, f32>) {
//!     let r = q.reduce(b, c).unwrap();
//!     p.merge(b, r).unwrap(); // a reduced output cannot be added to a partial one
//! }
//! ```
//!
//! ```compile_fail
//! # use moe_core::reduce::*;
//! fn reuse<'o, B: moe_core::Backend + moe_core::MoeStages<f32>, C: Collective<B, f32>>(
//!     b: &B, c: &C, p: Partial<'o, B, f32>) {
//!     let _r = p.reduce(b, c).unwrap();
//!     let _s = p.reduce(b, c); // the partial was consumed by the first reduce
//! }
//! ```

use crate::backend::{Backend, MoeStages};
use crate::element::Element;
use crate::error::{MoeError, Result};

/// A group of ranks that can sum a buffer across all of them.
pub trait Collective<B: Backend, T: Element> {
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// This rank, `0..world_size`.
    fn rank(&self) -> usize;
    /// Sum `buf` element-wise over all ranks, in place, on every rank.
    fn all_reduce_sum(&self, backend: &B, buf: B::ViewMut<'_, T>) -> Result<()>;
}

/// The one-rank collective: the reduce is the identity and is never called.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleRank;

impl<B: Backend, T: Element> Collective<B, T> for SingleRank {
    fn world_size(&self) -> usize {
        1
    }
    fn rank(&self) -> usize {
        0
    }
    fn all_reduce_sum(&self, _: &B, _: B::ViewMut<'_, T>) -> Result<()> {
        Ok(())
    }
}

/// An output that holds this rank's partial sum and still needs the reduce.
#[must_use = "a partial output must be reduced (Partial::reduce) before it is used"]
pub struct Partial<'o, B: Backend, T: Element> {
    buf: B::ViewMut<'o, T>,
}

/// An output that holds the full sum over all ranks.
pub struct Reduced<'o, B: Backend, T: Element> {
    buf: B::ViewMut<'o, T>,
    all_reduces: usize,
}

impl<'o, B: Backend, T: Element> Partial<'o, B, T> {
    /// Declare `buf` to hold this rank's partial sum (e.g. a row-parallel linear's output that
    /// the caller wants merged into the layer's single all-reduce).
    pub fn from_unreduced(buf: B::ViewMut<'o, T>) -> Self {
        Partial { buf }
    }

    /// Mutable access for the layer's stages, which add their partial sums here.
    pub(crate) fn buf_mut(&mut self) -> B::ViewMut<'_, T> {
        B::reborrow(&mut self.buf)
    }

    /// Add another partial sum of this rank into this one (consuming it).
    pub fn merge(&mut self, backend: &B, other: Partial<'_, B, T>) -> Result<()>
    where
        B: MoeStages<T>,
    {
        let a = B::view_mut_len(&self.buf);
        let b = B::view_mut_len(&other.buf);
        if a != b {
            return Err(MoeError::ShapeMismatch { what: "merged partial", expected: a, got: b });
        }
        backend.add_assign(B::reborrow(&mut self.buf), B::as_view(&other.buf))
    }

    /// Sum over all ranks: one `all_reduce_sum` when the world has more than one rank, none
    /// otherwise.
    pub fn reduce<C: Collective<B, T>>(
        self,
        backend: &B,
        collective: &C,
    ) -> Result<Reduced<'o, B, T>> {
        let mut buf = self.buf;
        let mut all_reduces = 0;
        if collective.world_size() > 1 {
            collective.all_reduce_sum(backend, B::reborrow(&mut buf))?;
            all_reduces = 1;
        }
        Ok(Reduced { buf, all_reduces })
    }
}

impl<'o, B: Backend, T: Element> Reduced<'o, B, T> {
    /// The all-reduces that produced this output (1 with several ranks, 0 with one).
    pub fn all_reduces(&self) -> usize {
        self.all_reduces
    }

    /// The output.
    pub fn view(&self) -> B::View<'_, T> {
        B::as_view(&self.buf)
    }

    /// The output view, giving up the state.
    pub fn into_inner(self) -> B::ViewMut<'o, T> {
        self.buf
    }
}

#[cfg(feature = "std")]
pub use simulated::{HostSlices, SimulatedRanks};

#[cfg(feature = "std")]
mod simulated {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Barrier, Mutex};
    use std::vec::Vec;

    /// Backends whose views are host slices (the CPU backend), for the rank simulation.
    pub trait HostSlices: Backend {
        /// The elements of a mutable view.
        fn host_mut<'b, 'c: 'b, U: bytemuck::Pod>(v: &'b mut Self::ViewMut<'c, U>) -> &'b mut [U];
        /// A view of a host slice.
        fn from_host<U: bytemuck::Pod>(s: &[U]) -> Self::View<'_, U>;
        /// A mutable view of a host slice.
        fn from_host_mut<U: bytemuck::Pod>(s: &mut [U]) -> Self::ViewMut<'_, U>;
    }

    struct Shared {
        world: usize,
        barrier: Barrier,
        slots: Mutex<Vec<Vec<f32>>>,
        calls: Vec<AtomicUsize>,
    }

    /// A test double for N ranks in one process (one thread per rank): `all_reduce_sum`
    /// exchanges the ranks' buffers through shared memory and sums them in rank order, so the
    /// result is the same on every rank. It counts the calls of each rank.
    #[derive(Clone)]
    pub struct SimulatedRanks {
        rank: usize,
        shared: Arc<Shared>,
    }

    impl SimulatedRanks {
        /// One handle per rank, for `world` ranks.
        pub fn new(world: usize) -> Vec<SimulatedRanks> {
            let shared = Arc::new(Shared {
                world,
                barrier: Barrier::new(world),
                slots: Mutex::new((0..world).map(|_| Vec::new()).collect()),
                calls: (0..world).map(|_| AtomicUsize::new(0)).collect(),
            });
            (0..world).map(|rank| SimulatedRanks { rank, shared: shared.clone() }).collect()
        }

        /// `all_reduce_sum` calls made by this rank so far.
        pub fn calls(&self) -> usize {
            self.shared.calls[self.rank].load(Ordering::SeqCst)
        }
    }

    impl<B: HostSlices, T: Element> Collective<B, T> for SimulatedRanks {
        fn world_size(&self) -> usize {
            self.shared.world
        }
        fn rank(&self) -> usize {
            self.rank
        }
        fn all_reduce_sum(&self, _: &B, mut buf: B::ViewMut<'_, T>) -> Result<()> {
            let s = &self.shared;
            s.calls[self.rank].fetch_add(1, Ordering::SeqCst);
            let data = B::host_mut(&mut buf);
            {
                let mut slots = s.slots.lock().map_err(|_| MoeError::Device {
                    backend: "simulated-ranks",
                    what: "lock",
                    code: -1,
                })?;
                slots[self.rank] = data.iter().map(|v| v.to_f32()).collect();
            }
            s.barrier.wait();
            {
                let slots = s.slots.lock().map_err(|_| MoeError::Device {
                    backend: "simulated-ranks",
                    what: "lock",
                    code: -1,
                })?;
                for (i, d) in data.iter_mut().enumerate() {
                    let mut acc = 0f32;
                    for r in 0..s.world {
                        acc += slots[r].get(i).copied().unwrap_or(f32::NAN);
                    }
                    *d = T::from_f32(acc);
                }
            }
            s.barrier.wait();
            Ok(())
        }
    }
}

impl<B: Backend, T: Element> core::fmt::Debug for Partial<'_, B, T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Partial<{}, {}>[{}]", B::NAME, T::DTYPE.name(), B::view_mut_len(&self.buf))
    }
}

impl<B: Backend, T: Element> core::fmt::Debug for Reduced<'_, B, T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "Reduced<{}, {}>[{}] after {} all-reduce(s)",
            B::NAME,
            T::DTYPE.name(),
            B::view_mut_len(&self.buf),
            self.all_reduces
        )
    }
}
