//! A `Digest` message parsed straight from its wire bytes, with no `String` for its hash: a
//! `FindMissingBlobs` of thousands of digests then costs no allocation per digest. It accepts
//! and refuses what prost's decoding of `Digest` followed by [`Digest::from_proto`] would.

use super::{Digest, DigestError, DigestFunction};
use prost::encoding::{decode_key, decode_varint, skip_field, DecodeContext, WireType};

impl Digest {
    /// Parses the encoded REAPI `Digest` message `wire` (for a request whose
    /// `digest_function` field is `digest_function`).
    pub fn from_wire(mut wire: &[u8], digest_function: i32) -> Result<Digest, DigestError> {
        let malformed = |e: prost::DecodeError| DigestError::Malformed(e.to_string());
        let mut hash: &[u8] = &[];
        let mut size: i64 = 0;
        while !wire.is_empty() {
            let (tag, wire_type) = decode_key(&mut wire).map_err(malformed)?;
            match (tag, wire_type) {
                (1, WireType::LengthDelimited) => {
                    let len = decode_varint(&mut wire).map_err(malformed)?;
                    let len = usize::try_from(len)
                        .ok()
                        .filter(|&len| len <= wire.len())
                        .ok_or_else(|| {
                            DigestError::Malformed("a hash runs past its digest".into())
                        })?;
                    (hash, wire) = wire.split_at(len);
                }
                // int64 on the wire: the varint's 64 bits, as prost reads it.
                (2, WireType::Varint) => size = decode_varint(&mut wire).map_err(malformed)? as i64,
                (1 | 2, _) => {
                    return Err(DigestError::Malformed(format!(
                        "field {tag} of a digest has wire type {wire_type:?}"
                    )))
                }
                _ => skip_field(wire_type, tag, &mut wire, DecodeContext::default())
                    .map_err(malformed)?,
            }
        }
        let function = DigestFunction::from_request(digest_function, hash.len())?;
        Digest::parse_ascii(function, hash, size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::reapi;
    use prost::Message;

    fn both(message: &[u8], function: i32) -> (Result<Digest, String>, Result<Digest, String>) {
        let typed = reapi::Digest::decode(message)
            .map_err(|e| e.to_string())
            .and_then(|d| Digest::from_proto(&d, function).map_err(|e| e.to_string()));
        let wire = Digest::from_wire(message, function).map_err(|e| e.to_string());
        (typed, wire)
    }

    #[test]
    fn the_wire_parse_agrees_with_prost() {
        let good = Digest::of(DigestFunction::Sha256, b"blob");
        let hex = good.hex();
        let encode = |hash: &str, size: i64| {
            reapi::Digest {
                hash: hash.into(),
                size_bytes: size,
            }
            .encode_to_vec()
        };
        // With an unknown field after it, and with the hash given twice (the last wins).
        let mut extra = encode(&hex, 4);
        extra.extend_from_slice(&[0x18, 0x07]); // field 3, varint 7
        let mut twice = encode("00", 4);
        twice.extend_from_slice(&encode(&hex, 4));
        for (message, function) in [
            (encode(&hex, 4), 0),
            (
                encode(&hex, 4),
                reapi::digest_function::Value::Sha256 as i32,
            ),
            (
                encode(&hex, 4),
                reapi::digest_function::Value::Blake3 as i32,
            ),
            (extra, 0),
            (twice, 0),
            (encode(&hex.to_uppercase(), 4), 0),
            (encode(&hex[..60], 4), 0),
            (encode(&hex, -1), 0),
            (encode(&hex, 4), 99),
            (Vec::new(), 0),
        ] {
            let (typed, wire) = both(&message, function);
            assert_eq!(typed.is_ok(), wire.is_ok(), "{typed:?} vs {wire:?}");
            if let (Ok(t), Ok(w)) = (&typed, &wire) {
                assert_eq!(t, w);
            }
        }
        assert_eq!(Digest::from_wire(&encode(&hex, 4), 0).unwrap(), good);
        // Malformed messages are refused, never read past their end.
        let truncated = &encode(&hex, 4)[..10];
        let wrong_type = [0x08, 0x01]; // field 1 as a varint
        let unterminated = [0x10, 0xff]; // a varint with no last byte
        for message in [truncated, &wrong_type[..], &unterminated[..]] {
            assert!(matches!(
                Digest::from_wire(message, 0),
                Err(DigestError::Malformed(_))
            ));
            assert!(reapi::Digest::decode(message).is_err());
        }
    }
}
