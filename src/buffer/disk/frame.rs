//! Reading records back from a segment file: a reader that knows its offset, what lies
//! at an offset ([`Frame`]: a record that verifies, a partial tail, or corruption), and
//! finding the next record after corruption.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use bytes::Bytes;

use super::{READ_BUFFER, RESYNC_CHUNK};
use crate::buffer::codec::{self, Header, HEADER_LEN, MAGIC};

/// A buffered reader over one segment that knows its own file offset, so moving to the
/// next record is free and a jump costs one seek.
pub(super) struct SegmentReader {
    pub(super) segment: u64,
    pub(super) file: BufReader<File>,
    /// File offset of the next byte `file` returns; None after an error.
    pub(super) pos: Option<u64>,
}

impl SegmentReader {
    pub(super) fn open(path: &Path, segment: u64) -> io::Result<Self> {
        Ok(SegmentReader {
            segment,
            file: BufReader::with_capacity(READ_BUFFER, File::open(path)?),
            pos: Some(0),
        })
    }

    pub(super) fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let current = self.pos.take();
        match current.map(|p| {
            i64::try_from(offset)
                .ok()?
                .checked_sub(i64::try_from(p).ok()?)
        }) {
            Some(Some(0)) => {}
            Some(Some(delta)) => self.file.seek_relative(delta)?,
            _ => {
                self.file.seek(SeekFrom::Start(offset))?;
            }
        }
        self.file.read_exact(buf)?;
        self.pos = Some(offset + buf.len() as u64);
        Ok(())
    }
}

/// What lies at an offset of a segment.
pub(super) enum Frame {
    /// A record whose checksum verifies.
    Valid { seq: u64, len: u64, body: Bytes },
    /// The segment ends inside the header, or inside a body whose header looks right.
    Partial,
    /// Bad magic or length (`complete: false`), or a complete record whose checksum does
    /// not match (`complete: true`).
    Corrupt { complete: bool },
}

pub(super) fn read_frame(
    reader: &mut SegmentReader,
    offset: u64,
    limit: u64,
    max_body: u64,
) -> io::Result<Frame> {
    if limit.saturating_sub(offset) < HEADER_LEN as u64 {
        return Ok(Frame::Partial);
    }
    let mut header = [0; HEADER_LEN];
    match reader.read_at(offset, &mut header) {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Frame::Partial),
        other => other?,
    }
    let header = Header::parse(&header);
    if header.magic != MAGIC || u64::from(header.body_len) > max_body {
        return Ok(Frame::Corrupt { complete: false });
    }
    let len = HEADER_LEN as u64 + u64::from(header.body_len);
    if len > limit - offset {
        return Ok(Frame::Partial);
    }
    let mut body = vec![0; header.body_len as usize];
    match reader.read_at(offset + HEADER_LEN as u64, &mut body) {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Frame::Partial),
        other => other?,
    }
    if crc32c::crc32c(&body) != header.crc {
        return Ok(Frame::Corrupt { complete: true });
    }
    match codec::body_seq(&body) {
        Some(seq) => Ok(Frame::Valid {
            seq,
            len,
            body: Bytes::from(body),
        }),
        None => Ok(Frame::Corrupt { complete: true }),
    }
}

/// Finds the first offset at or after `from` (below `limit`) holding a record that
/// verifies and whose seq lies in `min_seq..end_seq`; returns it with that seq.
pub(super) fn resync(
    reader: &mut SegmentReader,
    from: u64,
    limit: u64,
    max_body: u64,
    min_seq: u64,
    end_seq: u64,
) -> io::Result<Option<(u64, u64)>> {
    let magic = MAGIC.to_le_bytes();
    let mut chunk = vec![0; RESYNC_CHUNK];
    let mut start = from;
    while limit.saturating_sub(start) >= HEADER_LEN as u64 {
        // Bounded by RESYNC_CHUNK, so it fits in usize.
        let n = (limit - start).min(RESYNC_CHUNK as u64) as usize;
        match reader.read_at(start, &mut chunk[..n]) {
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            other => other?,
        }
        let candidates: Vec<u64> = chunk[..n]
            .windows(magic.len())
            .enumerate()
            .filter(|(_, window)| *window == magic)
            .map(|(i, _)| start + i as u64)
            .collect();
        for at in candidates {
            if let Frame::Valid { seq, .. } = read_frame(reader, at, limit, max_body)? {
                if (min_seq..end_seq).contains(&seq) {
                    return Ok(Some((at, seq)));
                }
            }
        }
        // Overlap by three bytes so a magic split across two windows is still seen.
        start += (n - (magic.len() - 1)) as u64;
    }
    Ok(None)
}
