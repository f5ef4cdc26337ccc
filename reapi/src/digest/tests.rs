use super::*;
use kiln_proto::reapi;

const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
const EMPTY_BLAKE3: &str = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262";

#[test]
fn known_hashes_of_the_empty_blob() {
    assert_eq!(
        hex::encode(DigestFunction::Sha256.empty_hash()),
        EMPTY_SHA256
    );
    assert_eq!(
        hex::encode(DigestFunction::Blake3.empty_hash()),
        EMPTY_BLAKE3
    );
    let d = Digest::parse(DigestFunction::Blake3, EMPTY_BLAKE3, 0).unwrap();
    assert!(d.is_empty_blob());
    // Same hash under the other function is not the empty blob.
    let d = Digest::parse(DigestFunction::Sha256, EMPTY_BLAKE3, 0).unwrap();
    assert!(!d.is_empty_blob());
}

#[test]
fn incremental_hash_matches_one_shot() {
    for f in DigestFunction::ALL {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
        let mut h = Hasher::new(f);
        for chunk in data.chunks(999) {
            h.update(chunk);
        }
        let parked = h.clone();
        assert_eq!(h.finalize(), Hasher::hash(f, &data));
        assert_eq!(parked.finalize(), Hasher::hash(f, &data));
    }
}

#[test]
fn request_function_resolution() {
    use reapi::digest_function::Value;
    assert_eq!(
        DigestFunction::from_request(Value::Blake3 as i32, 64),
        Ok(DigestFunction::Blake3)
    );
    assert_eq!(
        DigestFunction::from_request(Value::Sha256 as i32, 64),
        Ok(DigestFunction::Sha256)
    );
    assert_eq!(
        DigestFunction::from_request(0, 64),
        Ok(DigestFunction::Sha256)
    );
    assert!(matches!(
        DigestFunction::from_request(0, 40),
        Err(DigestError::UnsupportedFunction(_))
    ));
    assert!(matches!(
        DigestFunction::from_request(Value::Sha512 as i32, 128),
        Err(DigestError::UnsupportedFunction(_))
    ));
    assert_eq!(
        DigestFunction::from_request(77, 64),
        Err(DigestError::UnknownFunction(77))
    );
}

#[test]
fn digest_parsing_rejects_bad_input() {
    let f = DigestFunction::Sha256;
    assert!(Digest::parse(f, EMPTY_SHA256, 0).is_ok());
    assert_eq!(
        Digest::parse(f, EMPTY_SHA256, -1),
        Err(DigestError::NegativeSize(-1))
    );
    assert!(matches!(
        Digest::parse(f, "abc", 0),
        Err(DigestError::BadHash { .. })
    ));
    let not_hex = "g".repeat(64);
    assert!(matches!(
        Digest::parse(f, &not_hex, 0),
        Err(DigestError::BadHash { .. })
    ));
    // Hashes are lowercase hex: an uppercase one would come back lowercase in answers and
    // match nothing the client holds.
    assert!(matches!(
        Digest::parse(f, &EMPTY_SHA256.to_uppercase(), 0),
        Err(DigestError::BadHash { .. })
    ));
    let mut one_upper = EMPTY_SHA256.to_string();
    one_upper.replace_range(63..64, "5".to_uppercase().as_str());
    assert!(
        Digest::parse(f, &one_upper, 0).is_ok(),
        "a digit has no case"
    );
    let mut with_a_capital = EMPTY_SHA256.to_string();
    with_a_capital.replace_range(0..1, "E");
    assert!(matches!(
        Digest::parse(f, &with_a_capital, 0),
        Err(DigestError::BadHash { .. })
    ));
    for bad in ["g", " ", "-", "/", ":", "@", "`", "G", "\u{7f}"] {
        let mut h = EMPTY_SHA256.to_string();
        h.replace_range(10..11, bad);
        if h.len() == 64 {
            assert!(Digest::parse(f, &h, 0).is_err(), "{bad:?} accepted");
        }
    }
    let missing = Digest::from_proto_field(None, 0);
    assert_eq!(missing, Err(DigestError::Missing));
}

#[test]
fn proto_round_trip() {
    let d = Digest::of(DigestFunction::Blake3, b"hello");
    let p = d.to_proto();
    assert_eq!(p.size_bytes, 5);
    let back = Digest::from_proto(&p, reapi::digest_function::Value::Blake3 as i32).unwrap();
    assert_eq!(back, d);
    // Every byte value survives hex both ways.
    let all: Vec<u8> = (0..=255u8).collect();
    for chunk in all.chunks(32) {
        let mut hash = [0u8; 32];
        hash.copy_from_slice(chunk);
        let d = Digest {
            function: DigestFunction::Sha256,
            hash,
            size: 1,
        };
        assert_eq!(d.hex(), hex::encode(hash));
        assert_eq!(Digest::parse(DigestFunction::Sha256, &d.hex(), 1), Ok(d));
    }
}

#[test]
fn instance_names_are_bounded() {
    assert!(InstanceName::new("main/ci").is_ok());
    assert!(InstanceName::new(&"x".repeat(600)).is_err());
    assert!(InstanceName::new("a\nb").is_err());
    assert!(InstanceName::new("x/uploads/y").is_err());
    assert!(InstanceName::new("x/blobsy").is_ok());
}
