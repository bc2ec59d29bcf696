//! On-disk format, version 2. Everything little-endian.
//!
//! ```text
//! directory
//!   LOG_ID                      32 lowercase hex digits of the log id + "\n"
//!   <first_sequence:020>.wal    segments, contiguous sequences, oldest first
//!   next-segment.tmp            the preallocated spare (removed by open)
//!   LOCK                        advisory lock of the process using the log
//!
//! segment file  <first_sequence:020>.wal, preallocated to segment_size_bytes
//! +----------------------------------------------------------------------+
//! | header (48 bytes)                                                    |
//! |  0 magic "ACCTWAL2" (8)       |  8 version u32 = 2 | 12 reserved u32  |
//! | 16 first_sequence u64         | 24 log_id u128 (16)                   |
//! | 40 reserved u32               | 44 header_crc u32 (crc32 of 0..44)    |
//! +----------------------------------------------------------------------+
//! | record | record | ... | zeros (preallocated, never written) ...      |
//! +----------------------------------------------------------------------+
//!
//! record (8-byte aligned)
//! +-------------+--------+-----------+--------------+-----------+--------+
//! | payload_len | crc32  | sequence  | batch_first  | payload   | pad to |
//! |   u32       |  u32   |   u64     |   u64        | len bytes | 8, 0s  |
//! +-------------+--------+-----------+--------------+-----------+--------+
//! crc32 (crc32fast, IEEE) covers payload_len, sequence, batch_first and
//! payload; the padding must be zeros.
//! ```
//!
//! A `payload_len` of 0 where a record header should be marks the end of the
//! data (the preallocated space is zeros; empty payloads are not allowed). The
//! sequence numbers of all records, across segments, are contiguous.
//!
//! **Sync batches.** `batch_first` is the sequence of the first record of the
//! record's *sync batch*: the records appended between two `Wal::sync` calls.
//! A power loss may persist the pages of the last, unsynced write in any
//! order, leaving a hole followed by valid records of that same batch. Open
//! tells the two cases apart after the last good record `L` of the last
//! segment: valid records after the hole all with `batch_first <= L + 1`
//! belong to the batch with the hole, which was never synced, so the tail is
//! cut there; one with `batch_first > L + 1` was written by a later batch,
//! which is only written after the earlier one was synced, so the hole is
//! damage to durable data: corruption.
//!
//! **Sync batch size.** A sync batch writes at most [`SYNC_BATCH_BYTES_MAX`]
//! bytes into one segment: an append that would pass it syncs first. So a
//! later batch, if there is one, starts within that many bytes after the end
//! of the good records, and nothing past that was ever written: open looks
//! for later records, and cuts a torn tail, in that window only, not in the
//! rest of a preallocated segment.
//!
//! **Roll-over order.** A segment's records are written and synced before the
//! next segment file is installed (header written, synced, renamed into place,
//! directory synced). So every segment but the last is complete and durable
//! whenever its successor exists, and a bad record in it is always
//! corruption, never a torn tail; a batch that straddles a roll-over can only
//! be torn in the last segment.
//!
//! **Deletion order.** Segments are removed oldest first, the directory synced
//! after each, so a crash never leaves a newer segment deleted and an older
//! one present (which would open as a sequence gap).
//!
//! **Log identity.** `log_id` is random, drawn once per log; every segment
//! header carries it and `LOG_ID` keeps it while the log has no segment, so a
//! segment of another log is refused at open.

pub const MAGIC: &[u8; 8] = b"ACCTWAL2";
/// The magic of format version 1, recognised only to refuse it clearly.
pub const MAGIC_V1: &[u8; 8] = b"ACCTWAL1";
pub const VERSION: u32 = 2;
pub const SEGMENT_HEADER_LEN: usize = 48;
/// Offset of `log_id` in the segment header (named by identity errors).
pub const LOG_ID_OFFSET: usize = 24;
pub const RECORD_HEADER_LEN: usize = 24;
pub const ALIGN: usize = 8;
/// Most bytes one sync batch writes into one segment (see "Sync batch size").
/// Part of the format: a change needs a new version.
pub const SYNC_BATCH_BYTES_MAX: usize = 4 << 20;
/// Bytes of the `LOG_ID` file: 32 hex digits and a newline.
pub const LOG_ID_FILE_LEN: usize = 33;

/// Bytes a record with `payload_len` bytes of payload occupies.
pub fn record_len(payload_len: usize) -> usize {
    (RECORD_HEADER_LEN + payload_len).div_ceil(ALIGN) * ALIGN
}

/// What a valid segment header holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    pub first_sequence: u64,
    pub log_id: u128,
}

/// Why a segment header was not accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderError {
    /// Torn or damaged: wrong magic, checksum or length.
    Invalid(&'static str),
    /// A well-formed header of a format this code does not read.
    UnsupportedVersion(u32),
}

pub fn segment_header(header: SegmentHeader) -> [u8; SEGMENT_HEADER_LEN] {
    let mut h = [0u8; SEGMENT_HEADER_LEN];
    h[0..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&header.first_sequence.to_le_bytes());
    h[LOG_ID_OFFSET..LOG_ID_OFFSET + 16].copy_from_slice(&header.log_id.to_le_bytes());
    let crc = crc32fast::hash(&h[0..44]);
    h[44..48].copy_from_slice(&crc.to_le_bytes());
    h
}

pub fn parse_segment_header(h: &[u8]) -> Result<SegmentHeader, HeaderError> {
    let version = h.get(8..12).map(|v| u32_at(v, 0));
    if h.get(0..8) == Some(MAGIC_V1) {
        return Err(HeaderError::UnsupportedVersion(version.unwrap_or(1)));
    }
    if h.len() < SEGMENT_HEADER_LEN {
        return Err(HeaderError::Invalid("segment header truncated"));
    }
    if &h[0..8] != MAGIC {
        return Err(HeaderError::Invalid("bad segment magic"));
    }
    if u32_at(h, 44) != crc32fast::hash(&h[0..44]) {
        return Err(HeaderError::Invalid("segment header checksum mismatch"));
    }
    if u32_at(h, 8) != VERSION {
        return Err(HeaderError::UnsupportedVersion(u32_at(h, 8)));
    }
    Ok(SegmentHeader {
        first_sequence: u64_at(h, 16),
        log_id: u128::from_le_bytes(array(&h[LOG_ID_OFFSET..])),
    })
}

pub fn record_crc(payload_len: u32, sequence: u64, batch_first: u64, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&payload_len.to_le_bytes());
    hasher.update(&sequence.to_le_bytes());
    hasher.update(&batch_first.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

/// Writes one framed record at the start of `out` (which must be large enough).
pub fn write_record(out: &mut [u8], sequence: u64, batch_first: u64, payload: &[u8]) -> usize {
    let len = record_len(payload.len());
    debug_assert!(out.len() >= len);
    debug_assert!(!payload.is_empty());
    debug_assert!(
        batch_first <= sequence,
        "a batch starts at or before its records"
    );
    let payload_len = payload.len() as u32;
    let crc = record_crc(payload_len, sequence, batch_first, payload);
    out[0..4].copy_from_slice(&payload_len.to_le_bytes());
    out[4..8].copy_from_slice(&crc.to_le_bytes());
    out[8..16].copy_from_slice(&sequence.to_le_bytes());
    out[16..24].copy_from_slice(&batch_first.to_le_bytes());
    let end = RECORD_HEADER_LEN + payload.len();
    out[RECORD_HEADER_LEN..end].copy_from_slice(payload);
    out[end..len].fill(0);
    len
}

/// What is found at an offset of a segment's data.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A valid record and the bytes it occupies.
    Record {
        sequence: u64,
        batch_first: u64,
        payload: &'a [u8],
        len: usize,
    },
    /// Zeros: the end of the written data.
    End,
    /// Something that is neither: a torn write or corruption.
    Bad(&'static str),
}

/// Decodes the frame at the start of `data`, accepting payloads up to `payload_max`.
pub fn read_frame(data: &[u8], payload_max: u32) -> Frame<'_> {
    if data.len() < RECORD_HEADER_LEN {
        return if data.iter().all(|b| *b == 0) {
            Frame::End
        } else {
            Frame::Bad("truncated record header")
        };
    }
    let payload_len = u32_at(data, 0);
    if payload_len == 0 {
        return if data[..RECORD_HEADER_LEN].iter().all(|b| *b == 0) {
            Frame::End
        } else {
            Frame::Bad("zero length with a non-zero header")
        };
    }
    if payload_len > payload_max {
        return Frame::Bad("length over the record size limit");
    }
    let len = record_len(payload_len as usize);
    if len > data.len() {
        return Frame::Bad("record runs past the end of the segment");
    }
    let sequence = u64_at(data, 8);
    let batch_first = u64_at(data, 16);
    let payload_end = RECORD_HEADER_LEN + payload_len as usize;
    let payload = &data[RECORD_HEADER_LEN..payload_end];
    if u32_at(data, 4) != record_crc(payload_len, sequence, batch_first, payload) {
        return Frame::Bad("checksum mismatch");
    }
    if data[payload_end..len].iter().any(|b| *b != 0) {
        return Frame::Bad("non-zero padding");
    }
    if batch_first > sequence {
        return Frame::Bad("batch starts after its record");
    }
    Frame::Record {
        sequence,
        batch_first,
        payload,
        len,
    }
}

/// The `LOG_ID` file's contents for `log_id`.
pub fn log_id_file(log_id: u128) -> [u8; LOG_ID_FILE_LEN] {
    let mut out = [b'\n'; LOG_ID_FILE_LEN];
    out[..32].copy_from_slice(format!("{log_id:032x}").as_bytes());
    out
}

/// Parses a `LOG_ID` file; `None` unless it is exactly 32 hex digits and a newline.
pub fn parse_log_id_file(bytes: &[u8]) -> Option<u128> {
    let digits = bytes.strip_suffix(b"\n")?;
    if digits.len() != 32 || !digits.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    u128::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
}

fn array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes[..N]);
    out
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(array(&bytes[at..]))
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(array(&bytes[at..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trip() {
        let mut buf = [0u8; 64];
        let len = write_record(&mut buf, 7, 5, b"hello");
        assert_eq!(len, 32);
        assert_eq!(
            read_frame(&buf, 1024),
            Frame::Record {
                sequence: 7,
                batch_first: 5,
                payload: b"hello",
                len: 32
            }
        );
        assert_eq!(read_frame(&buf[len..], 1024), Frame::End);
        let mut bad = buf;
        bad[17] ^= 1; // batch_first
        assert_eq!(read_frame(&bad, 1024), Frame::Bad("checksum mismatch"));
        buf[25] ^= 1; // payload
        assert_eq!(read_frame(&buf, 1024), Frame::Bad("checksum mismatch"));
    }

    #[test]
    fn header_round_trip() {
        let header = SegmentHeader {
            first_sequence: 42,
            log_id: 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210,
        };
        let h = segment_header(header);
        assert_eq!(parse_segment_header(&h), Ok(header));
        for at in [20, 30] {
            let mut bad = h;
            bad[at] ^= 1;
            assert!(matches!(
                parse_segment_header(&bad),
                Err(HeaderError::Invalid(_))
            ));
        }
    }

    #[test]
    fn version_1_is_recognised() {
        let mut v1 = [0u8; 32];
        v1[0..8].copy_from_slice(MAGIC_V1);
        v1[8..12].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(
            parse_segment_header(&v1),
            Err(HeaderError::UnsupportedVersion(1))
        );
    }

    #[test]
    fn log_id_file_round_trip() {
        let id = u128::MAX - 5;
        let file = log_id_file(id);
        assert_eq!(file.len(), 33);
        assert_eq!(parse_log_id_file(&file), Some(id));
        assert_eq!(parse_log_id_file(&file[..32]), None);
        assert_eq!(parse_log_id_file(b"xyz\n"), None);
    }
}
