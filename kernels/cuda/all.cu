// all.cu: the single translation unit that build.rs compiles into the crate's one fatbin.
// Each included file starts with its own header comment (grid, tile, warps, assumptions).
#include "route.cu"
#include "permute.cu"
#include "gemm.cu"
#include "gemv.cu"
#include "gemm_decode.cu"
#include "gemm_sm90.cu"
#include "gemm_sm90_tma.cu"
#include "elementwise.cu"
