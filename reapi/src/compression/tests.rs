use super::*;
use bytes::Bytes;
use std::io::Write;

const WINDOW: u32 = 23;

/// Source-like text: compressible, not trivially.
fn text(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut i = 0u64;
    while out.len() < len {
        out.extend_from_slice(
            format!("fn item_{i}(x: u64) -> u64 {{ x * {} }}\n", i % 97).as_bytes(),
        );
        i += 1;
    }
    out.truncate(len);
    out
}

fn drain(inflater: &mut Inflater, chunk: usize) -> Result<Vec<u8>, InflateError> {
    let mut out = Vec::new();
    while let Some(piece) = inflater.next_chunk()? {
        assert!(piece.len() <= chunk, "a step gave {} bytes", piece.len());
        out.extend_from_slice(&piece);
    }
    Ok(out)
}

#[test]
fn round_trips_in_bounded_chunks_across_any_split_of_the_input() {
    let data = text(300_000);
    let packed = compress(3, &data).unwrap();
    assert!(packed.len() < data.len() / 3);
    for split in [1, 7, 4096, packed.len()] {
        let mut inflater = Inflater::new(data.len() as u64, 16 << 10, WINDOW).unwrap();
        let mut out = Vec::new();
        for piece in packed.chunks(split) {
            inflater.push(Bytes::copy_from_slice(piece));
            out.extend(drain(&mut inflater, 16 << 10).unwrap());
        }
        inflater.finish().unwrap();
        assert_eq!(out, data, "split {split}");
    }
}

#[test]
fn deflater_output_in_pieces_is_one_valid_frame() {
    let data = text(1 << 20);
    let mut d = Deflater::new(1, Some(data.len() as u64)).unwrap();
    let mut packed = Vec::new();
    for piece in data.chunks(100_000) {
        packed.extend_from_slice(&d.push(piece).unwrap());
    }
    packed.extend_from_slice(&d.finish().unwrap());
    assert_eq!(
        decompress(Bytes::from(packed), data.len() as u64, WINDOW).unwrap(),
        data
    );
}

#[test]
fn concatenated_frames_are_one_stream() {
    let (a, b) = (text(5000), b"tail".to_vec());
    let mut packed = compress(1, &a).unwrap().to_vec();
    packed.extend_from_slice(&compress(1, &b).unwrap());
    let whole = [a, b].concat();
    assert_eq!(
        decompress(Bytes::from(packed), whole.len() as u64, WINDOW).unwrap(),
        whole
    );
}

#[test]
fn a_bomb_stops_one_byte_past_the_declared_size() {
    // 1 GiB of zeros in a few kilobytes, claiming to be 10 bytes.
    let mut e = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..1024 {
        e.write_all(&zeros).unwrap();
    }
    let bomb = e.finish().unwrap();
    assert!(bomb.len() < 200_000);
    let mut inflater = Inflater::new(10, 1 << 20, WINDOW).unwrap();
    inflater.push(Bytes::from(bomb.clone()));
    assert_eq!(
        drain(&mut inflater, 11),
        Err(InflateError::TooLong { size: 10 })
    );
    assert_eq!(
        decompress(Bytes::from(bomb), 10, WINDOW),
        Err(InflateError::TooLong { size: 10 })
    );
}

#[test]
fn short_output_is_refused_whole() {
    let packed = compress(1, b"four").unwrap();
    assert!(matches!(
        decompress(packed, 5, WINDOW),
        Err(InflateError::Corrupt(m)) if m.contains("4 bytes")
    ));
}

#[test]
fn garbage_and_truncation_are_refused() {
    let mut inflater = Inflater::new(100, 64, WINDOW).unwrap();
    inflater.push(Bytes::from_static(b"this is not zstd at all"));
    assert!(matches!(
        drain(&mut inflater, 64),
        Err(InflateError::Corrupt(_))
    ));

    let data = text(50_000);
    let packed = compress(1, &data).unwrap();
    let mut inflater = Inflater::new(data.len() as u64, 1 << 16, WINDOW).unwrap();
    inflater.push(packed.slice(..packed.len() - 3));
    drain(&mut inflater, 1 << 16).unwrap();
    assert_eq!(inflater.finish(), Err(InflateError::Truncated));
}

#[test]
fn a_frame_asking_for_a_window_above_the_cap_is_refused() {
    // Streamed without a size, so the header declares the whole 2^25 window.
    let mut raw = zstd::stream::raw::Encoder::new(1).unwrap();
    raw.set_parameter(zstd::stream::raw::CParameter::WindowLog(25))
        .unwrap();
    let mut e = zstd::stream::write::Encoder::with_encoder(Vec::new(), raw);
    e.write_all(&text(1000)).unwrap();
    let packed = e.finish().unwrap();
    let mut inflater = Inflater::new(1000, 1 << 16, WINDOW).unwrap();
    inflater.push(Bytes::from(packed.clone()));
    assert!(matches!(
        drain(&mut inflater, 1 << 16),
        Err(InflateError::Corrupt(_))
    ));
    // The same frame is fine under a cap that allows it.
    assert_eq!(
        decompress(Bytes::from(packed), 1000, 25).unwrap(),
        text(1000)
    );
}

#[test]
fn no_input_is_a_finished_empty_stream() {
    let inflater = Inflater::new(0, 64, WINDOW).unwrap();
    inflater.finish().unwrap();
    assert_eq!(
        decompress(compress(1, b"").unwrap(), 0, WINDOW).unwrap(),
        Bytes::new()
    );
}

#[test]
fn compressor_names_and_values() {
    assert_eq!(Compressor::from_segment("zstd"), Ok(Compressor::Zstd));
    assert!(Compressor::from_segment("identity").is_err());
    assert!(Compressor::from_segment("deflate").is_err());
    assert_eq!(Compressor::from_proto(0), Ok(Compressor::Identity));
    assert_eq!(Compressor::from_proto(1), Ok(Compressor::Zstd));
    assert_eq!(
        Compressor::from_proto(3),
        Err(UnknownCompressor("brotli".into()))
    );
    assert!(Compressor::from_proto(99).is_err());
    assert_eq!(Compressor::Zstd.proto(), 1);
    assert_eq!(Compressor::Zstd.segment(), Some("zstd"));
}

#[test]
fn one_frame_is_one_regular_frame_and_nothing_else() {
    let data = b"one frame of text, one frame of text, one frame of text".repeat(10);
    let frame = zstd::encode_all(&data[..], 3).unwrap();
    assert!(is_one_frame(&frame));
    let mut two = frame.clone();
    two.extend_from_slice(&frame);
    let mut skippable = Vec::new();
    skippable.extend_from_slice(&0x184D_2A50u32.to_le_bytes());
    skippable.extend_from_slice(&3u32.to_le_bytes());
    skippable.extend_from_slice(b"abc");
    let mut padded = frame.clone();
    padded.extend_from_slice(&skippable);
    let mut led = skippable.clone();
    led.extend_from_slice(&frame);
    for bad in [
        two,
        padded,
        led,
        skippable,
        frame[..frame.len() - 1].to_vec(),
        Vec::new(),
        b"not zstd".to_vec(),
    ] {
        assert!(!is_one_frame(&bad), "{bad:?}");
    }
}

#[test]
fn a_deflaters_output_is_one_frame() {
    let data = text(3 << 20);
    let mut d = Deflater::new(3, Some(data.len() as u64)).unwrap();
    let mut out = Vec::new();
    out.extend_from_slice(&d.push(&data[..1000]).unwrap());
    out.extend_from_slice(&d.push(&data[1000..]).unwrap());
    out.extend_from_slice(&d.finish().unwrap());
    assert!(is_one_frame(&out));
}
