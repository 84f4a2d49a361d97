//! Avro single-object encoding: `C3 01` + 8-byte little-endian CRC-64-AVRO fingerprint of the
//! writer schema + the Avro binary datum. Needs no registry: the fingerprint names the schema.

use super::{DecodeError, DecodeErrorClass};

pub const MARKER: [u8; 2] = [0xC3, 0x01];
pub const HEADER_LEN: usize = 10;

/// Prefixes an Avro datum with the single-object header.
pub fn frame(fingerprint: &[u8; 8], datum: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + datum.len());
    out.extend_from_slice(&MARKER);
    out.extend_from_slice(fingerprint);
    out.extend_from_slice(datum);
    out
}

/// Splits a single-object encoded message into the writer fingerprint and the datum.
pub fn unframe(bytes: &[u8]) -> Result<([u8; 8], &[u8]), DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::new(DecodeErrorClass::Empty, "empty message"));
    }
    if bytes.len() < HEADER_LEN || bytes[..2] != MARKER {
        return Err(DecodeError::new(
            DecodeErrorClass::BadFraming,
            format!(
                "not Avro single-object encoding (expected marker C3 01 and a 10-byte header, got {} bytes starting {:02X?})",
                bytes.len(),
                &bytes[..bytes.len().min(2)]
            ),
        ));
    }
    let mut fingerprint = [0u8; 8];
    fingerprint.copy_from_slice(&bytes[2..HEADER_LEN]);
    Ok((fingerprint, &bytes[HEADER_LEN..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_then_unframe_round_trips() {
        let fp = [1, 2, 3, 4, 5, 6, 7, 8];
        let framed = frame(&fp, b"abc");
        assert_eq!(&framed[..2], &MARKER);
        assert_eq!(unframe(&framed), Ok((fp, &b"abc"[..])));
    }

    #[test]
    fn rejects_empty_short_and_unmarked_input() {
        assert_eq!(
            unframe(b"").map_err(|e| e.class),
            Err(DecodeErrorClass::Empty)
        );
        assert_eq!(
            unframe(&[0xC3, 0x01, 0]).map_err(|e| e.class),
            Err(DecodeErrorClass::BadFraming)
        );
        assert_eq!(
            unframe(b"{\"json\": true}").map_err(|e| e.class),
            Err(DecodeErrorClass::BadFraming)
        );
    }
}
