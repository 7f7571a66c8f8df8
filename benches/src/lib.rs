//! Shared pieces of the moe-kernels benches: the canonical layer shapes, random weights in an
//! element type, and whole-layer and per-stage runners on the CPU backend (feature `cpu`).

#[cfg(feature = "cpu")]
mod cpu;
#[cfg(feature = "cpu")]
pub use cpu::*;
pub mod peak;
