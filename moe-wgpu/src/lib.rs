//! wgpu backend of moe-kernels.
//!
//! Not implemented yet (the wgpu backend issue): this crate builds and exposes nothing.
