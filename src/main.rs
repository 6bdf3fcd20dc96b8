//! The `credvault` binary.
#![forbid(unsafe_code)]

fn main() {}
