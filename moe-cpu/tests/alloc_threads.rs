//! With threads: the allocations of a steady-state forward in a 2-thread rayon pool, counted by
//! a global allocator (in its own test binary, so that no other test allocates meanwhile).

use moe_core::conformance::{ElementWeights, golden_dir, load_dir};
use moe_core::*;
use moe_cpu::Cpu;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::SeqCst);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::SeqCst);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// With threads: the steady-state count (second forward) in a 2-thread rayon pool, reported
/// (rayon may allocate when it queues jobs; the kernels themselves never do).
#[test]
fn forward_allocations_with_threads_are_reported() {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let cases = load_dir(&golden_dir()).unwrap();
    pool.install(|| {
        let mut total = 0;
        for case in &cases {
            let c = &case.config;
            let plan = MoePlan::new(c, case.tokens).unwrap();
            let ew = ElementWeights::<f32>::from_host(&case.weights);
            let weights = ew.views::<Cpu>();
            let x: Vec<f32> = case.x.iter().map(|&v| v as f32).collect();
            let mut out = vec![0f32; case.tokens * c.hidden];
            let mut ws = vec![0u8; plan.workspace_bytes(DType::F32).unwrap()];
            let cpu = Cpu::parallel();
            let mut run = || {
                forward(
                    &cpu,
                    &plan,
                    &weights,
                    case.tokens,
                    &x[..],
                    &mut out[..],
                    &mut ws[..],
                    &SingleRank,
                )
                .unwrap();
            };
            run();
            let before = ALLOCS.load(Ordering::SeqCst);
            run();
            let n = ALLOCS.load(Ordering::SeqCst) - before;
            println!(
                "allocations in a steady-state forward, 2 threads, {:<24} f32: {n}",
                case.name
            );
            total += n;
        }
        println!("total over the golden cases, 2 threads: {total}");
    });
}
