//! Table cache (placeholder, filled below).
#![forbid(unsafe_code)]
