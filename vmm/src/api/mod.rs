//! bdvmm's control API: the server side here; the protocol and the client library are the
//! `bdvmm-api` crate (re-exported), which monitors use without the VMM.

pub mod server;

pub use bdvmm_api::{client, protocol};
pub use bdvmm_api::{map_memory, ApiClient, ApiError};
pub use bdvmm_api::{MemoryReply, PauseReply, Request, ResumeReply, StatusReply};
