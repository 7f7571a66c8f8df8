//! A forward allocates nothing: a counting global allocator watches every call. The backend is
//! prepared for the plan first (`Cpu::prepare`: its buffer of rows packed ahead), so that the
//! very first forward must allocate nothing.

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

fn count_forward<T: Element>(case: &moe_core::conformance::Case) -> usize
where
    Cpu: MoeStages<T>,
{
    let c = &case.config;
    let plan = MoePlan::new(c, case.tokens).unwrap();
    let ew = ElementWeights::<T>::from_host(&case.weights);
    let weights = ew.views::<Cpu>();
    let x: Vec<T> = case.x.iter().map(|&v| T::from_f64(v)).collect();
    let mut out = vec![T::from_f32(f32::NAN); case.tokens * c.hidden];
    let mut ws = vec![0u8; plan.workspace_bytes(T::DTYPE).unwrap()];
    let cpu = Cpu::new();
    assert!(cpu.prepare(&plan), "{}: the row buffer", case.name);
    let before = ALLOCS.load(Ordering::SeqCst);
    let r =
        forward(&cpu, &plan, &weights, case.tokens, &x[..], &mut out[..], &mut ws[..], &SingleRank);
    let n = ALLOCS.load(Ordering::SeqCst) - before;
    assert!(r.is_ok());
    assert!(out.iter().all(|v| v.to_f32().is_finite()));
    n
}

#[test]
fn forward_allocates_nothing() {
    for case in load_dir(&golden_dir()).unwrap() {
        let counts = [
            count_forward::<f32>(&case),
            count_forward::<half::bf16>(&case),
            count_forward::<half::f16>(&case),
        ];
        println!("allocations in a forward, {:<24} f32/bf16/f16: {counts:?}", case.name);
        assert_eq!(counts, [0, 0, 0], "{}", case.name);
    }
}
