//! bdvmm: the Backdoors microVM monitor.
//!
//! Boots a Linux guest whose RAM is one memfd that bdvmm owns, runs its vCPUs on KVM or on a QEMU
//! TCG child, and offers a control API through which a local monitor (or the rdma-bridge) can
//! pause the guest under a lease, read its registers and map its memory.

pub mod api;
pub mod bootfiles;
pub mod config;
pub mod console;
pub mod devices;
pub mod engine;
pub mod inspect;
pub mod layout;
pub mod memory;
pub mod vmm;
