//! The bridge session on tokio, for what a monitor does at every sample: `FETCH_SB` (and
//! `STATUS`). One runtime thread drives the sessions of a thousand guests — a sample is a write,
//! a wakeup and a read on a socket that epoll reports ready, not a thread of its own.
//!
//! The frames, the TLS configuration, the HELLO and the reply checks are those of the blocking
//! [`Bridge`](crate::client::Bridge); everything that locks or writes guest memory stays there.

use std::time::Duration;

use introspect::sensorbox::{self, SensorBox};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::client::{backdoor_of, hello, reply_to, unexpected, ClientError};
use crate::tls::Identity;
use crate::wire::{self, Decoder, Frame, Op, Reply, Request, VmStatus};

/// Bytes read from the TLS session at once: a whole 100-sensor Sensor Box reply (about 10 KiB)
/// in one call, without a thousand sessions holding 64 KiB each.
const READ_CHUNK: usize = 16 << 10;

/// One authenticated session with a bridge, driven by tokio.
pub struct AsyncBridge {
    s: TlsStream<TcpStream>,
    dec: Decoder,
    next_id: u64,
    addr: String,
    backdoor: (u64, u64),
    timeout: Duration,
    out: Vec<u8>,
    buf: Vec<u8>,
}

impl AsyncBridge {
    /// Connects to `addr`, completes mutual TLS as `id` and HELLO; every step and each later
    /// request is bounded by `timeout`.
    pub async fn connect(
        addr: &str,
        id: &Identity,
        timeout: Duration,
    ) -> Result<AsyncBridge, ClientError> {
        let (cfg, name) = id.client_config()?;
        let io = |source| ClientError::Io {
            addr: addr.to_owned(),
            source,
        };
        let timed_out = || {
            io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {timeout:?}"),
            ))
        };
        let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| timed_out())?
            .map_err(io)?;
        tcp.set_nodelay(true).map_err(io)?;
        let s = tokio::time::timeout(timeout, TlsConnector::from(cfg).connect(name, tcp))
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| ClientError::Session(format!("handshake with {addr}: {e}")))?;
        let mut b = AsyncBridge {
            s,
            dec: Decoder::new(),
            next_id: 1,
            addr: addr.to_owned(),
            backdoor: (0, 0),
            timeout,
            out: Vec::with_capacity(64),
            buf: vec![0u8; READ_CHUNK],
        };
        b.backdoor = backdoor_of(b.call(hello(&id.name)).await?)?;
        Ok(b)
    }

    /// The bridge's address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The VM's backdoor range `(gpa, size)`, as the bridge announced it.
    pub fn backdoor(&self) -> (u64, u64) {
        self.backdoor
    }

    /// Sends one request and waits (at most the session's timeout) for its reply.
    pub async fn call(&mut self, req: Request) -> Result<Reply, ClientError> {
        let timeout = self.timeout;
        match tokio::time::timeout(timeout, self.exchange(req)).await {
            Ok(r) => r,
            Err(_) => Err(late(timeout, &self.addr)),
        }
    }

    async fn exchange(&mut self, req: Request) -> Result<Reply, ClientError> {
        let id = self.send(req).await?;
        loop {
            if let Some(f) = self.dec.next_frame()? {
                return reply_to(id, f);
            }
            self.receive().await?;
        }
    }

    /// Sends `req`; returns its request id.
    async fn send(&mut self, req: Request) -> Result<u64, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        self.out.clear();
        Frame::request(id, req).encode_into(&mut self.out)?;
        let addr = &self.addr;
        let io = |source| ClientError::Io {
            addr: addr.clone(),
            source,
        };
        self.s.write_all(&self.out).await.map_err(io)?;
        self.s.flush().await.map_err(io)?;
        Ok(id)
    }

    /// Reads what the session has into the decoder (at least one byte, or an error).
    async fn receive(&mut self) -> Result<(), ClientError> {
        let n = self
            .s
            .read(&mut self.buf)
            .await
            .map_err(|source| ClientError::Io {
                addr: self.addr.clone(),
                source,
            })?;
        if n == 0 {
            return Err(ClientError::Io {
                addr: self.addr.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the bridge closed the session",
                ),
            });
        }
        self.dec.push(&self.buf[..n])?;
        Ok(())
    }

    /// `fetch_sb(node)`, parsed and validated.
    pub async fn sensor_box(&mut self) -> Result<SensorBox, ClientError> {
        let mut sb = SensorBox::default();
        self.sensor_box_into(&mut sb).await?;
        Ok(sb)
    }

    /// `fetch_sb(node)`, parsed and validated into `out` straight from the received bytes (no
    /// copy of the box, no allocation once `out` has held this box before): what a monitor
    /// calls at every sample. On error `out` is unspecified.
    pub async fn sensor_box_into(&mut self, out: &mut SensorBox) -> Result<(), ClientError> {
        let timeout = self.timeout;
        // The address is cloned only when the reply is late.
        match tokio::time::timeout(timeout, self.fetch_into(out)).await {
            Ok(r) => r,
            Err(_) => Err(late(timeout, &self.addr)),
        }
    }

    async fn fetch_into(&mut self, out: &mut SensorBox) -> Result<(), ClientError> {
        let id = self.send(Request::FetchSb).await?;
        let gpa = self.backdoor.0;
        loop {
            let parsed = self.dec.next_raw(|rid, op, payload| {
                if rid == id && op == Op::FetchSbOk as u8 {
                    return Ok(Ok(sensorbox::parse_into(payload, gpa, out)));
                }
                Ok(Err(wire::decode_payload(op, payload).map(|message| {
                    Frame {
                        request_id: rid,
                        message,
                    }
                })))
            })?;
            match parsed {
                Some(Ok(r)) => {
                    return r.map_err(|e| ClientError::Protocol(format!("Sensor Box: {e}")))
                }
                Some(Err(frame)) => {
                    let r = reply_to(id, frame?)?;
                    return Err(unexpected("FETCH_SB", &r));
                }
                None => self.receive().await?,
            }
        }
    }

    /// bdvmm's view of the vCPUs.
    pub async fn status(&mut self) -> Result<VmStatus, ClientError> {
        match self.call(Request::Status).await? {
            Reply::Status(s) => Ok(s),
            r => Err(unexpected("STATUS", &r)),
        }
    }
}

/// The error of a reply that did not come within `timeout` from `addr`.
fn late(timeout: Duration, addr: &str) -> ClientError {
    ClientError::Io {
        addr: addr.to_owned(),
        source: std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no reply within {timeout:?}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    /// The frame a sample sends is the blocking client's: same encoding, same request.
    #[test]
    fn a_fetch_sb_frame_encodes_as_the_blocking_clients() {
        use crate::wire::{self, Frame, Request};
        let mut out = Vec::new();
        Frame::request(7, Request::FetchSb)
            .encode_into(&mut out)
            .unwrap();
        assert_eq!(
            out,
            wire::encode(&Frame::request(7, Request::FetchSb)).unwrap()
        );
    }
}
