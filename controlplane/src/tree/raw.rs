//! `GetTree` on the wire without encoding directories again: a page is a run of entries a
//! listing holds already framed (a repeated message field and a repeated `bytes` field are the
//! same on the wire), written with one copy, through a tonic service of our own for the CAS's
//! name ([`crate::cas_server`]), since the generated one wants decoded messages.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::Stream;
use prost::encoding::{self, DecodeContext, WireType};
use prost::DecodeError;
use std::pin::Pin;
use tonic::Status;

/// A `GetTreeResponse` whose directories are already encoded.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RawPage {
    /// The `directories` entries (field 1: tag, length, `Directory` message), one after
    /// another.
    pub directories: Bytes,
    /// `next_page_token` (field 2).
    pub next_page_token: String,
}

impl RawPage {
    /// Each directory's `Directory` message.
    pub fn messages(&self) -> Result<Vec<Bytes>, DecodeError> {
        use prost::Message;
        Ok(kiln_reapi::raw::RawRepeated::<1>::decode(self.directories.clone())?.items)
    }
}

impl prost::Message for RawPage {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.directories);
        if !self.next_page_token.is_empty() {
            encoding::string::encode(2, &self.next_page_token, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        match tag {
            1 => {
                let mut message = Bytes::new();
                encoding::bytes::merge(wire_type, &mut message, buf, ctx)?;
                let mut entries = BytesMut::from(&self.directories[..]);
                encoding::bytes::encode(1, &message, &mut entries);
                self.directories = entries.freeze();
                Ok(())
            }
            2 => encoding::string::merge(wire_type, &mut self.next_page_token, buf, ctx),
            _ => encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        let token = if self.next_page_token.is_empty() {
            0
        } else {
            encoding::string::encoded_len(2, &self.next_page_token)
        };
        self.directories.len() + token
    }

    fn clear(&mut self) {
        *self = RawPage::default();
    }
}

/// The pages of one call.
pub type PageStream = Pin<Box<dyn Stream<Item = Result<RawPage, Status>> + Send>>;

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::reapi::{Directory, FileNode, GetTreeResponse};
    use prost::Message;

    /// A raw page decodes as the `GetTreeResponse` it stands for.
    #[test]
    fn a_raw_page_is_a_get_tree_response() {
        let dirs: Vec<Directory> = (0..3)
            .map(|i| Directory {
                files: vec![FileNode {
                    name: format!("f{i}"),
                    ..Default::default()
                }],
                ..Default::default()
            })
            .collect();
        for token in ["", "t1.next"] {
            let mut entries = BytesMut::new();
            for d in &dirs {
                encoding::bytes::encode(1, &Bytes::from(d.encode_to_vec()), &mut entries);
            }
            let raw = RawPage {
                directories: entries.freeze(),
                next_page_token: token.into(),
            };
            let bytes = raw.encode_to_vec();
            assert_eq!(bytes.len(), raw.encoded_len());
            let decoded = GetTreeResponse::decode(&bytes[..]).unwrap();
            assert_eq!(decoded.directories, dirs);
            assert_eq!(decoded.next_page_token, token);
            assert_eq!(RawPage::decode(&bytes[..]).unwrap(), raw);
        }
    }
}
