//! Mutations of a valid input for the randomized parser tests: byte edits (flip, overwrite,
//! insert, delete, truncate, duplicate), numbers in the text replaced by extreme ones, and JSON
//! nodes replaced by values of the wrong type or extreme size.

use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::{json, Value};

/// One edit of a byte string.
#[derive(Debug, Clone)]
pub enum ByteOp {
    /// Flip one bit.
    Flip(Index, u8),
    /// Insert bytes (random, or a JSON fragment).
    Insert(Index, Vec<u8>),
    /// Delete up to `len` bytes.
    Delete(Index, usize),
    /// Keep only a prefix.
    Truncate(Index),
    /// Copy a run of the input to another place.
    Duplicate(Index, Index, usize),
    /// Replace the `Index`-th number in the text.
    Number(Index, &'static str),
}

/// Numbers that break sizes: zero, negatives, the edges of u32/u64/i64, floats past f64.
pub const NUMBERS: &[&str] = &[
    "0",
    "-1",
    "1",
    "3",
    "-0",
    "0.5",
    "1e-300",
    "4294967295",
    "4294967296",
    "9007199254740993",
    "9223372036854775807",
    "-9223372036854775809",
    "18446744073709551615",
    "18446744073709551616",
    "1e308",
    "1e400",
    "-1e400",
    "340282366920938463463374607431768211456",
];

/// JSON fragments worth splicing in.
const FRAGMENTS: &[&str] = &[
    "{", "}", "[", "]", "\"", ",", ":", "null", "true", "\\u0000", "\\ud800", "{}", "[]",
    "\"data_offsets\":[0,18446744073709551615]", "\"weight_map\":{}", "\"../x\"",
    "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
];

fn byte_op() -> impl Strategy<Value = ByteOp> {
    let insert = prop_oneof![
        prop::collection::vec(any::<u8>(), 1..16),
        prop::sample::select(FRAGMENTS).prop_map(|s| s.as_bytes().to_vec()),
    ];
    prop_oneof![
        (any::<Index>(), 0..8u8).prop_map(|(i, b)| ByteOp::Flip(i, b)),
        (any::<Index>(), insert).prop_map(|(i, b)| ByteOp::Insert(i, b)),
        (any::<Index>(), 1..64usize).prop_map(|(i, n)| ByteOp::Delete(i, n)),
        any::<Index>().prop_map(ByteOp::Truncate),
        (any::<Index>(), any::<Index>(), 1..256usize)
            .prop_map(|(a, b, n)| ByteOp::Duplicate(a, b, n)),
        (any::<Index>(), prop::sample::select(NUMBERS)).prop_map(|(i, s)| ByteOp::Number(i, s)),
    ]
}

/// One to eight byte edits.
pub fn byte_ops() -> impl Strategy<Value = Vec<ByteOp>> {
    prop::collection::vec(byte_op(), 1..8)
}

/// The spans of the numbers (digits, with sign, point and exponent) in `bytes`.
fn numbers(bytes: &[u8]) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_digit() {
            let start = if i > 0 && bytes[i - 1] == b'-' {
                i - 1
            } else {
                i
            };
            while i < bytes.len() && matches!(bytes[i], b'0'..=b'9' | b'.' | b'e' | b'E' | b'+') {
                i += 1;
            }
            spans.push((start, i));
        } else {
            i += 1;
        }
    }
    spans
}

/// `input` with `ops` applied in order.
pub fn apply(input: &[u8], ops: &[ByteOp]) -> Vec<u8> {
    let mut b = input.to_vec();
    for op in ops {
        let n = b.len();
        match op {
            ByteOp::Flip(i, bit) if n > 0 => b[i.index(n)] ^= 1 << bit,
            ByteOp::Insert(i, bytes) => {
                let at = i.index(n + 1);
                b.splice(at..at, bytes.iter().copied());
            }
            ByteOp::Delete(i, len) if n > 0 => {
                let at = i.index(n);
                b.drain(at..(at + len).min(n));
            }
            ByteOp::Truncate(i) => b.truncate(i.index(n + 1)),
            ByteOp::Duplicate(from, to, len) if n > 0 => {
                let from = from.index(n);
                let run = b[from..(from + len).min(n)].to_vec();
                let to = to.index(n + 1);
                b.splice(to..to, run);
            }
            ByteOp::Number(i, with) => {
                let spans = numbers(&b);
                if !spans.is_empty() {
                    let (s, e) = spans[i.index(spans.len())];
                    b.splice(s..e, with.bytes());
                }
            }
            _ => {}
        }
    }
    b
}

/// One edit of a JSON document: a node replaced, or removed from its parent.
#[derive(Debug, Clone)]
pub enum JsonOp {
    /// Replace the `Index`-th node (pre-order) by the value.
    Replace(Index, Value),
    /// Remove the `Index`-th node from its object or array.
    Remove(Index),
}

/// Values of every JSON type, at the edges of the sizes a parser stores them in.
pub fn interesting_value() -> impl Strategy<Value = Value> {
    let fixed = vec![
        Value::Null,
        json!(true),
        json!(0),
        json!(1),
        json!(2),
        json!(3),
        json!(-1),
        json!(u32::MAX),
        json!(u32::MAX as u64 + 1),
        json!(1u64 << 53),
        json!(i64::MAX),
        json!(i64::MIN),
        json!(u64::MAX),
        json!(1e308),
        json!(-1e308),
        json!(0.5),
        json!(1e-300),
        json!(""),
        json!("x"),
        json!("../../etc/passwd"),
        json!("/abs"),
        json!("F64"),
        json!("BOOL"),
        json!("llama3"),
        json!("linear"),
        json!("yarn"),
        json!("WordPiece"),
        json!("Unigram"),
        json!("WordLevel"),
        json!("Split"),
        json!([]),
        json!([u64::MAX]),
        json!([0, u64::MAX]),
        json!({}),
        json!({ "type": "BPE" }),
        json!({ "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 0 }),
    ];
    prop_oneof![
        prop::sample::select(fixed),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        "[a-z.]{0,12}".prop_map(Value::from),
    ]
}

/// One to six JSON edits.
pub fn json_ops() -> impl Strategy<Value = Vec<JsonOp>> {
    let op = prop_oneof![
        3 => (any::<Index>(), interesting_value()).prop_map(|(i, v)| JsonOp::Replace(i, v)),
        1 => any::<Index>().prop_map(JsonOp::Remove),
    ];
    prop::collection::vec(op, 1..6)
}

/// The JSON pointers of every node of `v`, pre-order, the root first.
fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            out.push(at.clone());
            for (k, x) in m {
                let k = k.replace('~', "~0").replace('/', "~1");
                pointers(x, format!("{at}/{k}"), out);
            }
        }
        Value::Array(a) => {
            out.push(at.clone());
            for (i, x) in a.iter().enumerate() {
                pointers(x, format!("{at}/{i}"), out);
            }
        }
        _ => out.push(at),
    }
}

/// `v` with `ops` applied in order.
pub fn apply_json(v: &Value, ops: &[JsonOp]) -> Value {
    let mut v = v.clone();
    for op in ops {
        let mut all = Vec::new();
        pointers(&v, String::new(), &mut all);
        match op {
            JsonOp::Replace(i, x) => {
                let p = &all[i.index(all.len())];
                *v.pointer_mut(p).expect("a pointer just listed") = x.clone();
            }
            JsonOp::Remove(i) => {
                let p = &all[i.index(all.len())];
                let Some((parent, key)) = p.rsplit_once('/') else {
                    continue;
                };
                let key = key.replace("~1", "/").replace("~0", "~");
                match v.pointer_mut(parent) {
                    Some(Value::Object(m)) => {
                        m.remove(&key);
                    }
                    Some(Value::Array(a)) => {
                        a.remove(key.parse::<usize>().expect("an array index"));
                    }
                    _ => {}
                }
            }
        }
    }
    v
}
