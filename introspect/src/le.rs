//! Checked little-endian reading: the one reader every parser of untrusted bytes uses (BTF, ELF,
//! the Sensor Box, the bridge's wire format, the verbs connect blob).
//!
//! Nothing here indexes a slice unchecked or panics: a read past the end is `None` (at a fixed
//! offset) or a [`Short`] error (from a [`Cursor`]) that names the field.

/// The bytes ran out before a field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field} needs {need} bytes, only {left} left")]
pub struct Short {
    /// The field being read.
    pub field: &'static str,
    /// Bytes it needs.
    pub need: usize,
    /// Bytes that were left.
    pub left: usize,
    /// Offset of the field from the start of the buffer.
    pub at: usize,
}

/// `N` bytes at `off`, if they are all there.
pub fn array_at<const N: usize>(b: &[u8], off: usize) -> Option<[u8; N]> {
    b.get(off..off.checked_add(N)?)?.try_into().ok()
}

/// A `u16` at `off`.
pub fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    array_at(b, off).map(u16::from_le_bytes)
}

/// A `u32` at `off`.
pub fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    array_at(b, off).map(u32::from_le_bytes)
}

/// A `u64` at `off`.
pub fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    array_at(b, off).map(u64::from_le_bytes)
}

/// Reads fields one after the other.
#[derive(Clone, Debug)]
pub struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    /// At the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Cursor { buf, pos: 0 }
    }

    /// Offset of the next field.
    pub fn pos(&self) -> usize {
        self.pos
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    /// True when everything was read.
    pub fn is_empty(&self) -> bool {
        self.remaining() == 0
    }

    fn short(&self, field: &'static str, need: usize) -> Short {
        Short {
            field,
            need,
            left: self.remaining(),
            at: self.pos,
        }
    }

    /// The next `n` bytes.
    pub fn bytes(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], Short> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| self.short(field, n))?;
        let s = self
            .buf
            .get(self.pos..end)
            .ok_or_else(|| self.short(field, n))?;
        self.pos = end;
        Ok(s)
    }

    /// The next `N` bytes as an array.
    pub fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], Short> {
        let s = self.bytes(N, field)?;
        s.try_into().map_err(|_| self.short(field, N))
    }

    /// A byte.
    pub fn u8(&mut self, field: &'static str) -> Result<u8, Short> {
        Ok(self.array::<1>(field)?[0])
    }

    /// A little-endian `u16`.
    pub fn u16(&mut self, field: &'static str) -> Result<u16, Short> {
        self.array(field).map(u16::from_le_bytes)
    }

    /// A little-endian `u32`.
    pub fn u32(&mut self, field: &'static str) -> Result<u32, Short> {
        self.array(field).map(u32::from_le_bytes)
    }

    /// A little-endian `u64`.
    pub fn u64(&mut self, field: &'static str) -> Result<u64, Short> {
        self.array(field).map(u64::from_le_bytes)
    }

    /// Everything not yet read.
    pub fn rest(&mut self) -> &'a [u8] {
        let s = self.buf.get(self.pos..).unwrap_or_default();
        self.pos = self.buf.len();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_offsets_never_read_past_the_end() {
        let b = [1, 2, 3, 4, 5, 6, 7, 8, 9];
        assert_eq!(u16_at(&b, 0), Some(0x0201));
        assert_eq!(u32_at(&b, 5), Some(0x0908_0706));
        assert_eq!(u32_at(&b, 6), None);
        assert_eq!(u64_at(&b, 1), Some(0x0908_0706_0504_0302));
        assert_eq!(u64_at(&b, 2), None);
        assert_eq!(u16_at(&b, usize::MAX), None);
        assert_eq!(u16_at(&[], 0), None);
    }

    #[test]
    fn a_cursor_reads_in_order_and_names_what_ran_out() {
        let b = [7, 1, 0, 2, 0, 0, 0, 9, 9];
        let mut c = Cursor::new(&b);
        assert_eq!(c.u8("kind"), Ok(7));
        assert_eq!(c.u16("len"), Ok(1));
        assert_eq!(c.u32("id"), Ok(2));
        assert_eq!(c.remaining(), 2);
        let e = c.u32("flags").unwrap_err();
        assert_eq!(
            e,
            Short {
                field: "flags",
                need: 4,
                left: 2,
                at: 7
            }
        );
        assert_eq!(e.to_string(), "flags needs 4 bytes, only 2 left");
        assert_eq!(c.pos(), 7, "a failed read consumes nothing");
        assert_eq!(c.bytes(usize::MAX, "huge").unwrap_err().need, usize::MAX);
        assert_eq!(c.rest(), &[9, 9]);
        assert!(c.is_empty());
        assert_eq!(c.rest(), &[] as &[u8]);
    }
}
