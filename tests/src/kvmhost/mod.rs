//! The kvm host: a QEMU-TCG VM with emulated AMD-V in which bdvmm's kvm engine runs Linux guests
//! on this machine, whose own `/dev/kvm` cannot. The test process (and bdmon) stay outside, on
//! the far side of a tap device, as remote monitors would be.
//!
//! * [`host`] boots one (`KvmHost::start`) and runs programs in it.
//! * [`agent`] is what runs inside and serves [`proto`] requests.
//! * [`remote`] is the client side: remote children and a Unix-socket relay.

pub mod agent;
pub mod freeze;
pub mod host;
pub mod proto;
pub mod remote;

pub use host::{KvmHost, KvmHostOptions};
