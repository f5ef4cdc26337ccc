//! `Push`: associations recorded for content already in the CAS.

use super::{check_sizes, AssetError, AssetService, Association, Key, Kind, Qualifiers};
use kiln_proto::asset::Qualifier;
use kiln_reapi::digest::{Digest, InstanceName};
use std::time::SystemTime;

impl AssetService {
    pub(super) async fn push(
        &self,
        kind: Kind,
        instance_name: &str,
        uris: &[String],
        qualifiers: &[Qualifier],
        expire_at: Option<prost_types::Timestamp>,
        digest: Digest,
    ) -> Result<(), AssetError> {
        if !self.settings.enabled {
            return Err(AssetError::Off);
        }
        let instance = InstanceName::new(instance_name)?;
        check_sizes(uris, qualifiers)?;
        let qualifiers = Qualifiers::parse(qualifiers, uris.len())?;
        let expires = expire_at
            .map(|t| {
                SystemTime::try_from(t).map_err(|_| AssetError::Time("expire_at is not a time"))
            })
            .transpose()?;
        if !self
            .cas
            .find_missing(&instance, &[digest])
            .await?
            .is_empty()
        {
            return Err(AssetError::NotInCas(digest));
        }
        let selectors: Vec<(String, String)> = qualifiers.selectors.into_iter().collect();
        for uri in uris {
            let association = Association {
                digest,
                at: SystemTime::now(),
                expires,
                sri: qualifiers.sri.clone(),
                pushed: true,
            };
            let key = Key {
                instance: instance.clone(),
                kind,
                uri: uri.clone(),
                selectors: selectors.clone(),
                credentials: None,
            };
            self.known.insert(key, association).await;
        }
        Ok(())
    }
}
