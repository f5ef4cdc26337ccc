use super::*;

#[test]
fn empty_file_is_the_embedded_default() {
    let parsed = Config::from_toml("", "test").expect("empty config parses");
    assert_eq!(parsed, Config::default());
    assert_eq!(parsed.server.listen.to_string(), "127.0.0.1:50051");
}

#[test]
fn sizes_accept_numbers_and_units() {
    let parsed = Config::from_toml(
        "[storage]\ndisk_bytes = \"2 GiB\"\nmemory_bytes = 1048576\nmemory_max_blob_bytes = \"64 KiB\"\n",
        "test",
    )
    .expect("parses");
    assert_eq!(parsed.storage.disk_bytes.as_u64(), 2 << 30);
    assert_eq!(parsed.storage.memory_bytes.as_u64(), 1 << 20);
    assert_eq!(parsed.storage.memory_max_blob_bytes.as_u64(), 64 << 10);
}

#[test]
fn unknown_key_is_named_with_its_line() {
    let err = Config::from_toml(
        "[server]\nlisten = \"127.0.0.1:1\"\nlisen = \"x\"\n",
        "kiln.toml",
    )
    .expect_err("unknown key rejected")
    .to_string();
    assert!(err.contains("lisen"), "{err}");
    assert!(err.contains("line 3"), "{err}");
    assert!(err.contains("kiln.toml"), "{err}");
}

#[test]
fn unknown_section_is_rejected() {
    let err = Config::from_toml("[sever]\n", "t")
        .expect_err("rejected")
        .to_string();
    assert!(err.contains("sever"), "{err}");
}

#[test]
fn inconsistent_limits_are_rejected() {
    let err = Config::from_toml(
        "[server]\nmax_message_bytes = \"1 MiB\"\nmax_batch_total_size_bytes = \"4 MiB\"\n",
        "t",
    )
    .expect_err("rejected")
    .to_string();
    assert!(err.contains("max_batch_total_size_bytes"), "{err}");
    let err = Config::from_toml(
        "[storage]\nmemory_bytes = \"1 MiB\"\nmemory_max_blob_bytes = \"2 MiB\"\n",
        "t",
    )
    .expect_err("rejected")
    .to_string();
    assert!(err.contains("memory_max_blob_bytes"), "{err}");
    let err = Config::from_toml("[server]\nmax_connections = 0\n", "t")
        .expect_err("rejected")
        .to_string();
    assert!(err.contains("server.max_connections"), "{err}");
    for ranges in [0, 65] {
        let err = Config::from_toml(&format!("[worker]\nfetch_ranges = {ranges}\n"), "t")
            .expect_err("rejected")
            .to_string();
        assert!(err.contains("worker.fetch_ranges"), "{err}");
    }
    Config::from_toml("[worker]\nfetch_ranges = 64\n", "t").expect("64 ranges are fine");
}

#[test]
fn zero_memory_bytes_disables_the_memory_tier_as_documented() {
    // The default memory_max_blob_bytes (1 MiB) is above 0: not a contradiction here.
    let parsed = Config::from_toml("[storage]\nmemory_bytes = 0\n", "t").unwrap();
    assert_eq!(parsed.storage.memory_bytes.as_u64(), 0);
}

#[test]
fn runtimes_by_name() {
    let parsed = Config::from_toml("[server]\nruntime = \"monoio-legacy\"\n", "t").expect("parses");
    assert_eq!(parsed.server.runtime, RuntimeKind::MonoioLegacy);
    assert_eq!(
        "monoio-uring".parse::<RuntimeKind>(),
        Ok(RuntimeKind::MonoioUring)
    );
    assert!("tokio".parse::<RuntimeKind>().is_err());
}

#[test]
fn unknown_runtime_is_rejected() {
    let err = Config::from_toml("[server]\nruntime = \"tokio\"\n", "t")
        .expect_err("rejected")
        .to_string();
    assert!(err.contains("tokio"), "{err}");
}

#[test]
fn default_data_dir_follows_xdg_then_home() {
    use defaults::data_dir_from;
    let some = |s: &str| Some(std::ffi::OsString::from(s));
    assert_eq!(
        data_dir_from(some("/x/cache"), some("/home/u")),
        std::path::PathBuf::from("/x/cache/kiln")
    );
    assert_eq!(
        data_dir_from(some(""), some("/home/u")),
        std::path::PathBuf::from("/home/u/.cache/kiln")
    );
    assert_eq!(
        data_dir_from(None, None),
        std::path::PathBuf::from("kiln-data")
    );
}

#[test]
fn every_toml_example_in_the_docs_parses() {
    let doc = include_str!("../../docs/configuration.md");
    let mut blocks = 0;
    for block in doc.split("```toml").skip(1) {
        let toml = block.split("```").next().unwrap_or("");
        Config::from_toml(toml, "docs/configuration.md").unwrap_or_else(|e| panic!("{e}\n{toml}"));
        blocks += 1;
    }
    assert!(blocks > 0, "the configuration reference has an example");
}

#[test]
fn every_option_is_documented() {
    let doc = include_str!("../../docs/configuration.md");
    let text = toml::to_string(&Config::default()).unwrap();
    let mut section = String::new();
    for line in text.lines() {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
            // A map-valued option (`[execution.properties]`) is documented as a key.
            let documented = match section.rsplit_once('.') {
                Some((_, key)) => doc.contains(&format!("| `{key}` |")),
                None => doc.contains(&format!("`[{section}]`")),
            };
            assert!(documented, "section [{section}] undocumented");
        } else if let Some((key, _)) = line.split_once(" = ") {
            assert!(
                doc.contains(&format!("| `{key}` |")),
                "[{section}] {key} undocumented"
            );
        }
    }
}

#[test]
fn chains_resolve_and_bad_chains_name_their_fault() {
    use crate::chain::TierSpec;
    let default = Config::default().storage.resolve_chain().unwrap();
    assert!(matches!(default[0], TierSpec::Memory { .. }));
    assert_eq!(default[1], TierSpec::Filesystem);
    let split = Config::from_toml(
        "[storage]\nchain = [\"split\"]\n[storage.tiers.split]\nkind = \"size_partition\"\nthreshold_bytes = \"1 KiB\"\nsmall = [\"memory\", \"filesystem\"]\nlarge = [\"filesystem\"]\n",
        "test",
    )
    .unwrap();
    match &split.storage.resolve_chain().unwrap()[0] {
        TierSpec::SizePartition {
            threshold,
            small,
            large,
        } => {
            assert_eq!(*threshold, 1024);
            assert_eq!(small.len(), 2);
            assert_eq!(large, &vec![TierSpec::Filesystem]);
        }
        other => panic!("{other:?}"),
    }
    for (toml, key, why) in [
        ("chain = []", "storage.chain", "is empty"),
        ("chain = [\"memory\"]", "storage.chain", "ends in \"memory\", which decorates"),
        (
            "chain = [\"filesystem\", \"memory\"]",
            "storage.chain",
            "a store, before its end",
        ),
        ("chain = [\"redis\"]", "storage.chain", "names \"redis\""),
        (
            "chain = [\"loop\"]\n[storage.tiers.loop]\nkind = \"size_partition\"\nthreshold_bytes = 1\nsmall = [\"loop\"]\nlarge = [\"filesystem\"]",
            "storage.tiers.loop.small",
            "nest too deep",
        ),
        (
            "[storage.tiers.memory]\nkind = \"memory\"\nbytes = 1\nmax_blob_bytes = 1",
            "storage.tiers.memory",
            "built-in",
        ),
        (
            "chain = [\"m\", \"filesystem\"]\n[storage.tiers.m]\nkind = \"memory\"\nbytes = 10\nmax_blob_bytes = 11",
            "storage.tiers.m.max_blob_bytes",
            "must not exceed",
        ),
        (
            "chain = [\"log\"]\n[storage.tiers.log]\nkind = \"log\"\nbytes = \"1 GiB\"",
            "storage.tiers.log",
            "can only end a size partition's small chain",
        ),
        (
            "chain = [\"s\"]\n[storage.tiers.s]\nkind = \"size_partition\"\nthreshold_bytes = \"1 KiB\"\nsmall = [\"filesystem\"]\nlarge = [\"log\"]\n[storage.tiers.log]\nkind = \"log\"\nbytes = \"1 GiB\"",
            "storage.tiers.log",
            "can only end a size partition's small chain",
        ),
        (
            "chain = [\"s\"]\n[storage.tiers.s]\nkind = \"size_partition\"\nthreshold_bytes = \"2 MiB\"\nsmall = [\"log\"]\nlarge = [\"filesystem\"]\n[storage.tiers.log]\nkind = \"log\"\nbytes = \"1 GiB\"",
            "storage.tiers.log",
            "threshold_bytes is over 1 MiB",
        ),
        (
            "chain = [\"s\"]\n[storage.tiers.s]\nkind = \"size_partition\"\nthreshold_bytes = \"64 KiB\"\nsmall = [\"log\"]\nlarge = [\"filesystem\"]\n[storage.tiers.log]\nkind = \"log\"\nbytes = \"1 GiB\"\nsegment_bytes = \"2 GiB\"",
            "storage.tiers.log.segment_bytes",
            "from 1 MiB to 1 GiB",
        ),
        (
            "chain = [\"s\"]\n[storage.tiers.s]\nkind = \"size_partition\"\nthreshold_bytes = \"64 KiB\"\nsmall = [\"log\"]\nlarge = [\"filesystem\"]\n[storage.tiers.log]\nkind = \"log\"\nbytes = \"100 MiB\"",
            "storage.tiers.log.bytes",
            "two segments",
        ),
    ] {
        let text = if toml.starts_with('[') {
            toml.to_string()
        } else {
            format!("[storage]\n{toml}")
        };
        match Config::from_toml(&text, "test") {
            Err(ConfigError::Invalid { key: k, why: w }) => {
                assert_eq!(k, key, "{toml}");
                assert!(w.contains(why), "{toml}: {w}");
            }
            other => panic!("{toml}: {other:?}"),
        }
    }
    let logged = Config::from_toml(
        "[storage]\nchain = [\"s\"]\n[storage.tiers.s]\nkind = \"size_partition\"\nthreshold_bytes = \"64 KiB\"\nsmall = [\"memory\", \"log\"]\nlarge = [\"filesystem\"]\n[storage.tiers.log]\nkind = \"log\"\nbytes = \"1 GiB\"\n",
        "test",
    )
    .unwrap();
    match &logged.storage.resolve_chain().unwrap()[0] {
        TierSpec::SizePartition { small, .. } => assert_eq!(
            small[1],
            TierSpec::Log {
                name: "log".into(),
                bytes: 1 << 30,
                segment: 64 << 20,
                max_blob: 64 << 10,
            }
        ),
        other => panic!("{other:?}"),
    }
    let unknown = Config::from_toml(
        "[storage.tiers.x]\nkind = \"memory\"\nbytes = 1\nmax_blob_bytes = 1\ncolour = 1",
        "test",
    );
    assert!(
        matches!(unknown, Err(ConfigError::Parse { .. })),
        "{unknown:?}"
    );
}

#[test]
fn get_tree_bounds_are_checked() {
    let defaults = Config::from_toml("", "test").unwrap().get_tree;
    assert_eq!(defaults.max_tree_bytes.as_u64(), 64 << 20);
    assert_eq!(defaults.cache_bytes.as_u64(), 64 << 20);
    assert_eq!(defaults.cache_ttl_secs, 60);
    for (toml, key) in [
        ("max_tree_bytes = 0", "get_tree.max_tree_bytes"),
        ("max_tree_bytes = \"2 TiB\"", "get_tree.max_tree_bytes"),
        ("cache_bytes = \"2 TiB\"", "get_tree.cache_bytes"),
        ("cache_ttl_secs = 40000000", "get_tree.cache_ttl_secs"),
    ] {
        match Config::from_toml(&format!("[get_tree]\n{toml}"), "test") {
            Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{toml}"),
            other => panic!("{toml}: {other:?}"),
        }
    }
}

#[test]
fn compression_bounds_are_checked() {
    let defaults = Config::from_toml("", "test").unwrap().compression;
    assert!(defaults.zstd);
    assert_eq!((defaults.level, defaults.max_window_log), (1, 23));
    for (toml, key) in [
        ("level = 10", "compression.level"),
        ("level = -8", "compression.level"),
        ("max_window_log = 9", "compression.max_window_log"),
        ("max_window_log = 31", "compression.max_window_log"),
    ] {
        match Config::from_toml(&format!("[compression]\n{toml}"), "test") {
            Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{toml}"),
            other => panic!("{toml}: {other:?}"),
        }
    }
    let off = Config::from_toml("[compression]\nzstd = false", "test").unwrap();
    assert!(!off.compression.zstd);
}

#[test]
fn chunking_bounds_are_checked() {
    let defaults = Config::from_toml("", "test").unwrap().chunking;
    assert!(defaults.enabled);
    assert_eq!(defaults.avg_chunk_size_bytes.as_u64(), 512 << 10);
    for (toml, key) in [
        (
            "avg_chunk_size_bytes = \"3 KiB\"",
            "chunking.avg_chunk_size_bytes",
        ),
        (
            "avg_chunk_size_bytes = 512",
            "chunking.avg_chunk_size_bytes",
        ),
        (
            "avg_chunk_size_bytes = \"2 MiB\"",
            "chunking.avg_chunk_size_bytes",
        ),
        ("max_chunks = 0", "chunking.max_chunks"),
        ("list_cache_bytes = \"2 TiB\"", "chunking.list_cache_bytes"),
    ] {
        match Config::from_toml(&format!("[chunking]\n{toml}"), "test") {
            Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{toml}"),
            other => panic!("{toml}: {other:?}"),
        }
    }
}

#[test]
fn a_completeness_budget_out_of_range_is_refused() {
    for n in ["0", "100000001"] {
        match Config::from_toml(&format!("[action_cache]\nmax_check_digests = {n}"), "test") {
            Err(ConfigError::Invalid { key, .. }) => {
                assert_eq!(key, "action_cache.max_check_digests")
            }
            other => panic!("{n}: {other:?}"),
        }
    }
    let ok = Config::from_toml("[action_cache]\nmax_check_digests = 10", "test").unwrap();
    assert_eq!(ok.action_cache.max_check_digests, 10);
    assert_eq!(Config::default().action_cache.max_check_digests, 1_000_000);
}

#[test]
fn remote_asset_bounds_are_checked() {
    let defaults = Config::from_toml("", "test").unwrap().remote_asset;
    assert!(defaults.enabled && defaults.fetch_from_origin);
    for (toml, key) in [
        ("max_fetch_secs = 0", "remote_asset.max_fetch_secs"),
        (
            "default_fetch_secs = 4000",
            "remote_asset.default_fetch_secs",
        ),
        ("max_redirects = 101", "remote_asset.max_redirects"),
        ("concurrent_fetches = 0", "remote_asset.concurrent_fetches"),
    ] {
        match Config::from_toml(&format!("[remote_asset]\n{toml}"), "test") {
            Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{toml}"),
            other => panic!("{toml}: {other:?}"),
        }
    }
}

#[test]
fn placement_weights_parse_are_checked_and_the_old_cache_option_name_still_reads() {
    let c = Config::from_toml(
        "[execution]\nmax_cached_roots_per_worker = 7\n[execution.placement_weights]\ninput_tree = 0.5\n",
        "test",
    )
    .unwrap()
    .execution;
    assert_eq!(c.max_cached_dirs_per_worker, 7);
    assert_eq!(
        c.placement_weights,
        PlacementWeights {
            input_tree: 0.5,
            ..PlacementWeights::default()
        }
    );
    for (toml, key) in [
        ("load = -1.0", "execution.placement_weights.load"),
        ("input_root = nan", "execution.placement_weights.input_root"),
        (
            "input_blobs = inf",
            "execution.placement_weights.input_blobs",
        ),
    ] {
        match Config::from_toml(&format!("[execution.placement_weights]\n{toml}"), "test") {
            Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{toml}"),
            other => panic!("{toml}: {other:?}"),
        }
    }
}

#[test]
fn quic_on_the_server_needs_tls() {
    match Config::from_toml("[server]\nquic = true\n", "test") {
        Err(ConfigError::Invalid { key, .. }) => assert_eq!(key, "server.quic"),
        other => panic!("{other:?}"),
    }
    let c = Config::from_toml("[server]\nquic = true\n[tls]\nmode = \"auto\"\n", "test").unwrap();
    assert!(c.server.quic);
}

#[test]
fn a_redis_tier_needs_redis_and_a_bounded_blob_size() {
    let chain = "[storage]\nchain = [\"shared\", \"filesystem\"]\n[storage.tiers.shared]\nkind = \"redis\"\nmax_blob_bytes = \"64 KiB\"\n";
    let err = Config::from_toml(chain, "t").unwrap_err().to_string();
    assert!(err.contains("[redis] url is not set"), "{err}");
    let with_url = format!("{chain}[redis]\nurl = \"redis://127.0.0.1:6379\"\n");
    let config = Config::from_toml(&with_url, "t").unwrap();
    assert!(matches!(
        config.storage.resolve_chain().unwrap()[0],
        crate::chain::TierSpec::Redis { max_blob: 65536 }
    ));
    let huge = with_url.replace("64 KiB", "65 MiB");
    let err = Config::from_toml(&huge, "t").unwrap_err().to_string();
    assert!(err.contains("at most 64 MiB"), "{err}");
    let bad_url = "[redis]\nurl = \"http://127.0.0.1\"\n";
    let err = Config::from_toml(bad_url, "t").unwrap_err().to_string();
    assert!(err.contains("redis://"), "{err}");
}

#[test]
fn grpc_and_shard_tiers_name_their_endpoints_properly() {
    let chain = |tier: &str| {
        format!("[storage]\nchain = [\"remote\", \"filesystem\"]\n[storage.tiers.remote]\n{tier}\n")
    };
    let ok = Config::from_toml(
        &chain("kind = \"shard\"\nshards = [{ endpoint = \"grpc://a:1\" }, { endpoint = \"grpc://b:1\", weight = 3 }]"),
        "t",
    )
    .unwrap();
    assert_eq!(
        ok.storage.resolve_chain().unwrap()[0],
        crate::chain::TierSpec::Remote {
            shards: vec![("grpc://a:1".into(), 1), ("grpc://b:1".into(), 3)]
        }
    );
    let one = Config::from_toml(&chain("kind = \"grpc\"\nendpoint = \"grpc://a:1\""), "t").unwrap();
    assert!(matches!(
        &one.storage.resolve_chain().unwrap()[0],
        crate::chain::TierSpec::Remote { shards } if shards.len() == 1
    ));
    for (bad, why) in [
        ("kind = \"shard\"\nshards = []", "from 1 to 1,024"),
        ("kind = \"grpc\"\nendpoint = \"http://a:1\"", "not grpc://"),
        ("kind = \"shard\"\nshards = [{ endpoint = \"grpc://a:1\", weight = 0 }]", "weight"),
        ("kind = \"shard\"\nshards = [{ endpoint = \"grpc://a:1\" }, { endpoint = \"grpc://a:1\" }]", "twice"),
    ] {
        let err = Config::from_toml(&chain(bad), "t").unwrap_err().to_string();
        assert!(err.contains(why), "{bad}: {err}");
    }
    // A remote tier decorates: it cannot end a chain.
    let err = Config::from_toml(
        "[storage]\nchain = [\"remote\"]\n[storage.tiers.remote]\nkind = \"grpc\"\nendpoint = \"grpc://a:1\"\n",
        "t",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("ends in"), "{err}");
}

#[test]
fn several_redis_urls_only_for_a_cluster() {
    let two = "url = \"redis://a:7000, redis://b:7001\"";
    let err = Config::from_toml(&format!("[redis]\n{two}\n"), "t")
        .unwrap_err()
        .to_string();
    assert!(err.contains("several separated by commas"), "{err}");
    Config::from_toml(&format!("[redis]\n{two}\ncluster = true\n"), "t").unwrap();
}

#[test]
fn a_redis_lease_outlasts_a_timed_out_renewal() {
    let url = "[redis]\nurl = \"redis://127.0.0.1:6379\"\n";
    for bad in [
        "lease_secs = 0",
        "lease_secs = 601",
        "lease_secs = 6\ntimeout_ms = 2000",
    ] {
        let err = Config::from_toml(&format!("{url}{bad}\n"), "t")
            .unwrap_err()
            .to_string();
        assert!(err.contains("redis.lease_secs"), "{bad}: {err}");
    }
    let ok = Config::from_toml(&format!("{url}lease_secs = 3\ntimeout_ms = 500\n"), "t").unwrap();
    assert_eq!((ok.redis.lease_secs, ok.redis.take_over), (3, true));
    // Checked only where there is a lease.
    Config::from_toml(&format!("{url}lease_secs = 1\ntake_over = false\n"), "t").unwrap();
    Config::from_toml("[redis]\ntimeout_ms = 9000\n", "t").unwrap();
}
