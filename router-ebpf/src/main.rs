//! The `router-ebpf` object: built for `bpfel-unknown-none` by router-daemon's
//! build script and embedded in the daemon. It holds both kernel response
//! paths: [`redirect`] (a `stream_verdict` program on the router's backend
//! sockets) and [`send`] (sockops and sk_msg programs on the backend's own
//! sockets), over the maps in [`maps`] and the framing in [`framing`].
//!
//! On the host this is an empty binary, so workspace-wide `cargo check` and
//! `clippy` work without the BPF target.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod framing;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod redirect;
#[cfg(target_arch = "bpf")]
mod send;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {}
