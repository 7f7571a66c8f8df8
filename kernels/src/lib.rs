//! CUDA C++ kernels of moe-kernels, compiled by nvcc into one embedded fatbin.
//!
//! Not implemented yet (the CUDA backend issue): this crate builds empty.
