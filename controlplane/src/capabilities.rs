//! The Capabilities service: what this server really supports.

use crate::chunking::ChunkParams;
use kiln_proto::build::bazel::semver::SemVer;
use kiln_proto::reapi::capabilities_server::Capabilities;
use kiln_proto::reapi::{
    symlink_absolute_path_strategy, ActionCacheUpdateCapabilities, CacheCapabilities,
    ExecutionCapabilities, GetCapabilitiesRequest, ServerCapabilities,
};
use kiln_reapi::compression::Compressor;
use kiln_reapi::digest::DigestFunction;
use tonic::{Request, Response, Status};

/// Limits advertised to clients.
#[derive(Debug, Clone)]
pub struct Advertised {
    /// `max_batch_total_size_bytes`.
    pub max_batch_total_size_bytes: u64,
    /// `max_cas_blob_size_bytes` (the CAS capacity).
    pub max_cas_blob_size_bytes: u64,
    /// Whether remote execution is available.
    pub exec_enabled: bool,
    /// Whether zstd is spoken (ByteStream `compressed-blobs/zstd/…` and batch entries).
    pub zstd: bool,
    /// With `SplitBlob` and `SpliceBlob` served: FastCDC 2020's parameters.
    pub chunking: Option<ChunkParams>,
}

/// The Capabilities service.
pub struct CapabilitiesService {
    advertised: Advertised,
}

impl CapabilitiesService {
    /// A service advertising `advertised`.
    pub fn new(advertised: Advertised) -> CapabilitiesService {
        CapabilitiesService { advertised }
    }

    /// The capabilities message.
    pub fn capabilities(&self) -> ServerCapabilities {
        let functions: Vec<i32> = DigestFunction::ALL
            .iter()
            .map(|f| f.proto() as i32)
            .collect();
        let version = |minor| SemVer {
            major: 2,
            minor,
            patch: 0,
            prerelease: String::new(),
        };
        let compressors: Vec<i32> = if self.advertised.zstd {
            vec![Compressor::Zstd.proto()]
        } else {
            Vec::new()
        };
        ServerCapabilities {
            cache_capabilities: Some(CacheCapabilities {
                digest_functions: functions.clone(),
                action_cache_update_capabilities: Some(ActionCacheUpdateCapabilities {
                    update_enabled: true,
                }),
                cache_priority_capabilities: None,
                max_batch_total_size_bytes: self.advertised.max_batch_total_size_bytes as i64,
                // Input trees with absolute (or root-escaping) symlinks are refused
                // (kiln-reapi's tree rules), so say so.
                symlink_absolute_path_strategy: symlink_absolute_path_strategy::Value::Disallowed
                    as i32,
                supported_compressors: compressors.clone(),
                supported_batch_update_compressors: compressors,
                max_cas_blob_size_bytes: self.advertised.max_cas_blob_size_bytes as i64,
                split_blob_support: self.advertised.chunking.is_some(),
                splice_blob_support: self.advertised.chunking.is_some(),
                fast_cdc_2020_params: self.advertised.chunking.map(|p| p.proto()),
                rep_max_cdc_params: None,
            }),
            execution_capabilities: Some(ExecutionCapabilities {
                digest_function: DigestFunction::Sha256.proto() as i32,
                exec_enabled: self.advertised.exec_enabled,
                execution_priority_capabilities: None,
                supported_node_properties: Vec::new(),
                digest_functions: functions,
            }),
            deprecated_api_version: None,
            low_api_version: Some(version(0)),
            high_api_version: Some(version(3)),
        }
    }
}

#[tonic::async_trait]
impl Capabilities for CapabilitiesService {
    async fn get_capabilities(
        &self,
        request: Request<GetCapabilitiesRequest>,
    ) -> Result<Response<ServerCapabilities>, Status> {
        let instance = request.get_ref().instance_name.clone();
        crate::auth::check(&request, crate::auth::paths::CAPABILITIES, Some(&instance))?;
        Ok(Response::new(self.capabilities()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertises_both_digest_functions_and_limits() {
        let caps = CapabilitiesService::new(Advertised {
            max_batch_total_size_bytes: 4 << 20,
            max_cas_blob_size_bytes: 1 << 30,
            exec_enabled: false,
            zstd: false,
            chunking: None,
        })
        .capabilities();
        let cache = caps.cache_capabilities.unwrap();
        assert_eq!(cache.digest_functions, vec![1, 9], "SHA256 and BLAKE3");
        assert_eq!(cache.max_batch_total_size_bytes, 4 << 20);
        assert!(cache.supported_compressors.is_empty());
        assert!(cache.supported_batch_update_compressors.is_empty());
        assert!(!caps.execution_capabilities.unwrap().exec_enabled);
    }

    #[test]
    fn advertises_zstd_and_chunking_when_offered() {
        let caps = CapabilitiesService::new(Advertised {
            max_batch_total_size_bytes: 4 << 20,
            max_cas_blob_size_bytes: 1 << 30,
            exec_enabled: true,
            zstd: true,
            chunking: Some(ChunkParams {
                avg: 512 << 10,
                seed: 7,
            }),
        })
        .capabilities();
        let cache = caps.cache_capabilities.unwrap();
        assert_eq!(cache.supported_compressors, vec![1], "ZSTD");
        assert_eq!(cache.supported_batch_update_compressors, vec![1]);
        assert!(cache.split_blob_support && cache.splice_blob_support);
        let cdc = cache.fast_cdc_2020_params.unwrap();
        assert_eq!((cdc.avg_chunk_size_bytes, cdc.seed), (512 << 10, 7));
    }
}
