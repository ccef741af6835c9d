//! virtio-blk on a raw image file.
//!
//! One request queue. Supported requests: IN, OUT, FLUSH and GET_ID; anything else is answered
//! UNSUPP. A read-only disk advertises `VIRTIO_BLK_F_RO` and answers IOERR to every write.
//!
//! The image is locked for the device's lifetime with `flock`: exclusively when writable, shared
//! when read-only. So, like QEMU's image locking, a second bdvmm cannot open an image another one
//! writes, and cannot open for writing an image others read. The lock is advisory and whole-file;
//! QEMU's own locks are OFD byte-range locks, which Linux keeps apart from `flock`, so bdvmm and
//! QEMU do not see each other's locks.
//!
//! Every chain is hostile until proven otherwise: it must end (no loop, no `next` past the
//! table), it must hold a 16-byte header in device-readable buffers followed by device-writable
//! buffers ending in the status byte, each buffer must lie wholly in guest RAM, no buffer may be
//! empty, and the data may not exceed [`MAX_REQUEST_BYTES`]. A chain that breaks a rule is answered
//! IOERR when it has a writable status byte, and otherwise returned to the guest with nothing
//! written; it never stops the queue.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::mmio::{QueueError, VirtioDevice};
use introspect::conv::usize_from;

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Largest data segment the driver may use, advertised as `size_max`. Without it Linux's segments
/// are unbounded and a guest that raises `max_sectors_kb` could send requests larger than
/// [`MAX_REQUEST_BYTES`].
pub const SIZE_MAX: u32 = 128 << 10;
/// Data segments per request, advertised as `seg_max`: the queue less header and status.
pub const SEG_MAX: u32 = 254;
/// Most data bytes one request may move. A driver that keeps to `seg_max` and `size_max` never
/// sends more (a unit test checks); longer chains are answered IOERR.
pub const MAX_REQUEST_BYTES: u64 = 32 << 20;
/// Largest bounce buffer used to copy between the image and guest RAM.
const CHUNK: usize = 64 << 10;
/// Size of the request header (`struct virtio_blk_outhdr`).
const HEADER_BYTES: u64 = 16;
/// Length of the GET_ID answer (`VIRTIO_BLK_ID_BYTES`).
const ID_BYTES: usize = 20;

/// Why a disk could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// open(2) failed.
    #[error("cannot open disk image {0}: {1}")]
    Open(PathBuf, io::Error),
    /// Someone else holds a conflicting lock.
    #[error("disk image {0} is in use by another VM (locked{1}); stop it, or give ,ro to both")]
    Locked(PathBuf, &'static str),
    /// flock(2) failed for another reason.
    #[error("cannot lock disk image {0}: {1}")]
    Lock(PathBuf, io::Error),
    /// The image is not a regular file or is too small.
    #[error("disk image {0} is not usable: {1}")]
    Unusable(PathBuf, &'static str),
}

/// One virtio-blk device.
pub struct Block {
    file: File,
    read_only: bool,
    capacity_sectors: u64,
    id: [u8; ID_BYTES],
    max_sizes: [u16; 1],
}

/// A device-visible buffer of a chain, checked against guest RAM.
#[derive(Clone, Copy, Debug)]
struct Segment {
    addr: GuestAddress,
    len: u64,
}

/// Where a chain went wrong.
#[derive(Debug, PartialEq, Eq)]
enum Malformed {
    /// Ended by a `next` past the table or a loop, or longer than the queue.
    Unterminated,
    /// A zero-length buffer.
    Empty,
    /// A buffer outside guest RAM.
    OutOfRange,
    /// A readable buffer after a writable one.
    Order,
    /// No header or no status byte.
    Short,
    /// More data than [`MAX_REQUEST_BYTES`].
    TooLong,
}

/// A validated chain: readable buffers, writable buffers (the last byte of which is status).
struct Chain {
    readable: Vec<Segment>,
    writable: Vec<Segment>,
}

impl Block {
    /// Opens and locks `path`. `read_only` opens it O_RDONLY with a shared lock.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| BlockError::Open(path.to_owned(), e))?;
        let op = if read_only {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        };
        // SAFETY: flock on a valid fd owned by `file`; no memory is passed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                BlockError::Locked(
                    path.to_owned(),
                    if read_only {
                        " for writing"
                    } else {
                        " for reading or writing"
                    },
                )
            } else {
                BlockError::Lock(path.to_owned(), e)
            });
        }
        let meta = file
            .metadata()
            .map_err(|e| BlockError::Open(path.to_owned(), e))?;
        let bytes = if meta.file_type().is_file() {
            meta.len()
        } else if meta.file_type().is_block_device() {
            // A block device's size is where its end is.
            (&file)
                .seek(SeekFrom::End(0))
                .map_err(|e| BlockError::Open(path.to_owned(), e))?
        } else {
            return Err(BlockError::Unusable(
                path.to_owned(),
                "neither a regular file nor a block device (give a raw image file)",
            ));
        };
        let capacity_sectors = bytes / SECTOR_SIZE;
        if capacity_sectors == 0 {
            return Err(BlockError::Unusable(
                path.to_owned(),
                "smaller than one 512-byte sector",
            ));
        }
        // The serial GET_ID answers: stable for one image file on one host.
        let mut id = [0u8; ID_BYTES];
        let serial = format!("bdvmm{:x}", meta.ino());
        let n = serial.len().min(id.len());
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        Ok(Self {
            file,
            read_only,
            capacity_sectors,
            id,
            max_sizes: [QUEUE_SIZE],
        })
    }

    /// Capacity in 512-byte sectors (a trailing partial sector is not exposed).
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    /// Whether the disk is read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The configuration space (`struct virtio_blk_config` up to `seg_max`; the fields after it
    /// read as zero, which is what a driver that did not negotiate them ignores).
    fn config(&self) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[..8].copy_from_slice(&self.capacity_sectors.to_le_bytes());
        c[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c
    }

    /// Walks a chain and checks it against the rules in the module docs.
    fn validate<I>(mem: &GuestMemoryMmap, descriptors: I) -> Result<Chain, Malformed>
    where
        I: Iterator<Item = virtio_queue::desc::split::Descriptor>,
    {
        let mut chain = Chain {
            readable: Vec::new(),
            writable: Vec::new(),
        };
        let mut terminated = false;
        let mut total: u64 = 0;
        for d in descriptors {
            // The iterator stops silently at a `next` past the table and after queue-size
            // descriptors (so a loop ends); either way the last one it gave still says NEXT.
            terminated = !d.has_next();
            let len = u64::from(d.len());
            if len == 0 {
                return Err(Malformed::Empty);
            }
            if !GuestMemoryBackend::check_range(mem, d.addr(), usize_from(len)) {
                return Err(Malformed::OutOfRange);
            }
            total = total.saturating_add(len);
            if total > MAX_REQUEST_BYTES + HEADER_BYTES + 1 {
                return Err(Malformed::TooLong);
            }
            let seg = Segment {
                addr: d.addr(),
                len,
            };
            if d.is_write_only() {
                chain.writable.push(seg);
            } else if chain.writable.is_empty() {
                chain.readable.push(seg);
            } else {
                return Err(Malformed::Order);
            }
        }
        if !terminated {
            return Err(Malformed::Unterminated);
        }
        if chain.writable.is_empty() {
            return Err(Malformed::Short);
        }
        Ok(chain)
    }

    /// Handles one validated chain; returns the status and the bytes written to the guest before
    /// the status byte.
    fn execute(&self, mem: &GuestMemoryMmap, chain: &Chain) -> (u32, u64) {
        let Some((kind, sector)) = read_header(mem, &chain.readable) else {
            return (VIRTIO_BLK_S_IOERR, 0);
        };
        let mut data_in = chain.writable.clone();
        // The last writable byte is the status; trim it from the data buffers.
        if let Some(last) = data_in.last_mut() {
            last.len -= 1;
            if last.len == 0 {
                data_in.pop();
            }
        }
        let data_out = skip(&chain.readable, HEADER_BYTES);
        match kind {
            VIRTIO_BLK_T_IN => {
                if !data_out.is_empty() {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                match self.transfer(mem, &data_in, sector, Direction::ToGuest) {
                    Ok(n) => (VIRTIO_BLK_S_OK, n),
                    Err(_) => (VIRTIO_BLK_S_IOERR, 0),
                }
            }
            VIRTIO_BLK_T_OUT => {
                if self.read_only || !data_in.is_empty() {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                match self.transfer(mem, &data_out, sector, Direction::ToImage) {
                    Ok(_) => (VIRTIO_BLK_S_OK, 0),
                    Err(_) => (VIRTIO_BLK_S_IOERR, 0),
                }
            }
            VIRTIO_BLK_T_FLUSH => {
                if self.read_only || self.file.sync_data().is_ok() {
                    (VIRTIO_BLK_S_OK, 0)
                } else {
                    (VIRTIO_BLK_S_IOERR, 0)
                }
            }
            VIRTIO_BLK_T_GET_ID => {
                let mut written = 0u64;
                let mut id: &[u8] = &self.id;
                for seg in &data_in {
                    if id.is_empty() {
                        break;
                    }
                    let n = usize_from(seg.len).min(id.len());
                    if mem.write_slice(&id[..n], seg.addr).is_err() {
                        return (VIRTIO_BLK_S_IOERR, 0);
                    }
                    id = &id[n..];
                    written += u64::try_from(n).unwrap_or(0);
                }
                (VIRTIO_BLK_S_OK, written)
            }
            _ => (VIRTIO_BLK_S_UNSUPP, 0),
        }
    }

    /// Copies between the image at `sector` and the guest buffers `segs`, after checking the
    /// whole range is inside the disk.
    fn transfer(
        &self,
        mem: &GuestMemoryMmap,
        segs: &[Segment],
        sector: u64,
        dir: Direction,
    ) -> io::Result<u64> {
        let total: u64 = segs.iter().map(|s| s.len).sum();
        let out_of_disk = || io::Error::new(io::ErrorKind::InvalidInput, "beyond the disk");
        if total % SECTOR_SIZE != 0 || total > MAX_REQUEST_BYTES {
            return Err(out_of_disk());
        }
        let start = sector.checked_mul(SECTOR_SIZE).ok_or_else(out_of_disk)?;
        let end = start.checked_add(total).ok_or_else(out_of_disk)?;
        if end > self.capacity_sectors * SECTOR_SIZE {
            return Err(out_of_disk());
        }
        let mut pos = start;
        let mut buf = vec![0u8; CHUNK.min(usize_from(total))];
        for seg in segs {
            let mut done = 0u64;
            while done < seg.len {
                let n = usize_from(seg.len - done).min(CHUNK);
                let chunk = &mut buf[..n];
                let gpa = GuestAddress(seg.addr.0 + done);
                match dir {
                    Direction::ToGuest => {
                        self.file.read_exact_at(chunk, pos)?;
                        mem.write_slice(chunk, gpa).map_err(io::Error::other)?;
                    }
                    Direction::ToImage => {
                        mem.read_slice(chunk, gpa).map_err(io::Error::other)?;
                        self.file.write_all_at(chunk, pos)?;
                    }
                }
                let n = u64::try_from(n).unwrap_or(0);
                done += n;
                pos += n;
            }
        }
        Ok(total)
    }
}

#[derive(Clone, Copy)]
enum Direction {
    ToGuest,
    ToImage,
}

/// Reads the 16-byte header from the start of the readable buffers.
fn read_header(mem: &GuestMemoryMmap, readable: &[Segment]) -> Option<(u32, u64)> {
    let mut hdr = [0u8; 16];
    let mut got = 0usize;
    for seg in readable {
        if got == hdr.len() {
            break;
        }
        let n = usize_from(seg.len).min(hdr.len() - got);
        mem.read_slice(&mut hdr[got..got + n], seg.addr).ok()?;
        got += n;
    }
    if got < hdr.len() {
        return None;
    }
    let kind = u32::from_le_bytes(hdr[0..4].try_into().ok()?);
    let sector = u64::from_le_bytes(hdr[8..16].try_into().ok()?);
    Some((kind, sector))
}

/// Writes a status byte; false if `addr` is not in guest RAM.
fn write_status(mem: &GuestMemoryMmap, addr: GuestAddress, status: u32) -> bool {
    mem.write_obj(u8::try_from(status).unwrap_or(u8::MAX), addr)
        .is_ok()
}

/// The buffers left after the first `n` bytes.
fn skip(segs: &[Segment], mut n: u64) -> Vec<Segment> {
    let mut out = Vec::new();
    for seg in segs {
        if n >= seg.len {
            n -= seg.len;
            continue;
        }
        out.push(Segment {
            addr: GuestAddress(seg.addr.0 + n),
            len: seg.len - n,
        });
        n = 0;
    }
    out
}

impl VirtioDevice for Block {
    type ActivateError = std::convert::Infallible;

    fn device_id(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn device_features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_SIZE_MAX);
        if self.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.max_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config();
        for (i, byte) in data.iter_mut().enumerate() {
            let at = u64::try_from(i)
                .ok()
                .and_then(|i| offset.checked_add(i))
                .and_then(|o| usize::try_from(o).ok());
            *byte = at.and_then(|o| config.get(o)).copied().unwrap_or(0);
        }
    }

    fn process_queue(
        &mut self,
        _index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, QueueError> {
        // One pass over what is available now. Without EVENT_IDX the driver notifies again for
        // chains it adds later, so a guest that keeps adding cannot hold this thread forever.
        let chains: Vec<_> = queue
            .iter(mem)
            .map_err(QueueError::Ring)?
            .map(|chain| (chain.head_index(), chain.collect::<Vec<_>>()))
            .collect();
        let completed = !chains.is_empty();
        for (head, descriptors) in chains {
            let used_len = match Self::validate(mem, descriptors.iter().copied()) {
                Ok(chain) => {
                    let (status, written) = self.execute(mem, &chain);
                    // Validated: the last writable buffer exists, is not empty and lies in RAM.
                    let status_seg = chain.writable[chain.writable.len() - 1];
                    let status_addr = GuestAddress(status_seg.addr.0 + status_seg.len - 1);
                    if write_status(mem, status_addr, status) {
                        written + 1
                    } else {
                        0
                    }
                }
                Err(why) => {
                    tracing::debug!("virtio-blk: malformed chain at {head}: {why:?}");
                    // Answer IOERR if the chain's last buffer can hold a status byte; a chain
                    // that never ended has no trustworthy last buffer.
                    match descriptors.last() {
                        Some(d)
                            if why != Malformed::Unterminated
                                && d.is_write_only()
                                && d.len() > 0
                                && write_status(
                                    mem,
                                    GuestAddress(d.addr().0.saturating_add(u64::from(d.len()) - 1)),
                                    VIRTIO_BLK_S_IOERR,
                                ) =>
                        {
                            1
                        }
                        _ => 0,
                    }
                }
            };
            let used_len = u32::try_from(used_len).unwrap_or(u32::MAX);
            queue
                .add_used(mem, head, used_len)
                .map_err(QueueError::Used)?;
        }
        Ok(completed)
    }
}
