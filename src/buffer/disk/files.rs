//! The log's files: segment names, listing them, the position file, cutting a torn tail
//! at recovery, and retiring segments (deleted when every record was acked, kept aside as
//! `*.corrupt` when damaged, at most a bounded number of those).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use tracing::warn;

use super::frame::{read_frame, resync, Frame, SegmentReader};
use super::{
    CorruptFiles, Recovery, Segment, CORRUPT_SUFFIX, POSITION_FILE, POSITION_LEN, SEGMENT_SUFFIX,
};

pub(super) fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{first_seq:020}{SEGMENT_SUFFIX}"))
}

pub(super) fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Segment files in `dir` by first seq; other files (`*.corrupt`, `*.tmp`, ...) are
/// not the log's.
pub(super) fn list_segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut segments = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(digits) = name.to_str().and_then(|n| n.strip_suffix(SEGMENT_SUFFIX)) else {
            continue;
        };
        if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Ok(first_seq) = digits.parse::<u64>() {
            segments.push((first_seq, entry.path()));
        }
    }
    segments.sort_unstable_by_key(|(first_seq, _)| *first_seq);
    Ok(segments)
}

/// The saved floor; None when missing or unreadable (a bad file is moved aside).
pub(super) fn read_position(dir: &Path, recovery: &mut Recovery) -> Option<u64> {
    let path = dir.join(POSITION_FILE);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot read the buffer position; starting from the oldest segment");
            return None;
        }
    };
    if let Ok(bytes) = <[u8; POSITION_LEN]>::try_from(bytes.as_slice()) {
        let (floor, crc) = bytes.split_at(8);
        if crc32c::crc32c(floor) == u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]) {
            let mut value = [0; 8];
            value.copy_from_slice(floor);
            return Some(u64::from_le_bytes(value));
        }
    }
    let aside = with_suffix(&path, CORRUPT_SUFFIX);
    warn!(path = %path.display(), "buffer position file is corrupt; starting from the oldest segment");
    match fs::rename(&path, &aside) {
        Ok(()) => recovery.renamed.push(aside),
        // The next save replaces it anyway.
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot move the corrupt position file aside")
        }
    }
    None
}

/// Verifies the last segment record by record and cuts off a tail that does not verify;
/// returns the seq after its last record.
pub(super) fn recover_tail(
    segment: &mut Segment,
    max_body: u64,
    recovery: &mut Recovery,
) -> io::Result<u64> {
    let mut reader = SegmentReader::open(&segment.path, segment.first_seq)?;
    let len = segment.bytes;
    let mut offset = 0;
    let mut next_seq = segment.first_seq;
    while offset < len {
        let frame = read_frame(&mut reader, offset, len, max_body)?;
        if let Frame::Valid {
            seq,
            len: record_len,
            ..
        } = frame
        {
            if seq >= next_seq {
                // A gap means records in between were lost: reads count them later.
                segment.damaged |= seq > next_seq;
                offset += record_len;
                next_seq = seq + 1;
                continue;
            }
        }
        if let Some((at, _)) = resync(&mut reader, offset + 1, len, max_body, next_seq, u64::MAX)? {
            // Damage in the middle, intact records after it: keep them; reads skip it.
            segment.damaged = true;
            offset = at;
            continue;
        }
        let complete = matches!(
            frame,
            Frame::Corrupt { complete: true } | Frame::Valid { .. }
        );
        if !complete {
            recovery.torn_records += 1;
        }
        if complete {
            recovery.corrupt_records += 1;
            let aside = with_suffix(&segment.path, &format!(".{offset}{CORRUPT_SUFFIX}"));
            let mut source = File::open(&segment.path)?;
            source.seek(SeekFrom::Start(offset))?;
            let mut target = File::create(&aside)?;
            io::copy(&mut source.take(len - offset), &mut target)?;
            warn!(path = %segment.path.display(), offset, kept = %aside.display(), "corrupt record at the end of the buffer; cutting it off");
            recovery.renamed.push(aside);
        }
        let file = OpenOptions::new().write(true).open(&segment.path)?;
        file.set_len(offset)?;
        file.sync_all()?;
        recovery.truncated_bytes += len - offset;
        segment.bytes = offset;
        break;
    }
    Ok(next_seq)
}

/// Deletes a segment file, or renames it `*.corrupt` when it held corrupt records;
/// returns the new name in that case.
pub(super) fn retire(segment: &Segment) -> io::Result<Option<PathBuf>> {
    if segment.damaged {
        let aside = with_suffix(&segment.path, CORRUPT_SUFFIX);
        fs::rename(&segment.path, &aside)?;
        warn!(path = %aside.display(), "buffer segment with corrupt records moved aside");
        return Ok(Some(aside));
    }
    match fs::remove_file(&segment.path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(None),
    }
}

/// Keeps the newest `*.corrupt` files of `dir` (by modification time, then name) within
/// `(max_files, max_bytes)` and deletes the rest, oldest first. The files are kept for
/// inspection only, so a failure here is logged and otherwise ignored (a file that could
/// not be deleted still counts as kept).
pub(super) fn prune_corrupt(dir: &Path, (max_files, max_bytes): (usize, u64)) -> CorruptFiles {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            warn!(dir = %dir.display(), error = %e, "cannot list the buffer directory to prune old .corrupt files");
            return CorruptFiles::default();
        }
    };
    let mut files: Vec<(SystemTime, PathBuf, u64)> = entries
        .filter_map(Result::ok)
        .filter(|entry| {
            entry
                .file_name()
                .to_str()
                .is_some_and(|name| name.ends_with(CORRUPT_SUFFIX))
        })
        .map(|entry| {
            let meta = entry.metadata().ok();
            let modified = meta
                .as_ref()
                .and_then(|m| m.modified().ok())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            (modified, entry.path(), meta.map_or(0, |m| m.len()))
        })
        .collect();
    // Newest first.
    files.sort_by(|a, b| (&b.0, &b.1).cmp(&(&a.0, &a.1)));
    let mut kept = CorruptFiles::default();
    for (_, path, len) in files {
        if kept.files < max_files && kept.bytes + len <= max_bytes {
            kept.files += 1;
            kept.bytes += len;
            continue;
        }
        match fs::remove_file(&path) {
            Ok(()) => {
                kept.deleted += 1;
                warn!(path = %path.display(), max_files, max_bytes, "deleted an old .corrupt file: only the newest are kept");
            }
            Err(e) => {
                warn!(path = %path.display(), error = %e, "cannot delete an old .corrupt file");
                kept.files += 1;
                kept.bytes += len;
            }
        }
    }
    kept
}
