//! Empty on purpose: this library target exists so that router-daemon can
//! name `router-ebpf` as a build-dependency, which makes cargo rebuild the
//! embedded object when this crate changes. The program is in `main.rs`.
#![no_std]
