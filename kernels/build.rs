//! Compiles `cuda/all.cu` (which includes every kernel source) with nvcc into one fatbin for
//! sm_80, sm_90a and compute_80 PTX, written to `$OUT_DIR/moe_kernels.fatbin` and embedded by
//! `src/lib.rs`.
//!
//! nvcc is looked up as `$NVCC`, then `$CUDA_HOME/bin/nvcc`, then on `PATH`. Without nvcc the
//! crate still builds (an empty fatbin, `AVAILABLE = false`, a cargo warning) unless
//! `MOE_REQUIRE_NVCC=1`, which makes a missing nvcc a build error. A compile error of the
//! kernels is always a build error.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const SOURCES: &[&str] = &[
    "cuda/all.cu",
    "cuda/common.cuh",
    "cuda/route.cu",
    "cuda/permute.cu",
    "cuda/gemm.cu",
    "cuda/gemv.cu",
    "cuda/gemm_decode.cu",
    "cuda/gemm_sm90.cu",
    "cuda/gemm_sm90_tma.cu",
    "cuda/elementwise.cu",
];

fn is_file(p: &Path) -> bool {
    p.is_file()
}

fn find_nvcc() -> Option<PathBuf> {
    if let Some(p) = env::var_os("NVCC").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    if let Some(home) = env::var_os("CUDA_HOME").filter(|p| !p.is_empty()) {
        let p = Path::new(&home).join("bin").join("nvcc");
        if is_file(&p) {
            return Some(p);
        }
    }
    let path = env::var_os("PATH")?;
    env::split_paths(&path).map(|d| d.join("nvcc")).find(|p| is_file(p))
}

fn main() {
    for s in SOURCES {
        println!("cargo:rerun-if-changed={s}");
    }
    for v in ["NVCC", "CUDA_HOME", "MOE_REQUIRE_NVCC", "PATH"] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let fatbin = out_dir.join("moe_kernels.fatbin");
    let require = env::var("MOE_REQUIRE_NVCC").is_ok_and(|v| v == "1");

    let Some(nvcc) = find_nvcc() else {
        if require {
            panic!(
                "MOE_REQUIRE_NVCC=1 but nvcc was not found (set NVCC, CUDA_HOME or PATH; \
                 scripts/install-nvcc.sh installs it)"
            );
        }
        println!(
            "cargo:warning=moe-kernels: nvcc not found; building without CUDA kernels \
             (moe_kernels::AVAILABLE = false)"
        );
        std::fs::write(&fatbin, []).expect("write empty fatbin");
        return;
    };

    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let mut cmd = Command::new(&nvcc);
    cmd.arg("--fatbin")
        .args(["-O3", "-std=c++17"])
        .args(["-gencode", "arch=compute_80,code=sm_80"])
        .args(["-gencode", "arch=compute_90a,code=sm_90a"])
        .args(["-gencode", "arch=compute_80,code=compute_80"]);
    // PyPI wheel layout (site-packages/nvidia/cu13/{bin,include,nvvm}): nvcc.profile finds
    // these itself, but name the headers explicitly in case nvcc is reached through a link.
    if let Some(root) =
        nvcc.canonicalize().ok().and_then(|p| p.parent()?.parent().map(Path::to_path_buf))
    {
        let inc = root.join("include");
        if inc.join("cuda_runtime.h").is_file() {
            cmd.arg(format!("-I{}", inc.display()));
        }
    }
    cmd.arg(manifest.join("cuda/all.cu")).arg("-o").arg(&fatbin);
    let status = cmd.status().unwrap_or_else(|e| {
        panic!("moe-kernels: could not run {}: {e}", nvcc.display());
    });
    if !status.success() {
        panic!("moe-kernels: nvcc failed ({status}) compiling cuda/all.cu");
    }
}
