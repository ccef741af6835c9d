//! bdvmm's control API: protocol, server side, client library.

pub mod client;
pub mod protocol;
pub mod server;

pub use client::{ApiClient, ApiError};
pub use protocol::{MemoryReply, PauseReply, Request, ResumeReply, StatusReply};
