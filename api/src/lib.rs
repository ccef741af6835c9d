//! bdvmm's control API as its clients see it: the wire format ([`protocol`]) and a client
//! ([`ApiClient`]) that also maps the guest's memfd for introspection ([`map_memory`]).
//!
//! The server side lives in bdvmm itself (`vmm/src/api/server.rs`); this crate has no VMM code, so
//! the bridge and any other tool that drives a running bdvmm build without kvm-ioctls and friends.

pub mod client;
pub mod protocol;

pub use client::{map_memory, ApiClient, ApiError};
pub use protocol::{
    GpaRange, MemoryReply, PauseReply, RamRange, Request, ResumeReply, StatusReply, VcpuRegs,
};
