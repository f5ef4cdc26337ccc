//! `GetTree` on the wire without encoding directories again: pages are written from the
//! `Directory` bytes the CAS holds (a repeated message field and a repeated `bytes` field are
//! the same on the wire), through a tonic service of our own for the CAS's name
//! ([`crate::cas_server`]), since the generated one wants decoded messages.

use bytes::{Buf, BufMut, Bytes};
use futures::Stream;
use prost::encoding::{self, DecodeContext, WireType};
use prost::DecodeError;
use std::pin::Pin;
use tonic::Status;

/// A `GetTreeResponse` whose directories are already encoded.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RawPage {
    /// Each directory's `Directory` message (field 1).
    pub directories: Vec<Bytes>,
    /// `next_page_token` (field 2).
    pub next_page_token: String,
}

impl prost::Message for RawPage {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        for d in &self.directories {
            encoding::bytes::encode(1, d, buf);
        }
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
            1 => encoding::bytes::merge_repeated(wire_type, &mut self.directories, buf, ctx),
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
        encoding::bytes::encoded_len_repeated(1, &self.directories) + token
    }

    fn clear(&mut self) {
        self.directories.clear();
        self.next_page_token.clear();
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
            let raw = RawPage {
                directories: dirs.iter().map(|d| d.encode_to_vec().into()).collect(),
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
