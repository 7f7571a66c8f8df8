//! # moe-core
//!
//! The semantics of a Mixture-of-Experts layer, written once: configuration and validation,
//! the scalar routing and activation rules ([`math`]), the plan and its workspace, the backend
//! traits and the layer orchestration over them, the tensor-parallel reduce with its state in
//! the type, a float64 reference (feature `alloc`), and the conformance suite (feature
//! `conformance`) that every backend runs against the golden cases.
#![no_std]
#![deny(missing_docs)]

#[cfg(feature = "alloc")]
extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

pub mod backend;
pub mod config;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod element;
pub mod error;
pub mod layer;
pub mod math;
pub mod plan;
pub mod reduce;
#[cfg(feature = "alloc")]
pub mod reference;

pub use backend::{Backend, ExpertRows, MlpWeights, MoeStages, PermuteBuffers, Scratch};
pub use config::*;
pub use element::{DType, Element};
pub use error::{MoeError, Result};
pub use layer::{LatentWeights, MoeWeights, SharedWeights, forward, forward_partial};
pub use plan::{MoePlan, REGION_ALIGN, Region, WorkspaceLayout};
pub use reduce::{Collective, Partial, Reduced, SingleRank};
