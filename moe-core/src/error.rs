//! The one error type of the library. Every variant names what was wrong and the values involved.

use core::fmt;

/// Result alias used throughout the crates.
pub type Result<T, E = MoeError> = core::result::Result<T, E>;

/// Everything that can go wrong in validation, planning or a forward.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum MoeError {
    /// A dimension that must be positive is zero.
    ZeroDimension {
        /// Which dimension (`"hidden"`, `"experts"`, ...).
        what: &'static str,
    },
    /// `top_k` is zero.
    TopKZero,
    /// `top_k` is larger than the number of experts.
    TopKTooLarge {
        /// Requested experts per token.
        top_k: usize,
        /// Experts in the layer.
        experts: usize,
    },
    /// `top_k` is larger than the experts reachable inside the `topk_group` best groups.
    TopKExceedsGroups {
        /// Requested experts per token.
        top_k: usize,
        /// `topk_group * experts / n_group`.
        reachable: usize,
    },
    /// `n_group` does not divide the number of experts.
    GroupsDoNotDivide {
        /// Experts in the layer.
        experts: usize,
        /// Requested number of groups.
        n_group: usize,
    },
    /// `topk_group` is zero or larger than `n_group`.
    TopkGroupInvalid {
        /// Requested groups per token.
        topk_group: usize,
        /// Number of groups.
        n_group: usize,
    },
    /// The `top2_sum` group score needs at least two experts per group.
    GroupTooSmallForTop2 {
        /// Experts per group.
        experts_per_group: usize,
    },
    /// A scalar parameter is NaN or infinite.
    NonFiniteParameter {
        /// Which parameter.
        what: &'static str,
        /// Its value.
        value: f64,
    },
    /// A scalar parameter is finite but outside its domain.
    InvalidParameter {
        /// Which parameter.
        what: &'static str,
        /// Its value.
        value: f64,
        /// The rule it breaks.
        rule: &'static str,
    },
    /// The configuration combines features that are mutually inconsistent.
    InconsistentConfig {
        /// What does not fit together.
        what: &'static str,
    },
    /// A buffer's length does not match the shape the plan expects.
    ShapeMismatch {
        /// Which tensor.
        what: &'static str,
        /// Expected number of elements.
        expected: usize,
        /// Number of elements given.
        got: usize,
    },
    /// An optional tensor the configuration requires is missing, or one it forbids is present.
    TensorPresence {
        /// Which tensor.
        what: &'static str,
        /// Whether the configuration requires it.
        required: bool,
    },
    /// The workspace is smaller than [`crate::MoePlan::workspace_bytes`].
    WorkspaceTooSmall {
        /// Bytes the plan needs.
        needed: usize,
        /// Bytes given.
        got: usize,
    },
    /// More tokens than the plan was made for.
    TooManyTokens {
        /// Tokens in the input.
        tokens: usize,
        /// The plan's maximum.
        max: usize,
    },
    /// A value in an input tensor is NaN or infinite.
    NonFiniteInput {
        /// Which tensor.
        what: &'static str,
        /// Flat index of the first offending element.
        index: usize,
    },
    /// An expert map entry is out of range, or the map is not one-to-one.
    InvalidExpertMap {
        /// Global expert index.
        expert: usize,
        /// The entry.
        value: i32,
    },
    /// The collective's world size or rank does not match the configuration.
    CollectiveMismatch {
        /// Ranks the configuration says.
        expected_world: usize,
        /// Ranks the collective has.
        got_world: usize,
    },
    /// The backend does not support this configuration or element type.
    Unsupported {
        /// The backend's name.
        backend: &'static str,
        /// What is not supported.
        what: &'static str,
    },
    /// A device or driver call failed.
    Device {
        /// The backend's name.
        backend: &'static str,
        /// The call that failed.
        what: &'static str,
        /// The driver's status code, where it has one.
        code: i64,
    },
}

impl fmt::Display for MoeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use MoeError::*;
        match self {
            ZeroDimension { what } => write!(f, "dimension `{what}` is zero"),
            TopKZero => write!(f, "top_k is zero"),
            TopKTooLarge { top_k, experts } => {
                write!(f, "top_k = {top_k} is larger than the {experts} experts")
            }
            TopKExceedsGroups { top_k, reachable } => write!(
                f,
                "top_k = {top_k} is larger than the {reachable} experts reachable in the chosen groups"
            ),
            GroupsDoNotDivide { experts, n_group } => {
                write!(f, "n_group = {n_group} does not divide experts = {experts}")
            }
            TopkGroupInvalid { topk_group, n_group } => {
                write!(f, "topk_group = {topk_group} must be in 1..={n_group}")
            }
            GroupTooSmallForTop2 { experts_per_group } => write!(
                f,
                "group score top2_sum needs >= 2 experts per group, got {experts_per_group}"
            ),
            NonFiniteParameter { what, value } => write!(f, "parameter `{what}` is {value}"),
            InvalidParameter { what, value, rule } => {
                write!(f, "parameter `{what}` = {value} breaks the rule: {rule}")
            }
            InconsistentConfig { what } => write!(f, "inconsistent configuration: {what}"),
            ShapeMismatch { what, expected, got } => {
                write!(f, "`{what}` has {got} elements, expected {expected}")
            }
            TensorPresence { what, required: true } => {
                write!(f, "`{what}` is required by the configuration but missing")
            }
            TensorPresence { what, required: false } => {
                write!(f, "`{what}` is given but the configuration does not use it")
            }
            WorkspaceTooSmall { needed, got } => {
                write!(f, "workspace has {got} bytes, the plan needs {needed}")
            }
            TooManyTokens { tokens, max } => {
                write!(f, "{tokens} tokens exceed the plan's maximum of {max}")
            }
            NonFiniteInput { what, index } => {
                write!(f, "`{what}` holds a non-finite value at flat index {index}")
            }
            InvalidExpertMap { expert, value } => {
                write!(f, "expert map entry {expert} -> {value} is out of range or repeated")
            }
            CollectiveMismatch { expected_world, got_world } => write!(
                f,
                "configuration has tp_size = {expected_world} but the collective has {got_world} ranks"
            ),
            Unsupported { backend, what } => write!(f, "{backend}: unsupported: {what}"),
            Device { backend, what, code } => write!(f, "{backend}: {what} failed (code {code})"),
        }
    }
}

impl core::error::Error for MoeError {}
