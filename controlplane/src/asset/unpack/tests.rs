use super::*;
use kiln_proto::reapi::Directory;
use prost::Message;

/// A tar entry at `path` (written raw, so that bad paths can be made too).
fn entry(
    b: &mut tar::Builder<Vec<u8>>,
    path: &str,
    kind: tar::EntryType,
    mode: u32,
    link: &str,
    data: &[u8],
) {
    let mut h = tar::Header::new_gnu();
    h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
    h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(data.len() as u64);
    h.set_cksum();
    b.append(&h, data).unwrap();
}

/// Path, type, mode, link target, data.
type Entry<'a> = (&'a str, tar::EntryType, u32, &'a str, &'a [u8]);

fn archive(dir: &Path, entries: &[Entry]) -> PathBuf {
    let mut b = tar::Builder::new(Vec::new());
    for (path, kind, mode, link, data) in entries {
        entry(&mut b, path, *kind, *mode, link, data);
    }
    let tar = b.into_inner().unwrap();
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir.join(format!("a{n}.tar.gz"));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    std::fs::write(&path, gz.finish().unwrap()).unwrap();
    path
}

fn run(dir: &Path, path: &Path, max: u64, subdir: Option<&str>) -> Result<Unpacked, UnpackError> {
    // Unique across calls: the files of an earlier result may still be there.
    static T: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let temp = || {
        dir.join(format!(
            "t{}",
            T.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ))
    };
    unpack(
        path,
        ArchiveKind::TarGz,
        DigestFunction::Sha256,
        max,
        &temp,
        subdir,
        far(),
    )
}

fn dir_of(u: &Unpacked, d: Digest) -> Directory {
    let (_, bytes) = u.directories.iter().find(|(x, _)| *x == d).unwrap();
    Directory::decode(&bytes[..]).unwrap()
}

use tar::EntryType::{Directory as D, Link as L, Regular as F, Symlink as S};

fn far() -> Instant {
    Instant::now() + std::time::Duration::from_secs(3600)
}

#[test]
fn a_tree_with_modes_links_and_subdirectories() {
    let tmp = tempfile::tempdir().unwrap();
    let path = archive(
        tmp.path(),
        &[
            ("./", D, 0o755, "", b""),
            ("pkg/", D, 0o755, "", b""),
            ("pkg/tool", F, 0o755, "", b"#!/bin/sh\n"),
            ("pkg/lib/a.txt", F, 0o644, "", b"a"),
            ("pkg/lib/same.txt", L, 0o644, "pkg/lib/a.txt", b""),
            ("pkg/link", S, 0o777, "lib/a.txt", b""),
            ("pkg/fifo", tar::EntryType::Fifo, 0o644, "", b""),
        ],
    );
    let u = run(tmp.path(), &path, 1 << 20, None).unwrap();
    let root = dir_of(&u, u.root);
    assert_eq!(root.directories.len(), 1);
    let pkg_digest = Digest::from_proto(root.directories[0].digest.as_ref().unwrap(), 0).unwrap();
    let pkg = dir_of(&u, pkg_digest);
    let names: Vec<&str> = pkg.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["tool"]);
    assert!(pkg.files[0].is_executable);
    assert_eq!(pkg.symlinks[0].target, "lib/a.txt");
    let lib = dir_of(
        &u,
        Digest::from_proto(pkg.directories[0].digest.as_ref().unwrap(), 0).unwrap(),
    );
    assert_eq!(lib.files.len(), 2, "the hard link is a copy");
    assert_eq!(lib.files[0].digest, lib.files[1].digest);
    assert!(!lib.files[0].is_executable);
    // Two distinct files, each stored once.
    assert_eq!(u.files.len(), 2);
    // Every directory comes after the directories it names.
    for (i, (_, bytes)) in u.directories.iter().enumerate() {
        for child in Directory::decode(&bytes[..]).unwrap().directories {
            let child = Digest::from_proto(child.digest.as_ref().unwrap(), 0).unwrap();
            let at = u.directories.iter().position(|(d, _)| *d == child).unwrap();
            assert!(at < i, "a directory before its child");
        }
    }
    assert_eq!(u.directories.last().unwrap().0, u.root);
    // The `directory` qualifier picks a subtree.
    let sub = run(tmp.path(), &path, 1 << 20, Some("pkg/lib")).unwrap();
    assert_eq!(dir_of(&sub, sub.root), lib);
    assert_eq!(sub.files.len(), 1);
    assert!(matches!(
        run(tmp.path(), &path, 1 << 20, Some("pkg/nothing")),
        Err(UnpackError::NoSuchDirectory(_))
    ));
}

#[test]
fn unsafe_paths_links_and_bombs_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: Vec<Vec<Entry>> = vec![
        vec![("../evil", F, 0o644, "", b"x")],
        vec![("/etc/evil", F, 0o644, "", b"x")],
        vec![("a/link", S, 0o777, "/etc/passwd", b"")],
        vec![("a/link", S, 0o777, "../../out", b"")],
        vec![("a", F, 0o644, "", b"x"), ("a/b", F, 0o644, "", b"y")],
        vec![("h", L, 0o644, "missing", b"")],
    ];
    for entries in cases {
        let path = archive(tmp.path(), &entries);
        assert!(
            matches!(
                run(tmp.path(), &path, 1 << 20, None),
                Err(UnpackError::Bad(_))
            ),
            "{:?}",
            entries.iter().map(|e| e.0).collect::<Vec<_>>()
        );
    }
    let big = vec![0u8; 100_000];
    let path = archive(tmp.path(), &[("zeros", F, 0o644, "", &big[..])]);
    assert!(matches!(
        run(tmp.path(), &path, 64 << 10, None),
        Err(UnpackError::TooLarge(_))
    ));
    assert!(
        matches!(
            unpack(
                &path,
                ArchiveKind::Tar,
                DigestFunction::Sha256,
                1 << 20,
                &|| tmp.path().join("x"),
                None,
                far(),
            ),
            Err(UnpackError::Bad(_))
        ),
        "a gzip file is not a plain tar"
    );
    // A symlink inside the archive that leaves the subdirectory answered.
    let path = archive(tmp.path(), &[("pkg/lib/x", S, 0o777, "../../y", b"")]);
    assert!(run(tmp.path(), &path, 1 << 20, None).is_ok());
    assert!(matches!(
        run(tmp.path(), &path, 1 << 20, Some("pkg/lib")),
        Err(UnpackError::Bad(_))
    ));
    // A GNU long name of 2 MiB: refused before the reader holds it.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(1);
    h.set_mode(0o644);
    b.append_data(&mut h, "d/".repeat(1 << 20) + "f", &b"x"[..])
        .unwrap();
    let long = tmp.path().join("long.tar");
    std::fs::write(&long, b.into_inner().unwrap()).unwrap();
    let refused = unpack(
        &long,
        ArchiveKind::Tar,
        DigestFunction::Sha256,
        1 << 20,
        &|| tmp.path().join("y"),
        None,
        far(),
    );
    assert!(
        matches!(&refused, Err(UnpackError::Bad(m)) if m.contains("between two entries")),
        "{:?}",
        refused.err()
    );
    // Past the deadline: stopped.
    let path = archive(tmp.path(), &[("a", F, 0o644, "", b"x")]);
    let late = unpack(
        &path,
        ArchiveKind::TarGz,
        DigestFunction::Sha256,
        1 << 20,
        &|| tmp.path().join("z"),
        None,
        Instant::now(),
    );
    assert!(matches!(late, Err(UnpackError::TimedOut)));
}

#[test]
fn archive_kinds_by_type_or_name() {
    assert_eq!(
        ArchiveKind::of("https://x/a.tar.gz", None),
        Some(ArchiveKind::TarGz)
    );
    assert_eq!(
        ArchiveKind::of("https://x/a.tgz?sig=1", None),
        Some(ArchiveKind::TarGz)
    );
    assert_eq!(
        ArchiveKind::of("https://x/a.tar", None),
        Some(ArchiveKind::Tar)
    );
    assert_eq!(ArchiveKind::of("https://x/a.zip", None), None);
    assert_eq!(
        ArchiveKind::of("https://x/download", Some("application/x-tar")),
        Some(ArchiveKind::Tar)
    );
}
