//! Criterion benches of moe-kernels (see `benches/`); the library part is empty.
