//! The kvm-host agent's wire format: one request per TCP connection.
//!
//! The client opens a connection and sends one JSON line, a [`Request`]:
//!
//! * `{"op":"ping"}` → the agent answers `pong\n` and closes.
//! * `{"op":"exec","argv":[...],"env":[["K","V"]],"cwd":null,"stdin_len":N}`, then exactly `N`
//!   raw bytes for the program's stdin (it sees end of file after them; none when `N` is 0). The
//!   program runs in a process group of its own. The agent sends frames (below): its stdout
//!   (`o`), its stderr (`e`), and finally its exit (`x`, a JSON [`Exit`]) or a failure to start it
//!   (`!`, text). The client may send `k` frames (a little-endian i32 signal number) to signal the
//!   process group. When the client closes its side, the agent sends SIGTERM to the group and
//!   SIGKILL 5 s later: a test that dies never leaves programs running in the kvm host.
//! * `{"op":"unix","path":"/x.sock"}` → the agent connects to that Unix socket and answers
//!   `ok\n` (or `error: <why>\n` and closes); from then on bytes are copied both ways until either
//!   side closes. This is how a test reaches bdvmm's control API inside the kvm host.
//!
//! A frame is a tag byte, a little-endian u32 length and that many bytes (at most
//! [`MAX_FRAME`]).

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// Longest frame payload either side sends or accepts.
pub const MAX_FRAME: usize = 1 << 20;
/// Longest request line.
pub const MAX_REQUEST: usize = 64 << 10;
/// Largest stdin an `exec` may carry.
pub const MAX_STDIN: u64 = 512 << 20;

/// Frame tags.
pub mod tag {
    /// Program stdout bytes (agent → client).
    pub const STDOUT: u8 = b'o';
    /// Program stderr bytes (agent → client).
    pub const STDERR: u8 = b'e';
    /// The program ended: a JSON [`super::Exit`] (agent → client), always the last frame.
    pub const EXIT: u8 = b'x';
    /// The program could not be started: text (agent → client), the last frame.
    pub const FAILED: u8 = b'!';
    /// Send a signal to the program's process group: LE i32 (client → agent).
    pub const KILL: u8 = b'k';
}

/// One request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    /// Liveness.
    Ping,
    /// Run a program.
    Exec {
        /// Program and arguments.
        argv: Vec<String>,
        /// Extra environment variables.
        #[serde(default)]
        env: Vec<(String, String)>,
        /// Working directory.
        #[serde(default)]
        cwd: Option<String>,
        /// Bytes of stdin that follow the request line.
        #[serde(default)]
        stdin_len: u64,
    },
    /// Splice the connection to a Unix stream socket.
    Unix {
        /// The socket's path inside the kvm host.
        path: String,
    },
}

/// How a program ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exit {
    /// Exit code, if it exited.
    pub code: Option<i32>,
    /// Signal, if a signal ended it.
    pub signal: Option<i32>,
}

impl Exit {
    /// As a local `ExitStatus` (a wait(2) status word).
    pub fn status(self) -> std::process::ExitStatus {
        use std::os::unix::process::ExitStatusExt;
        match (self.code, self.signal) {
            (Some(c), _) => std::process::ExitStatus::from_raw((c & 0xff) << 8),
            (None, Some(s)) => std::process::ExitStatus::from_raw(s & 0x7f),
            (None, None) => std::process::ExitStatus::from_raw(0xff << 8),
        }
    }
}

/// Writes one frame.
pub fn write_frame(w: &mut impl Write, tag: u8, payload: &[u8]) -> io::Result<()> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|_| payload.len() <= MAX_FRAME)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "frame of {} bytes is over the {MAX_FRAME}-byte limit",
                    payload.len()
                ),
            )
        })?;
    let mut head = [0u8; 5];
    head[0] = tag;
    head[1..].copy_from_slice(&len.to_le_bytes());
    w.write_all(&head)?;
    w.write_all(payload)?;
    w.flush()
}

/// Reads one frame; `Ok(None)` at a clean end of stream.
pub fn read_frame(r: &mut impl Read) -> io::Result<Option<(u8, Vec<u8>)>> {
    let mut head = [0u8; 5];
    let mut got = 0;
    while got < head.len() {
        match r.read(&mut head[got..])? {
            0 if got == 0 => return Ok(None),
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "frame cut short",
                ))
            }
            n => got += n,
        }
    }
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes is over the {MAX_FRAME}-byte limit"),
        ));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    Ok(Some((head[0], payload)))
}

/// Reads a request line (up to and including `\n`) byte by byte, so nothing after it is consumed.
pub fn read_line(r: &mut impl Read, max: usize) -> io::Result<Vec<u8>> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        if r.read(&mut b)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before the end of the line",
            ));
        }
        if b[0] == b'\n' {
            return Ok(line);
        }
        if line.len() >= max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("line longer than {max} bytes"),
            ));
        }
        line.push(b[0]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_oversized_ones_are_refused() {
        let mut buf = Vec::new();
        write_frame(&mut buf, tag::STDOUT, b"hello").unwrap();
        write_frame(&mut buf, tag::EXIT, b"").unwrap();
        let mut r = &buf[..];
        assert_eq!(
            read_frame(&mut r).unwrap(),
            Some((tag::STDOUT, b"hello".to_vec()))
        );
        assert_eq!(read_frame(&mut r).unwrap(), Some((tag::EXIT, vec![])));
        assert_eq!(read_frame(&mut r).unwrap(), None);
        let mut big = vec![tag::STDOUT];
        big.extend_from_slice(&(u32::try_from(MAX_FRAME).unwrap() + 1).to_le_bytes());
        assert!(read_frame(&mut &big[..]).is_err());
        assert!(read_frame(&mut &b"o\x05\0"[..]).is_err());
        // A writer refuses to send what a reader would refuse, and sends nothing.
        let mut out = Vec::new();
        assert!(write_frame(&mut out, tag::STDOUT, &vec![0; MAX_FRAME + 1]).is_err());
        assert!(out.is_empty());
    }

    #[test]
    fn requests_parse_and_exit_maps_to_a_wait_status() {
        let r: Request = serde_json::from_str(r#"{"op":"exec","argv":["true"]}"#).unwrap();
        assert_eq!(
            r,
            Request::Exec {
                argv: vec!["true".into()],
                env: vec![],
                cwd: None,
                stdin_len: 0
            }
        );
        let st = Exit {
            code: Some(3),
            signal: None,
        }
        .status();
        assert_eq!(st.code(), Some(3));
        use std::os::unix::process::ExitStatusExt;
        let st = Exit {
            code: None,
            signal: Some(9),
        }
        .status();
        assert_eq!(st.signal(), Some(9));
        let mut line = &b"abc\ndef"[..];
        assert_eq!(read_line(&mut line, 10).unwrap(), b"abc");
        assert_eq!(line, b"def");
        assert!(read_line(&mut &b"abcdef"[..], 3).is_err());
    }
}
