//! Payloads: each op's fields, encoded and decoded with every bound checked.

use introspect::le;

use super::*;

/// Reads little-endian fields from a payload ([`introspect::le::Cursor`]); every shortfall is a
/// [`WireError::Malformed`].
pub(super) struct Cursor<'a> {
    inner: le::Cursor<'a>,
    op: &'static str,
}

impl<'a> Cursor<'a> {
    pub(super) fn new(rest: &'a [u8], op: &'static str) -> Self {
        Cursor {
            inner: le::Cursor::new(rest),
            op,
        }
    }

    pub(super) fn malformed(&self, s: le::Short) -> WireError {
        WireError::Malformed {
            op: self.op,
            what: s.to_string(),
        }
    }

    pub(super) fn take<const N: usize>(
        &mut self,
        field: &'static str,
    ) -> Result<[u8; N], WireError> {
        self.inner.array(field).map_err(|s| self.malformed(s))
    }

    pub(super) fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take::<1>("u8")?[0])
    }
    pub(super) fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.take("u16")?))
    }
    pub(super) fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.take("u32")?))
    }
    pub(super) fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.take("u64")?))
    }

    pub(super) fn bytes(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], WireError> {
        self.inner.bytes(n, field).map_err(|s| self.malformed(s))
    }

    pub(super) fn rest(&mut self) -> &'a [u8] {
        self.inner.rest()
    }

    pub(super) fn remaining(&self) -> usize {
        self.inner.remaining()
    }

    pub(super) fn finish(self) -> Result<(), WireError> {
        if self.inner.is_empty() {
            Ok(())
        } else {
            Err(WireError::TrailingBytes {
                op: self.op,
                where_: "payload",
                extra: self.inner.remaining(),
            })
        }
    }
}

fn check_range(gpa: u64, len: u64) -> Result<(), WireError> {
    if gpa.checked_add(len).is_none() {
        return Err(WireError::RangeOverflow { gpa, len });
    }
    Ok(())
}

fn check_read(r: Range) -> Result<(), WireError> {
    if r.len > MAX_READ_LEN {
        return Err(WireError::ReadTooLarge {
            len: u64::from(r.len),
        });
    }
    check_range(r.gpa, u64::from(r.len))
}

/// Checks a batch of ranges: count, each range, and that the reply fits in one frame.
fn check_batch(ranges: &[Range]) -> Result<(), WireError> {
    if ranges.len() > usize::from(MAX_BATCH_RANGES) {
        return Err(WireError::TooManyRanges {
            count: ranges.len(),
        });
    }
    let mut reply = 2u64;
    for r in ranges {
        check_read(*r)?;
        reply += 4 + u64::from(r.len);
    }
    if reply > u64::from(MAX_PAYLOAD) {
        return Err(WireError::ReadTooLarge { len: reply });
    }
    Ok(())
}

fn check_string(s: &[u8], field: &'static str, max: usize) -> Result<(), WireError> {
    if s.len() > max {
        return Err(WireError::StringTooLong {
            field,
            len: s.len(),
            max,
        });
    }
    Ok(())
}

/// A batch's range count as its u16 field (the checks bound it to [`MAX_BATCH_RANGES`]).
fn count_u16(count: usize) -> Result<u16, WireError> {
    u16::try_from(count).map_err(|_| WireError::TooManyRanges { count })
}

fn check_monitor_id(id: &[u8]) -> Result<(), WireError> {
    if id.is_empty() {
        return Err(WireError::Malformed {
            op: Op::Hello.name(),
            what: "monitor id is empty".into(),
        });
    }
    check_string(id, "monitor id", MAX_MONITOR_ID)
}

fn check_payload_len(len: usize) -> Result<(), WireError> {
    if len > MAX_PAYLOAD as usize {
        return Err(WireError::PayloadTooLarge {
            len: len as u64,
            max: MAX_PAYLOAD,
        });
    }
    Ok(())
}

pub(super) fn encode_payload(m: &Message, op: Op, out: &mut Vec<u8>) -> Result<(), WireError> {
    match m {
        Message::Request(r) => match r {
            Request::Hello { monitor_id, nonce } => {
                check_monitor_id(monitor_id.as_bytes())?;
                out.extend_from_slice(&nonce.to_le_bytes());
                out.push(
                    u8::try_from(monitor_id.len()).map_err(|_| WireError::Malformed {
                        op: Op::Hello.name(),
                        what: "monitor id longer than 255 bytes".into(),
                    })?,
                );
                out.extend_from_slice(monitor_id.as_bytes());
            }
            Request::FetchSb | Request::Unlock | Request::Status | Request::Restart => {}
            Request::RdmaConnect(b) => put_blob(out, b)?,
            Request::Read(r) => {
                check_read(*r)?;
                put_range(out, *r);
            }
            Request::ReadBatch(ranges) => {
                check_batch(ranges)?;
                out.extend_from_slice(&count_u16(ranges.len())?.to_le_bytes());
                for r in ranges {
                    put_range(out, *r);
                }
            }
            Request::Write { gpa, bytes } => {
                check_payload_len(bytes.len().saturating_add(8))?;
                check_range(*gpa, bytes.len() as u64)?;
                out.extend_from_slice(&gpa.to_le_bytes());
                out.extend_from_slice(bytes);
            }
            Request::Lock { lease_ms } => out.extend_from_slice(&lease_ms.to_le_bytes()),
            Request::Regs { vcpu } => out.push(*vcpu),
        },
        Message::Reply(r) => match r {
            Reply::Hello {
                nonce,
                backdoor_gpa,
                backdoor_size,
            } => {
                out.extend_from_slice(&nonce.to_le_bytes());
                out.extend_from_slice(&backdoor_gpa.to_le_bytes());
                out.extend_from_slice(&backdoor_size.to_le_bytes());
            }
            Reply::SensorBox(b) | Reply::Read(b) => {
                check_payload_len(b.len())?;
                out.extend_from_slice(b);
            }
            Reply::ReadBatch(parts) => {
                if parts.len() > usize::from(MAX_BATCH_RANGES) {
                    return Err(WireError::TooManyRanges { count: parts.len() });
                }
                let total = parts.iter().fold(2usize, |acc, p| {
                    acc.saturating_add(4).saturating_add(p.len())
                });
                check_payload_len(total)?;
                out.extend_from_slice(&count_u16(parts.len())?.to_le_bytes());
                for p in parts {
                    let len = u32::try_from(p.len()).map_err(|_| WireError::PayloadTooLarge {
                        len: u64::try_from(p.len()).unwrap_or(u64::MAX),
                        max: MAX_PAYLOAD,
                    })?;
                    out.extend_from_slice(&len.to_le_bytes());
                    out.extend_from_slice(p);
                }
            }
            Reply::Write | Reply::Unlock | Reply::Restart => {}
            Reply::Lock { lock_ns } => out.extend_from_slice(&lock_ns.to_le_bytes()),
            Reply::Regs(regs) => put_regs(out, regs, op)?,
            Reply::RdmaConnect(b) => put_blob(out, b)?,
            Reply::Status(st) => {
                if st.state > 2 {
                    return Err(WireError::Malformed {
                        op: op.name(),
                        what: format!("status state {} is not 0..=2", st.state),
                    });
                }
                out.push(st.state);
                out.push(st.vcpus);
                out.extend_from_slice(&st.uptime_ms.to_le_bytes());
                out.extend_from_slice(&st.pauses.to_le_bytes());
            }
            Reply::Error { code, message } => {
                check_string(message.as_bytes(), "error message", MAX_ERROR_MESSAGE)?;
                out.extend_from_slice(&code.to_le_bytes());
                out.extend_from_slice(message.as_bytes());
            }
        },
    }
    Ok(())
}

pub(super) fn put_range(out: &mut Vec<u8>, r: Range) {
    out.extend_from_slice(&r.gpa.to_le_bytes());
    out.extend_from_slice(&r.len.to_le_bytes());
}

fn put_blob(out: &mut Vec<u8>, b: &[u8]) -> Result<(), WireError> {
    if b.is_empty() || b.len() > MAX_RDMA_BLOB {
        return Err(WireError::Malformed {
            op: Op::RdmaConnect.name(),
            what: format!("blob of {} bytes is not 1..={MAX_RDMA_BLOB}", b.len()),
        });
    }
    out.extend_from_slice(b);
    Ok(())
}

fn get_blob(c: &mut Cursor<'_>, op: Op) -> Result<Vec<u8>, WireError> {
    let b = c.rest();
    if b.is_empty() || b.len() > MAX_RDMA_BLOB {
        return Err(WireError::Malformed {
            op: op.name(),
            what: format!("blob of {} bytes is not 1..={MAX_RDMA_BLOB}", b.len()),
        });
    }
    Ok(b.to_vec())
}

fn put_regs(out: &mut Vec<u8>, r: &Regs, op: Op) -> Result<(), WireError> {
    if r.cpl > 3 {
        return Err(WireError::Malformed {
            op: op.name(),
            what: format!("cpl {} is not 0..=3", r.cpl),
        });
    }
    for v in [
        r.rip,
        r.rsp,
        r.rflags,
        r.cr0,
        r.cr2,
        r.cr3,
        r.cr4,
        r.efer,
        r.fs_base,
        r.gs_base,
        r.kernel_gs_base.unwrap_or(0),
    ] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.push(r.cpl);
    out.push(u8::from(r.kernel_gs_base.is_some()));
    Ok(())
}

/// Decodes the payload of a frame whose header has been validated (`payload.len()` ≤ the limit).
pub fn decode_payload(op: u8, payload: &[u8]) -> Result<Message, WireError> {
    let op = Op::from_u8(op).ok_or(WireError::UnknownOp { op })?;
    let mut c = Cursor::new(payload, op.name());
    let m = match op {
        Op::Hello => {
            let nonce = c.u64()?;
            let len = usize::from(c.u8()?);
            let id = c.bytes(len, "monitor id")?;
            check_monitor_id(id)?;
            let monitor_id = std::str::from_utf8(id)
                .map_err(|_| WireError::InvalidUtf8 {
                    field: "monitor id",
                })?
                .to_owned();
            Message::Request(Request::Hello { monitor_id, nonce })
        }
        Op::FetchSb => Message::Request(Request::FetchSb),
        Op::Read => {
            let r = Range {
                gpa: c.u64()?,
                len: c.u32()?,
            };
            check_read(r)?;
            Message::Request(Request::Read(r))
        }
        Op::ReadBatch => {
            let count = c.u16()?;
            if count > MAX_BATCH_RANGES {
                return Err(WireError::TooManyRanges {
                    count: usize::from(count),
                });
            }
            let need = usize::from(count) * 12;
            if c.remaining() != need {
                return Err(WireError::Malformed {
                    op: op.name(),
                    what: format!(
                        "{count} ranges need {need} bytes, payload has {}",
                        c.remaining()
                    ),
                });
            }
            let mut ranges = Vec::with_capacity(usize::from(count));
            for _ in 0..count {
                ranges.push(Range {
                    gpa: c.u64()?,
                    len: c.u32()?,
                });
            }
            check_batch(&ranges)?;
            Message::Request(Request::ReadBatch(ranges))
        }
        Op::Write => {
            let gpa = c.u64()?;
            let bytes = c.rest();
            check_range(gpa, bytes.len() as u64)?;
            Message::Request(Request::Write {
                gpa,
                bytes: bytes.to_vec(),
            })
        }
        Op::Lock => Message::Request(Request::Lock { lease_ms: c.u32()? }),
        Op::Unlock => Message::Request(Request::Unlock),
        Op::Regs => Message::Request(Request::Regs { vcpu: c.u8()? }),
        Op::RdmaConnect => Message::Request(Request::RdmaConnect(get_blob(&mut c, op)?)),
        Op::Status => Message::Request(Request::Status),
        Op::Restart => Message::Request(Request::Restart),
        Op::RestartOk => Message::Reply(Reply::Restart),
        Op::HelloOk => Message::Reply(Reply::Hello {
            nonce: c.u64()?,
            backdoor_gpa: c.u64()?,
            backdoor_size: c.u64()?,
        }),
        Op::FetchSbOk => Message::Reply(Reply::SensorBox(c.rest().to_vec())),
        Op::ReadOk => Message::Reply(Reply::Read(c.rest().to_vec())),
        Op::ReadBatchOk => {
            let count = c.u16()?;
            if count > MAX_BATCH_RANGES {
                return Err(WireError::TooManyRanges {
                    count: usize::from(count),
                });
            }
            let mut parts = Vec::with_capacity(usize::from(count));
            for _ in 0..count {
                let len = c.u32()? as usize;
                // Bounded by the (checked) payload: Cursor::bytes refuses lengths past its end.
                parts.push(c.bytes(len, "range bytes")?.to_vec());
            }
            Message::Reply(Reply::ReadBatch(parts))
        }
        Op::WriteOk => Message::Reply(Reply::Write),
        Op::LockOk => Message::Reply(Reply::Lock { lock_ns: c.u64()? }),
        Op::UnlockOk => Message::Reply(Reply::Unlock),
        Op::RegsOk => Message::Reply(Reply::Regs(get_regs(&mut c, op)?)),
        Op::RdmaConnectOk => Message::Reply(Reply::RdmaConnect(get_blob(&mut c, op)?)),
        Op::StatusOk => {
            let state = c.u8()?;
            if state > 2 {
                return Err(WireError::Malformed {
                    op: op.name(),
                    what: format!("status state {state} is not 0..=2"),
                });
            }
            Message::Reply(Reply::Status(VmStatus {
                state,
                vcpus: c.u8()?,
                uptime_ms: c.u64()?,
                pauses: c.u64()?,
            }))
        }
        Op::Error => {
            let code = c.u16()?;
            let msg = c.rest();
            check_string(msg, "error message", MAX_ERROR_MESSAGE)?;
            let message = std::str::from_utf8(msg)
                .map_err(|_| WireError::InvalidUtf8 {
                    field: "error message",
                })?
                .to_owned();
            Message::Reply(Reply::Error { code, message })
        }
    };
    c.finish()?;
    Ok(m)
}

fn get_regs(c: &mut Cursor<'_>, op: Op) -> Result<Regs, WireError> {
    let mut v = [0u64; 11];
    for x in &mut v {
        *x = c.u64()?;
    }
    let [rip, rsp, rflags, cr0, cr2, cr3, cr4, efer, fs_base, gs_base, kgs] = v;
    let cpl = c.u8()?;
    let has_kgs = c.u8()?;
    if cpl > 3 {
        return Err(WireError::Malformed {
            op: op.name(),
            what: format!("cpl {cpl} is not 0..=3"),
        });
    }
    let kernel_gs_base = match (has_kgs, kgs) {
        (1, k) => Some(k),
        (0, 0) => None,
        (0, _) => {
            return Err(WireError::Malformed {
                op: op.name(),
                what: "kernel_gs_base is marked absent but not 0".into(),
            })
        }
        (f, _) => {
            return Err(WireError::Malformed {
                op: op.name(),
                what: format!("kernel_gs_base presence byte is {f}, not 0 or 1"),
            })
        }
    };
    Ok(Regs {
        rip,
        rsp,
        rflags,
        cr0,
        cr2,
        cr3,
        cr4,
        efer,
        fs_base,
        gs_base,
        kernel_gs_base,
        cpl,
    })
}
