//! The golden conformance suite (in progress).
