//! rdma-bridge: exposes chosen guest-physical ranges and the pause lock of a bdvmm guest to remote
//! monitors (the paper's backdoor), behind the Guard. See `DESIGN.md` at the top of the project.
//!
//! Built so far: [`wire`], the binary frame format spoken between monitors and the bridge. The server,
//! the Guard, authentication and the transports come later.

pub mod wire;
