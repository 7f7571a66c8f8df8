//! Shared pieces of the moe-kernels benches: the canonical layer shapes, random weights in an
//! element type, and whole-layer and per-stage runners on the CPU backend (feature `cpu`).

#[cfg(feature = "cpu")]
mod cpu;
#[cfg(feature = "cpu")]
pub use cpu::*;
pub mod peak;

/// The items of environment variable `var` split at `sep` and trimmed; `None` when it is unset.
/// (The bench targets and examples read their selections, such as `MOE_BENCH_T=1,128`, this
/// way.)
pub fn env_list(var: &str, sep: char) -> Option<Vec<String>> {
    std::env::var(var).ok().map(|v| split_list(&v, sep))
}

/// The items of `v` split at `sep` and trimmed (how [`env_list`] reads a variable).
pub fn split_list(v: &str, sep: char) -> Vec<String> {
    v.split(sep).map(|s| s.trim().to_string()).collect()
}
