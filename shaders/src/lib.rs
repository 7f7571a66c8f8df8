//! WGSL shaders of moe-kernels.
//!
//! Not implemented yet (the wgpu backend issue): this crate builds empty.
