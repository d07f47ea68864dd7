//! Frames: `[length: u32 LE][CRC-32C of length and payload: u32 LE][payload]`.
//!
//! The checksum covers the length too, so a length damaged into another plausible value is
//! caught as surely as a damaged payload. A reader stops at the first frame that is short (a
//! write torn by a crash) or whose checksum fails, and reports the offset where the good
//! frames end: that is where the file is cut.

use std::io::Read;

use bytes::Bytes;

const FRAME_HEADER: usize = 8;

/// Appends one frame holding `payload` to `out`.
pub fn write_frame(out: &mut Vec<u8>, payload: &[u8]) {
    let len = u32::try_from(payload.len()).expect("a record under 4 GiB");
    let len_bytes = len.to_le_bytes();
    let crc = crc32c::crc32c_append(crc32c::crc32c(&len_bytes), payload);
    out.reserve(FRAME_HEADER + payload.len());
    out.extend_from_slice(&len_bytes);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(payload);
}

/// Appends one frame holding `message`, encoded in place (no intermediate buffer: this runs
/// for every write, under the store's lock).
pub fn write_message_frame(out: &mut Vec<u8>, message: &impl prost::Message) {
    let start = out.len();
    out.reserve(FRAME_HEADER + message.encoded_len());
    out.extend_from_slice(&[0; FRAME_HEADER]);
    message.encode(out).expect("a Vec grows as needed");
    let len = u32::try_from(out.len() - start - FRAME_HEADER).expect("a record under 4 GiB");
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&out[start..start + 4]), &out[start + FRAME_HEADER..]);
    out[start + 4..start + FRAME_HEADER].copy_from_slice(&crc.to_le_bytes());
}

/// Why reading stopped before the end of the file.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("torn frame at byte {offset}: {have} of {want} bytes")]
    Torn { offset: u64, have: usize, want: usize },
    #[error("checksum mismatch in the frame at byte {offset}")]
    Corrupt { offset: u64 },
    #[error("reading at byte {offset}")]
    Io {
        offset: u64,
        #[source]
        source: std::io::Error,
    },
}

/// Reads frames one at a time; memory follows the frame being read, never a length field.
pub struct FrameReader<R> {
    inner: R,
    /// Bytes of whole, valid frames read so far.
    offset: u64,
}

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        Self { inner, offset: 0 }
    }

    /// Where the valid frames read so far end.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The next payload; `Ok(None)` at a clean end of the file (between frames).
    pub fn next_frame(&mut self) -> Result<Option<Bytes>, FrameError> {
        let offset = self.offset;
        let io = |source| FrameError::Io { offset, source };
        let mut header = [0u8; FRAME_HEADER];
        let have = read_full(&mut self.inner, &mut header).map_err(io)?;
        match have {
            0 => return Ok(None),
            FRAME_HEADER => {}
            have => return Err(FrameError::Torn { offset, have, want: FRAME_HEADER }),
        }
        let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
        // `take` + `read_to_end` grows the buffer with the bytes actually there: a damaged
        // length cannot make us allocate gigabytes.
        let mut payload = Vec::new();
        (&mut self.inner).take(u64::from(len)).read_to_end(&mut payload).map_err(io)?;
        if payload.len() < len as usize {
            return Err(FrameError::Torn {
                offset,
                have: FRAME_HEADER + payload.len(),
                want: FRAME_HEADER + len as usize,
            });
        }
        if crc32c::crc32c_append(crc32c::crc32c(&header[..4]), &payload) != crc {
            return Err(FrameError::Corrupt { offset });
        }
        self.offset += (FRAME_HEADER + payload.len()) as u64;
        Ok(Some(Bytes::from(payload)))
    }
}

/// Reads until `buf` is full or the end of the input; returns the bytes read.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(payloads: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        payloads.iter().for_each(|p| write_frame(&mut out, p));
        out
    }

    /// Every payload read, and how reading ended.
    fn read_all(bytes: &[u8]) -> (Vec<Vec<u8>>, u64, Option<FrameError>) {
        let mut reader = FrameReader::new(bytes);
        let mut out = Vec::new();
        loop {
            match reader.next_frame() {
                Ok(Some(payload)) => out.push(payload.to_vec()),
                Ok(None) => return (out, reader.offset(), None),
                Err(error) => return (out, reader.offset(), Some(error)),
            }
        }
    }

    #[test]
    fn frames_read_back_as_written_including_an_empty_one() {
        let bytes = frames(&[b"one", b"", b"three"]);
        let (payloads, offset, end) = read_all(&bytes);
        assert_eq!(payloads, [b"one".to_vec(), vec![], b"three".to_vec()]);
        assert_eq!(offset, bytes.len() as u64);
        assert!(end.is_none());
    }

    #[test]
    fn a_message_frame_is_the_frame_of_its_encoding() {
        let message = crate::etcd::wal::record::Compaction { revision: 42 };
        let mut framed = Vec::new();
        write_message_frame(&mut framed, &message);
        assert_eq!(framed, frames(&[&prost::Message::encode_to_vec(&message)]));
    }

    #[test]
    fn a_tail_torn_anywhere_is_cut_after_the_last_whole_frame() {
        let bytes = frames(&[b"first", b"second"]);
        let first_end = (FRAME_HEADER + 5) as u64;
        for cut in first_end as usize + 1..bytes.len() {
            let (payloads, offset, end) = read_all(&bytes[..cut]);
            assert_eq!(payloads, [b"first".to_vec()], "cut at {cut}");
            assert_eq!(offset, first_end);
            assert!(matches!(end, Some(FrameError::Torn { offset, .. }) if offset == first_end), "{end:?}");
        }
    }

    #[test]
    fn a_flipped_bit_in_the_length_checksum_or_payload_is_caught() {
        let bytes = frames(&[b"first", b"second"]);
        let second = FRAME_HEADER + 5;
        for at in second..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x10;
            let (payloads, offset, end) = read_all(&damaged);
            assert_eq!(payloads, [b"first".to_vec()], "damage at {at}");
            assert_eq!(offset, second as u64);
            assert!(end.is_some(), "damage at {at} went unnoticed");
        }
    }

    #[test]
    fn a_huge_damaged_length_is_reported_torn_without_allocating_it() {
        let mut bytes = frames(&[b"x"]);
        bytes[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        let (payloads, offset, end) = read_all(&bytes);
        assert!(payloads.is_empty());
        assert_eq!(offset, 0);
        assert!(matches!(end, Some(FrameError::Torn { want, .. }) if want == FRAME_HEADER + u32::MAX as usize));
    }
}
