//! Framings of an Avro datum on the wire:
//!
//! - single-object encoding (the default): `C3 01` + 8-byte little-endian CRC-64-AVRO
//!   fingerprint of the writer schema + the Avro binary datum. Needs no registry: the
//!   fingerprint names the schema;
//! - Confluent Schema Registry framing: magic byte `00` + 4-byte big-endian schema id + the
//!   datum; the registry names the schema (`contract::registry`).

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

/// Confluent Schema Registry wire format: magic byte, then the 4-byte big-endian schema id.
pub const CONFLUENT_MAGIC: u8 = 0;
pub const CONFLUENT_HEADER_LEN: usize = 5;

/// Prefixes an Avro datum with the Confluent header.
pub fn frame_confluent(schema_id: u32, datum: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(CONFLUENT_HEADER_LEN + datum.len());
    out.push(CONFLUENT_MAGIC);
    out.extend_from_slice(&schema_id.to_be_bytes());
    out.extend_from_slice(datum);
    out
}

/// How a message names its writer schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriterRef {
    /// Single-object encoding: the CRC-64-AVRO fingerprint.
    Fingerprint([u8; 8]),
    /// Confluent framing: the registry's schema id.
    RegistryId(u32),
}

/// Splits a message in either framing into its writer reference and the datum.
pub fn unframe_any(bytes: &[u8]) -> Result<(WriterRef, &[u8]), DecodeError> {
    if bytes.first() == Some(&CONFLUENT_MAGIC) && bytes.len() >= CONFLUENT_HEADER_LEN {
        let mut id = [0u8; 4];
        id.copy_from_slice(&bytes[1..CONFLUENT_HEADER_LEN]);
        return Ok((
            WriterRef::RegistryId(u32::from_be_bytes(id)),
            &bytes[CONFLUENT_HEADER_LEN..],
        ));
    }
    unframe(bytes).map(|(fingerprint, datum)| (WriterRef::Fingerprint(fingerprint), datum))
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
                "not Avro single-object encoding (expected marker C3 01 and a 10-byte header, got {} bytes starting {:02X?}) nor Confluent framing (00 and a 4-byte schema id)",
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
    fn confluent_framing_carries_a_big_endian_schema_id() {
        let framed = frame_confluent(0x0102_0304, b"xyz");
        assert_eq!(&framed[..5], &[0, 1, 2, 3, 4]);
        assert_eq!(
            unframe_any(&framed),
            Ok((WriterRef::RegistryId(0x0102_0304), &b"xyz"[..]))
        );
        let single = frame(&[9; 8], b"abc");
        assert_eq!(
            unframe_any(&single),
            Ok((WriterRef::Fingerprint([9; 8]), &b"abc"[..]))
        );
        // Too short for a schema id: neither framing.
        assert_eq!(
            unframe_any(&[0, 1, 2]).map_err(|e| e.class),
            Err(DecodeErrorClass::BadFraming)
        );
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
