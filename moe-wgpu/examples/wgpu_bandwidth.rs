//! Memory-bandwidth probe for the wgpu backend's adapter: what a compute shader can read from
//! and copy in device memory, next to `copy_buffer_to_buffer`, with wgpu's shader runtime
//! checks (bounds checks, loop bounding) on and off.
//!
//! Why: on the H100 through NVIDIA's Vulkan driver the moe-wgpu GEMMs read weights at
//! 0.4-0.7 TB/s and `copy_buffer_to_buffer` measured 0.85 TB/s (read + write), while the CUDA
//! backend's copy on the same GPU measured 3.0 TB/s. This separates what the driver and
//! memory placement allow from what our shaders do.
//!
//! `cargo run -p moe-wgpu --release --example wgpu_bandwidth [-- --mib 512]`

use std::time::Instant;

use moe_wgpu::{Options, WgpuBackend};

type R<T> = Result<T, Box<dyn std::error::Error>>;

const SHADER: &str = include_str!("bandwidth.wgsl");

fn arg(name: &str) -> Option<String> {
    let a: Vec<String> = std::env::args().collect();
    a.iter().position(|x| x == name).and_then(|i| a.get(i + 1).cloned())
}

fn main() -> R<()> {
    let be = match WgpuBackend::request_with_features(Options::default(), wgpu::Features::empty()) {
        Ok(Some(b)) => b,
        _ => {
            println!("wgpu_bandwidth: skipped: no wgpu adapter");
            return Ok(());
        }
    };
    let info = be.adapter_info();
    println!(
        "adapter: {} ({:?}, {:?}), driver {}",
        info.name, info.backend, info.device_type, info.driver_info
    );
    let d = be.device();
    let limits = d.limits();
    let mib: u64 = arg("--mib").and_then(|v| v.parse().ok()).unwrap_or(512);
    let bytes = (mib << 20).min(limits.max_storage_buffer_binding_size).min(limits.max_buffer_size)
        / 16
        * 16;
    let usage =
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC;
    let mk = |label| {
        d.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes,
            usage,
            mapped_at_creation: false,
        })
    };
    let (src, dst) = (mk("src"), mk("dst"));
    // non-zero contents (a zero buffer might read faster through compression)
    let chunk = 64u64 << 20;
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let data: Vec<u8> = (0..chunk.min(bytes))
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let mut off = 0;
    while off < bytes {
        let n = chunk.min(bytes - off) as usize;
        be.queue().write_buffer(&src, off, &data[..n]);
        off += n as u64;
    }
    be.synchronize()?;
    println!("buffers: 2 x {} MiB", bytes >> 20);

    let time = |f: &dyn Fn(&mut wgpu::CommandEncoder), iters: usize| -> R<f64> {
        let run = |n: usize| {
            let mut enc = d.create_command_encoder(&Default::default());
            for _ in 0..n {
                f(&mut enc);
            }
            be.queue().submit([enc.finish()]);
        };
        run(1);
        be.synchronize()?;
        let mut v = Vec::new();
        for _ in 0..3 {
            let t = Instant::now();
            run(iters);
            be.synchronize()?;
            v.push(t.elapsed().as_secs_f64() / iters as f64);
        }
        v.sort_by(|a, b| a.total_cmp(b));
        Ok(v[1])
    };
    let iters = 20;
    let s = time(&|enc| enc.copy_buffer_to_buffer(&src, 0, &dst, 0, bytes), iters)?;
    println!("copy_buffer_to_buffer: {:.0} GB/s (read + write)", 2.0 * bytes as f64 / s / 1e9);

    for (checks, label) in [
        (wgpu::ShaderRuntimeChecks::checked(), "runtime checks on (wgpu default)"),
        (wgpu::ShaderRuntimeChecks::unchecked(), "runtime checks off"),
    ] {
        // SAFETY: the probe's shaders index `src` and `dst` only below arrayLength(&src) (and
        // dst is as long as src), and every loop ends (i grows by a positive stride up to the
        // length), so the unchecked module does what the checked one does.
        let module = unsafe {
            d.create_shader_module_trusted(
                wgpu::ShaderModuleDescriptor {
                    label: Some("wgpu_bandwidth"),
                    source: wgpu::ShaderSource::Wgsl(SHADER.into()),
                },
                checks,
            )
        };
        for entry in ["read1", "read4", "copy1"] {
            let p = d.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(entry),
                layout: None,
                module: &module,
                entry_point: Some(entry),
                compilation_options: Default::default(),
                cache: None,
            });
            let bg = d.create_bind_group(&wgpu::BindGroupDescriptor {
                label: None,
                layout: &p.get_bind_group_layout(0),
                entries: &[
                    wgpu::BindGroupEntry { binding: 0, resource: src.as_entire_binding() },
                    wgpu::BindGroupEntry { binding: 1, resource: dst.as_entire_binding() },
                ],
            });
            let vec4s = (bytes / 16) as u32;
            let groups: Vec<(u32, u32)> = if entry == "read4" {
                vec![(132 * 8, 1), (132 * 32, 1), (132 * 128, 1)]
            } else {
                let wg = vec4s.div_ceil(256);
                let y = wg.div_ceil(32768);
                vec![(wg.div_ceil(y), y)]
            };
            for (gx, gy) in groups {
                let s = time(
                    &|enc| {
                        let mut pass = enc.begin_compute_pass(&Default::default());
                        pass.set_pipeline(&p);
                        pass.set_bind_group(0, &bg, &[]);
                        pass.dispatch_workgroups(gx, gy, 1);
                    },
                    iters,
                )?;
                let moved = if entry == "copy1" { 2.0 } else { 1.0 } * bytes as f64;
                println!(
                    "{label:<34} {entry} {gx:>6} x {gy} workgroups of 256: {:.0} GB/s{}",
                    moved / s / 1e9,
                    if entry == "copy1" { " (read + write)" } else { " (read)" }
                );
            }
        }
    }
    Ok(())
}
