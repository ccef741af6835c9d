//! The client protocol: one request line, one reply line.
//!
//! `REQ <sid> <seq> LOGIN <user>` | `REQ <sid> <seq> VIEW <item>` |
//! `REQ <sid> <seq> BID <item> <amount>` | `REQ <sid> <seq> LOGOUT`, answered by
//! `OK <sid> <seq> <text>` or `ERR <sid> <seq> <reason>`. The reasons `standby` and `unavailable`
//! tell the client to retry the same (sid, seq), elsewhere or later; every other ERR is final.

use std::io::{self, BufRead};

/// Longest line either side accepts, newline included.
pub const MAX_LINE: usize = 4096;
/// Longest user name a LOGIN accepts.
pub const MAX_USER: usize = 32;
/// The ERR reason of a front end that does not serve (standby, or fenced by a newer owner).
pub const STANDBY: &str = "standby";
/// The ERR reason of a front end that could not reach its database; the request had no effect.
pub const UNAVAILABLE: &str = "unavailable";

/// One operation of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Opens the session (seq 1 only).
    Login {
        /// The user name: 1..=32 of `[A-Za-z0-9_.-]`.
        user: String,
    },
    /// Looks at an item.
    View {
        /// The item id.
        item: i32,
    },
    /// Bids on an item.
    Bid {
        /// The item id.
        item: i32,
        /// The amount, > 0.
        amount: i64,
    },
    /// Closes the session.
    Logout,
}

impl Op {
    /// The operation's name as on the wire.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Login { .. } => "LOGIN",
            Op::View { .. } => "VIEW",
            Op::Bid { .. } => "BID",
            Op::Logout => "LOGOUT",
        }
    }
}

/// A parsed request line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Session id, chosen by the client, never 0.
    pub sid: u64,
    /// Request number in the session, from 1.
    pub seq: u64,
    /// What to do.
    pub op: Op,
}

/// Why a request line was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    /// The line does not start with `REQ <sid> <seq>`.
    #[error("expected `REQ <sid> <seq> <op> ...`")]
    Shape,
    /// sid is 0 or not a number.
    #[error("sid must be a nonzero unsigned 64-bit number")]
    Sid,
    /// seq is 0 or not a number.
    #[error("seq must be a number from 1")]
    Seq,
    /// Unknown operation or wrong arguments.
    #[error("expected LOGIN <user> | VIEW <item> | BID <item> <amount> | LOGOUT")]
    Op,
    /// The user name is empty, too long or has other characters than `[A-Za-z0-9_.-]`.
    #[error("user must be 1..=32 characters of [A-Za-z0-9_.-]")]
    User,
    /// An item or amount out of range.
    #[error("item must be a positive 32-bit number, amount a positive 64-bit number")]
    Number,
}

fn positive<T: std::str::FromStr + PartialOrd + Default>(s: &str) -> Result<T, ParseError> {
    match s.parse::<T>() {
        Ok(v) if v > T::default() => Ok(v),
        _ => Err(ParseError::Number),
    }
}

/// Whether `user` is a valid user name.
pub fn valid_user(user: &str) -> bool {
    !user.is_empty()
        && user.len() <= MAX_USER
        && user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
}

/// Parses a request line (without its newline). Returns the (sid, seq) it could read with the
/// error, so that the reply can name them.
pub fn parse_request(line: &str) -> Result<Request, (u64, u64, ParseError)> {
    let words: Vec<&str> = line.split_ascii_whitespace().collect();
    if words.len() < 4 || words[0] != "REQ" {
        return Err((0, 0, ParseError::Shape));
    }
    let sid = match words[1].parse::<u64>() {
        Ok(v) if v != 0 => v,
        _ => return Err((0, 0, ParseError::Sid)),
    };
    let seq = match words[2].parse::<u64>() {
        Ok(v) if v != 0 => v,
        _ => return Err((sid, 0, ParseError::Seq)),
    };
    let op = match (words[3], &words[4..]) {
        ("LOGIN", [user]) if valid_user(user) => Op::Login {
            user: (*user).to_string(),
        },
        ("LOGIN", [_]) => return Err((sid, seq, ParseError::User)),
        ("VIEW", [item]) => Op::View {
            item: positive(item).map_err(|e| (sid, seq, e))?,
        },
        ("BID", [item, amount]) => Op::Bid {
            item: positive(item).map_err(|e| (sid, seq, e))?,
            amount: positive(amount).map_err(|e| (sid, seq, e))?,
        },
        ("LOGOUT", []) => Op::Logout,
        _ => return Err((sid, seq, ParseError::Op)),
    };
    Ok(Request { sid, seq, op })
}

/// Formats a request line (with its newline).
pub fn format_request(r: &Request) -> String {
    let args = match &r.op {
        Op::Login { user } => format!(" {user}"),
        Op::View { item } => format!(" {item}"),
        Op::Bid { item, amount } => format!(" {item} {amount}"),
        Op::Logout => String::new(),
    };
    format!("REQ {} {} {}{args}\n", r.sid, r.seq, r.op.name())
}

/// A reply as read by a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `OK <sid> <seq> <text>`.
    Ok {
        /// Session id.
        sid: u64,
        /// Request number.
        seq: u64,
        /// The answer.
        text: String,
    },
    /// `ERR <sid> <seq> <reason>`.
    Err {
        /// Session id (0 if the request could not be read).
        sid: u64,
        /// Request number (0 if the request could not be read).
        seq: u64,
        /// Why.
        reason: String,
    },
}

/// Parses a reply line (without its newline); `None` if it is neither OK nor ERR.
pub fn parse_reply(line: &str) -> Option<Reply> {
    let mut parts = line.splitn(4, ' ');
    let kind = parts.next()?;
    let sid = parts.next()?.parse().ok()?;
    let seq = parts.next()?.parse().ok()?;
    let text = parts.next().unwrap_or("").to_string();
    match kind {
        "OK" => Some(Reply::Ok { sid, seq, text }),
        "ERR" => Some(Reply::Err {
            sid,
            seq,
            reason: text,
        }),
        _ => None,
    }
}

/// Why a line could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    /// The peer sent more than [`MAX_LINE`] bytes without a newline.
    #[error("line longer than {MAX_LINE} bytes")]
    TooLong,
    /// The line is not UTF-8.
    #[error("line is not UTF-8")]
    NotUtf8,
    /// The connection failed.
    #[error("reading a line: {0}")]
    Io(#[from] io::Error),
}

/// Reads one line of at most `max` bytes, newline included; returns it without the newline (and
/// without a `\r` before it), or `None` at a clean end of stream.
pub fn read_line(r: &mut impl BufRead, max: usize) -> Result<Option<String>, LineError> {
    let mut buf = Vec::new();
    loop {
        let avail = match r.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        if avail.is_empty() {
            if buf.is_empty() {
                return Ok(None);
            }
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
        }
        let (take, done) = match avail.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (avail.len(), false),
        };
        if buf.len() + take > max {
            return Err(LineError::TooLong);
        }
        buf.extend_from_slice(&avail[..take]);
        r.consume(take);
        if done {
            buf.pop();
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
            return String::from_utf8(buf)
                .map(Some)
                .map_err(|_| LineError::NotUtf8);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        for op in [
            Op::Login { user: "ann".into() },
            Op::View { item: 7 },
            Op::Bid {
                item: 3,
                amount: 120,
            },
            Op::Logout,
        ] {
            let r = Request { sid: 9, seq: 2, op };
            let line = format_request(&r);
            assert_eq!(parse_request(line.trim_end()), Ok(r));
        }
    }

    #[test]
    fn bad_requests_are_refused_with_what_was_read() {
        assert_eq!(parse_request("GET /"), Err((0, 0, ParseError::Shape)));
        assert_eq!(
            parse_request("REQ 0 1 LOGOUT"),
            Err((0, 0, ParseError::Sid))
        );
        assert_eq!(
            parse_request("REQ 5 0 LOGOUT"),
            Err((5, 0, ParseError::Seq))
        );
        assert_eq!(parse_request("REQ 5 1 FLY"), Err((5, 1, ParseError::Op)));
        assert_eq!(
            parse_request("REQ 5 1 LOGIN a/b"),
            Err((5, 1, ParseError::User))
        );
        assert_eq!(
            parse_request("REQ 5 1 BID 3 -1"),
            Err((5, 1, ParseError::Number))
        );
        assert_eq!(
            parse_request("REQ 5 1 VIEW 99999999999"),
            Err((5, 1, ParseError::Number))
        );
        assert_eq!(
            parse_request("REQ 5 1 LOGOUT x"),
            Err((5, 1, ParseError::Op))
        );
    }

    #[test]
    fn replies_parse() {
        assert_eq!(
            parse_reply("OK 1 2 bid#1 total=5 views=0"),
            Some(Reply::Ok {
                sid: 1,
                seq: 2,
                text: "bid#1 total=5 views=0".into()
            })
        );
        assert_eq!(
            parse_reply("ERR 1 2 standby"),
            Some(Reply::Err {
                sid: 1,
                seq: 2,
                reason: "standby".into()
            })
        );
        assert_eq!(parse_reply("HELLO"), None);
    }

    #[test]
    fn lines_are_bounded() {
        let mut r = io::Cursor::new(b"short\r\nnext".to_vec());
        assert_eq!(read_line(&mut r, 16).unwrap().as_deref(), Some("short"));
        assert!(read_line(&mut r, 16).is_err(), "no newline before EOF");
        let mut r = io::Cursor::new(vec![b'a'; 100]);
        assert!(matches!(read_line(&mut r, 16), Err(LineError::TooLong)));
        let mut r = io::Cursor::new(Vec::new());
        assert!(read_line(&mut r, 16).unwrap().is_none());
    }
}
