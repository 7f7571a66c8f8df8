//! CUDA backend of moe-kernels.
//!
//! Not implemented yet (the CUDA backend issue): this crate builds and exposes nothing.
