//! A timeline of the grouped GEMMs' work (feature `trace`, off by default): one [`Record`] per
//! work item, few-rows step and item epilogue, with the thread that ran it and its start and
//! end. For performance work: where each thread's time goes, by item shape (see
//! `benches/trace_summary.py`). Recording takes a lock and may allocate, so timings of a traced
//! forward are slightly pessimistic; with the feature off nothing of this is compiled.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// What a [`Record`] timed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A work item's kernel (with the few-rows steps it took on meanwhile, which have their own
    /// records inside its interval on the same thread).
    Item,
    /// One few-rows step (see [`crate::Tuning::overlap_rows`]); an item's last step also runs
    /// that item's epilogue, inside this record.
    Step,
    /// A work item's epilogue (activation or routing weight, rows into the output).
    Epilogue,
}

/// One timed piece of work.
#[derive(Clone, Copy, Debug)]
pub struct Record {
    /// What was timed.
    pub kind: Kind,
    /// Expert (group) index.
    pub group: usize,
    /// Rows of the item.
    pub rows: usize,
    /// Output columns computed: summed over the B matrices for an item (gate and up count
    /// twice), the step's columns for a step, 0 for an epilogue.
    pub cols: usize,
    /// Reduction length.
    pub k: usize,
    /// The rayon thread index (`usize::MAX` outside a pool).
    pub thread: usize,
    /// Start, seconds since the first record of the process.
    pub start: f64,
    /// End, seconds since the first record of the process.
    pub end: f64,
}

static ON: AtomicBool = AtomicBool::new(false);
static RECORDS: Mutex<Vec<Record>> = Mutex::new(Vec::new());
static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// Clear the records and start recording.
pub fn start() {
    RECORDS.lock().unwrap_or_else(|e| e.into_inner()).clear();
    ON.store(true, Ordering::Relaxed);
}

/// Stop recording and take the records.
pub fn stop() -> Vec<Record> {
    ON.store(false, Ordering::Relaxed);
    core::mem::take(&mut *RECORDS.lock().unwrap_or_else(|e| e.into_inner()))
}

/// The time at which a piece of work starts (to pass to [`record`]).
#[inline]
pub(crate) fn now() -> Instant {
    Instant::now()
}

/// Record a piece of work that started at `t0` and ends now, if recording.
pub(crate) fn record(kind: Kind, group: usize, rows: usize, cols: usize, k: usize, t0: Instant) {
    if !ON.load(Ordering::Relaxed) {
        return;
    }
    let t1 = Instant::now();
    let epoch = *EPOCH.get_or_init(|| t0);
    let r = Record {
        kind,
        group,
        rows,
        cols,
        k,
        thread: rayon::current_thread_index().unwrap_or(usize::MAX),
        start: t0.saturating_duration_since(epoch).as_secs_f64(),
        end: t1.saturating_duration_since(epoch).as_secs_f64(),
    };
    RECORDS.lock().unwrap_or_else(|e| e.into_inner()).push(r);
}
