//! Messages kept as wire bytes: a repeated message field and a repeated `bytes` field are the
//! same on the wire, so a message whose items are already encoded (the client's own digests,
//! directories as the CAS holds them) is sent without decoding or encoding them again.

use bytes::{Buf, BufMut, Bytes};
use prost::encoding::{self, DecodeContext, WireType};
use prost::DecodeError;

/// A message of one repeated message field, number `TAG`, whose items are kept encoded
/// (other fields are skipped when decoding).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RawRepeated<const TAG: u32> {
    /// Each item's encoded message.
    pub items: Vec<Bytes>,
}

impl<const TAG: u32> prost::Message for RawRepeated<TAG> {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        for item in &self.items {
            encoding::bytes::encode(TAG, item, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        if tag == TAG {
            encoding::bytes::merge_repeated(wire_type, &mut self.items, buf, ctx)
        } else {
            encoding::skip_field(wire_type, tag, buf, ctx)
        }
    }

    fn encoded_len(&self) -> usize {
        encoding::bytes::encoded_len_repeated(TAG, &self.items)
    }

    fn clear(&mut self) {
        self.items.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::reapi::{Digest, FindMissingBlobsResponse};
    use prost::Message;

    #[test]
    fn a_raw_message_is_the_generated_one_on_the_wire() {
        let digests: Vec<Digest> = (0..3)
            .map(|i| Digest {
                hash: format!("{i:064x}"),
                size_bytes: i,
            })
            .collect();
        let raw = RawRepeated::<2> {
            items: digests.iter().map(|d| d.encode_to_vec().into()).collect(),
        };
        let typed = FindMissingBlobsResponse {
            missing_blob_digests: digests,
        };
        assert_eq!(raw.encode_to_vec(), typed.encode_to_vec());
        assert_eq!(raw.encoded_len(), typed.encoded_len());
        assert_eq!(
            RawRepeated::<2>::decode(typed.encode_to_vec().as_slice()).unwrap(),
            raw
        );
        // Another field's items are not this one's.
        assert!(RawRepeated::<1>::decode(typed.encode_to_vec().as_slice())
            .unwrap()
            .items
            .is_empty());
    }
}
