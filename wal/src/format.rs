//! On-disk format. Everything little-endian.
//!
//! ```text
//! segment file  <first_sequence:020>.wal, preallocated to segment_size_bytes
//! +----------------------------------------------------------------------+
//! | header (32 bytes)                                                    |
//! |   magic "ACCTWAL1" (8) | version u32 | reserved u32 |                |
//! |   first_sequence u64   | reserved u32 | header_crc u32 (of bytes 0..28)|
//! +----------------------------------------------------------------------+
//! | record | record | ... | zeros (preallocated, never written) ...      |
//! +----------------------------------------------------------------------+
//!
//! record (8-byte aligned)
//! +-------------+-----------+--------------+-------------------+---------+
//! | payload_len | crc32     | sequence     | payload           | pad to 8|
//! |   u32       |   u32     |   u64        | payload_len bytes |  zeros  |
//! +-------------+-----------+--------------+-------------------+---------+
//! crc32 covers payload_len, sequence and payload (crc32fast, IEEE); the
//! padding must be zeros.
//! ```
//!
//! A `payload_len` of 0 where a record header should be marks the end of the
//! data (the preallocated space is zeros; empty payloads are not allowed). The
//! sequence numbers of all records, across segments, are contiguous.

pub const MAGIC: &[u8; 8] = b"ACCTWAL1";
pub const VERSION: u32 = 1;
pub const SEGMENT_HEADER_LEN: usize = 32;
pub const RECORD_HEADER_LEN: usize = 16;
pub const ALIGN: usize = 8;

/// Bytes a record with `payload_len` bytes of payload occupies.
pub fn record_len(payload_len: usize) -> usize {
    (RECORD_HEADER_LEN + payload_len).div_ceil(ALIGN) * ALIGN
}

pub fn segment_header(first_sequence: u64) -> [u8; SEGMENT_HEADER_LEN] {
    let mut h = [0u8; SEGMENT_HEADER_LEN];
    h[0..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&first_sequence.to_le_bytes());
    let crc = crc32fast::hash(&h[0..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

/// The first sequence of a segment header, or `None` if the header is invalid.
pub fn parse_segment_header(h: &[u8]) -> Option<u64> {
    if h.len() < SEGMENT_HEADER_LEN || &h[0..8] != MAGIC {
        return None;
    }
    let crc = u32::from_le_bytes(h[28..32].try_into().ok()?);
    if crc != crc32fast::hash(&h[0..28]) {
        return None;
    }
    if u32::from_le_bytes(h[8..12].try_into().ok()?) != VERSION {
        return None;
    }
    Some(u64::from_le_bytes(h[16..24].try_into().ok()?))
}

pub fn record_crc(payload_len: u32, sequence: u64, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&payload_len.to_le_bytes());
    hasher.update(&sequence.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

/// Writes one framed record at the start of `out` (which must be large enough).
pub fn write_record(out: &mut [u8], sequence: u64, payload: &[u8]) -> usize {
    let len = record_len(payload.len());
    debug_assert!(out.len() >= len);
    debug_assert!(!payload.is_empty());
    let payload_len = payload.len() as u32;
    out[0..4].copy_from_slice(&payload_len.to_le_bytes());
    out[4..8].copy_from_slice(&record_crc(payload_len, sequence, payload).to_le_bytes());
    out[8..16].copy_from_slice(&sequence.to_le_bytes());
    out[16..16 + payload.len()].copy_from_slice(payload);
    out[16 + payload.len()..len].fill(0);
    len
}

/// What is found at an offset of a segment's data.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A valid record and the bytes it occupies.
    Record {
        sequence: u64,
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
    let payload_len = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
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
    let crc = u32::from_le_bytes([data[4], data[5], data[6], data[7]]);
    let sequence = u64::from_le_bytes(data[8..16].try_into().unwrap_or([0; 8]));
    let payload = &data[RECORD_HEADER_LEN..RECORD_HEADER_LEN + payload_len as usize];
    if crc != record_crc(payload_len, sequence, payload) {
        return Frame::Bad("checksum mismatch");
    }
    if data[RECORD_HEADER_LEN + payload_len as usize..len]
        .iter()
        .any(|b| *b != 0)
    {
        return Frame::Bad("non-zero padding");
    }
    Frame::Record {
        sequence,
        payload,
        len,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trip() {
        let mut buf = [0u8; 64];
        let len = write_record(&mut buf, 7, b"hello");
        assert_eq!(len, 24);
        assert_eq!(
            read_frame(&buf, 1024),
            Frame::Record {
                sequence: 7,
                payload: b"hello",
                len: 24
            }
        );
        assert_eq!(read_frame(&buf[len..], 1024), Frame::End);
        buf[17] ^= 1;
        assert_eq!(read_frame(&buf, 1024), Frame::Bad("checksum mismatch"));
    }

    #[test]
    fn header_round_trip() {
        let h = segment_header(42);
        assert_eq!(parse_segment_header(&h), Some(42));
        let mut bad = h;
        bad[20] ^= 1;
        assert_eq!(parse_segment_header(&bad), None);
    }
}
