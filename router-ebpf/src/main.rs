//! The `router-ebpf` object: built for `bpfel-unknown-none` by router-daemon's
//! build script and embedded in the daemon. See [`redirect`] for the program.
//!
//! On the host this is an empty binary, so workspace-wide `cargo check` and
//! `clippy` work without the BPF target.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod redirect;

#[cfg(not(target_arch = "bpf"))]
fn main() {}
