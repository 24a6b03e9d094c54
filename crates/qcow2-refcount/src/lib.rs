//! Refcount layer (placeholder).
#![forbid(unsafe_code)]
