//! The parser against hand-assembled and hostile files.

use super::super::writer::GgufWriter;
use super::*;

fn le32(v: u32) -> [u8; 4] {
    v.to_le_bytes()
}
fn le64(v: u64) -> [u8; 8] {
    v.to_le_bytes()
}

/// A hand-assembled file so that tests can put bad values in known places.
struct Raw(Vec<u8>);
impl Raw {
    fn header(version: u32, n_tensors: u64, n_kv: u64) -> Raw {
        let mut v = b"GGUF".to_vec();
        v.extend(le32(version));
        v.extend(le64(n_tensors));
        v.extend(le64(n_kv));
        Raw(v)
    }
    fn str(&mut self, s: &[u8]) -> &mut Self {
        self.0.extend(le64(s.len() as u64));
        self.0.extend(s);
        self
    }
    fn u32(&mut self, x: u32) -> &mut Self {
        self.0.extend(le32(x));
        self
    }
    fn u64(&mut self, x: u64) -> &mut Self {
        self.0.extend(le64(x));
        self
    }
    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend(b);
        self
    }
    fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, offset: u64) -> &mut Self {
        self.str(name.as_bytes()).u32(dims.len() as u32);
        for &d in dims {
            self.u64(d);
        }
        self.u32(ty).u64(offset)
    }
    fn pad_to(&mut self, align: usize) -> &mut Self {
        while !self.0.len().is_multiple_of(align) {
            self.0.push(0);
        }
        self
    }
}

fn err_of(bytes: &[u8]) -> String {
    match parse(bytes) {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

/// A small but varied file: every value type, nested array, two tensors.
fn sample() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.add_kv("general.architecture", &GgufValue::String(b"llama")).unwrap();
    w.add_kv("a.u8", &GgufValue::U8(7)).unwrap();
    w.add_kv("a.i8", &GgufValue::I8(-7)).unwrap();
    w.add_kv("a.u16", &GgufValue::U16(700)).unwrap();
    w.add_kv("a.i16", &GgufValue::I16(-700)).unwrap();
    w.add_kv("a.u32", &GgufValue::U32(70000)).unwrap();
    w.add_kv("a.i32", &GgufValue::I32(-70000)).unwrap();
    w.add_kv("a.f32", &GgufValue::F32(1e-5)).unwrap();
    w.add_kv("a.bool", &GgufValue::Bool(true)).unwrap();
    w.add_kv("a.u64", &GgufValue::U64(1 << 40)).unwrap();
    w.add_kv("a.i64", &GgufValue::I64(-(1 << 40))).unwrap();
    w.add_kv("a.f64", &GgufValue::F64(0.25)).unwrap();
    w.add_kv("a.strs", &GgufValue::Array(GgufArray::String(vec![b"x", b"", b"hello"]))).unwrap();
    w.add_kv("a.i32s", &GgufValue::Array(GgufArray::I32(vec![1, -2, 3]))).unwrap();
    w.add_kv(
        "a.nested",
        &GgufValue::Array(GgufArray::Array(vec![GgufArray::U8(vec![1, 2]), GgufArray::Bool(vec![true, false])])),
    )
    .unwrap();
    w.add_f32("t.a", &[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
    w.add_q8_0("t.b", &[1, 32], &(0..32).map(|i| i as f32).collect::<Vec<_>>()).unwrap();
    w.to_bytes().unwrap()
}

#[test]
fn type_table_is_complete_and_consistent() {
    for &(id, ty, bs, ts) in GgmlType::TABLE.iter() {
        assert_eq!(GgmlType::from_id(id), Some(ty));
        assert_eq!(ty.id(), id);
        assert_eq!((ty.block_size(), ty.type_size()), (bs, ts));
    }
    assert_eq!(GgmlType::from_id(4), None, "ids 4 and 5 were removed from ggml");
    assert_eq!(GgmlType::from_id(99), None);
}

#[test]
fn parses_what_the_writer_wrote() {
    let bytes = sample();
    let f = parse(&bytes).unwrap();
    assert_eq!(f.version, 3);
    assert_eq!(f.alignment, 32);
    assert_eq!(f.data_offset % 32, 0);
    assert_eq!(f.get_str("general.architecture").unwrap(), Some("llama"));
    assert_eq!(f.get("a.i8"), Some(&GgufValue::I8(-7)));
    assert_eq!(f.get("a.i16"), Some(&GgufValue::I16(-700)));
    assert_eq!(f.get_u64("a.u32").unwrap(), Some(70000));
    assert_eq!(f.get_f64("a.f32").unwrap(), Some(1e-5));
    assert_eq!(f.get_bool("a.bool").unwrap(), Some(true));
    assert_eq!(f.get("a.i64"), Some(&GgufValue::I64(-(1 << 40))));
    assert!(f.get_u64("a.i32").is_err(), "negative values are not counts");
    assert!(f.get_u64("general.architecture").is_err());
    let strs = f.get("a.strs").unwrap().as_array().unwrap().as_strings().unwrap();
    assert_eq!(strs, &[&b"x"[..], b"", b"hello"]);
    match f.get("a.nested").unwrap() {
        GgufValue::Array(GgufArray::Array(v)) => {
            assert_eq!(v[0], GgufArray::U8(vec![1, 2]));
            assert_eq!(v[1], GgufArray::Bool(vec![true, false]));
        }
        other => panic!("{other:?}"),
    }
    let a = f.tensor("t.a").unwrap();
    assert_eq!(a.dims, vec![3, 2]);
    assert_eq!(a.hf_shape(), vec![2, 3]);
    assert_eq!(a.ggml_type, GgmlType::F32);
    assert_eq!(a.data.len(), 24);
    let b = f.tensor("t.b").unwrap();
    assert_eq!((b.ggml_type, b.data.len(), b.offset % 32), (GgmlType::Q8_0, 34, 0));
    assert!(overlapping_tensors(&f).is_empty());
}

#[test]
fn every_truncation_is_an_error() {
    let bytes = sample();
    let f = parse(&bytes).unwrap();
    let needed = f.tensors.iter().map(|t| f.data_offset + t.offset + t.data.len() as u64).max().unwrap() as usize;
    for len in 0..needed {
        assert!(parse(&bytes[..len]).is_err(), "prefix of {len} bytes parsed");
    }
    for len in needed..=bytes.len() {
        parse(&bytes[..len]).unwrap();
    }
}

#[test]
fn random_corruption_never_panics() {
    let bytes = sample();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..3000 {
        let mut b = bytes.clone();
        for _ in 0..1 + next() % 4 {
            let i = (next() % b.len() as u64) as usize;
            b[i] = match next() % 4 {
                0 => 0xff,
                1 => 0,
                _ => next() as u8,
            };
        }
        if let Ok(f) = parse(&b) {
            for t in &f.tensors {
                if t.ggml_type.can_dequantize() && t.n_elements() < 1 << 20 {
                    let _ = super::super::dequant::dequantize(t.ggml_type, t.data, t.n_elements() as usize);
                }
            }
        }
    }
}

#[test]
fn bad_magic_version_and_endianness() {
    assert!(err_of(b"").contains("too short"));
    assert!(err_of(b"GGML\x03\0\0\0").contains("bad magic"));
    assert!(err_of(&Raw::header(1, 0, 0).0).contains("version 1"));
    assert!(err_of(&Raw::header(7, 0, 0).0).contains("unsupported GGUF version 7"));
    assert!(err_of(&Raw::header(3u32.swap_bytes(), 0, 0).0).contains("big-endian"));
    // An empty but well-formed file parses.
    let empty = Raw::header(2, 0, 0);
    let f = parse(&empty.0).unwrap();
    assert_eq!((f.version, f.tensors.len(), f.metadata.len()), (2, 0, 0));
}

#[test]
fn huge_counts_are_rejected_before_allocating() {
    assert!(err_of(&Raw::header(3, u64::MAX, 0).0).contains("tensor count"));
    assert!(err_of(&Raw::header(3, 0, u64::MAX).0).contains("metadata entry count"));
    assert!(err_of(&Raw::header(3, 1 << 40, 1 << 40).0).contains("impossible"));
    // Array of strings claiming 2^61 elements.
    let mut r = Raw::header(3, 0, 1);
    r.str(b"k").u32(9).u32(8).u64(1 << 61);
    assert!(err_of(&r.0).contains("array-of-String element count"));
    // Array of u8 claiming one more element than there are bytes.
    let mut r = Raw::header(3, 0, 1);
    r.str(b"k").u32(9).u32(0).u64(4).bytes(&[1, 2, 3]);
    assert!(err_of(&r.0).contains("impossible"));
}

#[test]
fn string_longer_than_file() {
    let mut r = Raw::header(3, 0, 1);
    r.u64(u64::MAX).bytes(&[0; 32]);
    assert!(err_of(&r.0).contains("claims 18446744073709551615 bytes"));
    let mut r = Raw::header(3, 0, 1);
    r.str(b"k").u32(8).u64(100).bytes(b"short");
    let e = err_of(&r.0);
    assert!(e.contains("`k`") && e.contains("claims 100 bytes"), "{e}");
}

#[test]
fn unknown_types_and_bad_values() {
    let mut r = Raw::header(3, 0, 1);
    r.str(b"k").u32(13).u32(0);
    assert!(err_of(&r.0).contains("unknown metadata value type 13"));
    let mut r = Raw::header(3, 0, 1);
    r.str(b"k").u32(7).bytes(&[2]);
    assert!(err_of(&r.0).contains("only 0 and 1"));
    let mut r = Raw::header(3, 0, 1);
    r.str(b"\xff\xfe").u32(0).bytes(&[2]);
    assert!(err_of(&r.0).contains("not valid UTF-8"));
    let mut r = Raw::header(3, 0, 2);
    r.str(b"k").u32(0).bytes(&[1]).str(b"k").u32(0).bytes(&[2]);
    assert!(err_of(&r.0).contains("duplicate metadata key `k`"));
    let mut r = Raw::header(3, 1, 0);
    r.tensor("w", &[32], 99, 0).pad_to(32).bytes(&[0; 64]);
    assert!(err_of(&r.0).contains("unknown ggml type id 99"));
}

#[test]
fn deep_array_nesting_is_bounded() {
    let mut r = Raw::header(3, 0, 1);
    r.str(b"k").u32(9);
    for _ in 0..10 {
        r.u32(9).u64(1);
    }
    r.u32(0).u64(0);
    assert!(err_of(&r.0).contains("nested"));
}

#[test]
fn bad_alignment() {
    for (ty, val) in [(4u32, 0u64), (4, 3), (4, 48), (10, 32)] {
        let mut r = Raw::header(3, 0, 1);
        r.str(b"general.alignment").u32(ty);
        if ty == 4 {
            r.u32(val as u32);
        } else {
            r.u64(val);
        }
        assert!(err_of(&r.0).contains("general.alignment"), "type {ty} value {val}");
    }
    // A valid non-default alignment is honoured.
    let mut r = Raw::header(3, 1, 1);
    r.str(b"general.alignment").u32(4).u32(64);
    r.tensor("w", &[4], 0, 0).pad_to(64).bytes(&[0; 16]);
    let f = parse(&r.0).unwrap();
    assert_eq!((f.alignment, f.data_offset % 64), (64, 0));
}

#[test]
fn bad_tensor_infos() {
    let cases: Vec<(Vec<u64>, u32, u64, &str)> = vec![
        (vec![], 0, 0, "0 dimensions"),
        (vec![1, 1, 1, 1, 1], 0, 0, "5 dimensions"),
        (vec![1 << 40, 1 << 40], 0, 0, "overflows"),
        (vec![u64::MAX], 0, 0, "int64"),
        (vec![16], 8, 0, "not a multiple of the Q8_0 block size 32"),
        (vec![4], 0, 8, "not a multiple of the alignment"),
        (vec![4], 0, 1 << 20, "runs past the end"),
        (vec![4], 0, u64::MAX - 31, "runs past the end"),
        (vec![1024], 0, 0, "runs past the end"),
    ];
    for (dims, ty, offset, want) in cases {
        let mut r = Raw::header(3, 1, 0);
        r.tensor("blk.0.w", &dims, ty, offset).pad_to(32).bytes(&[0; 64]);
        let e = err_of(&r.0);
        assert!(e.contains(want) && e.contains("blk.0.w"), "{dims:?} {ty} {offset}: {e}");
    }
    let mut r = Raw::header(3, 2, 0);
    r.tensor("w", &[4], 0, 0).tensor("w", &[4], 0, 32).pad_to(32).bytes(&[0; 64]);
    assert!(err_of(&r.0).contains("duplicate tensor name `w`"));
}
