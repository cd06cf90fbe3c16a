//! Golden vectors that pin the recipe address encoding documented in the crate docs, plus
//! properties of addresses and the validation of function ids and recipes.
//!
//! Every hex literal below was computed independently of this crate, by a short Python script
//! that implements the documented encoding (version byte, `u32` LE length-prefixed strings,
//! `u32` LE counts, raw 32-byte inputs, params sorted bytewise by key) and hashes it with the
//! `blake3` Python package (`blake3.blake3(data, derive_key_context=CONTEXT)`). If one of these
//! tests fails, the encoding changed: that needs a new version byte and context string, not new
//! literals.

use deriva_core::recipe::{
    MAX_FUNCTION_PART_LEN, MAX_INPUTS, MAX_PARAMS, RECIPE_ADDR_CONTEXT, RECIPE_ENCODING_VERSION,
};
use deriva_core::{CAddr, DerivaError, FunctionId, Recipe};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn fid(name: &str, version: &str) -> FunctionId {
    FunctionId::new(name, version).expect("valid function id")
}

fn recipe(function: FunctionId, inputs: Vec<CAddr>, params: &[(&str, &str)]) -> Recipe {
    Recipe::new(function, inputs, params.iter().copied()).expect("valid recipe")
}

fn hello() -> CAddr {
    CAddr::for_leaf(b"hello")
}

fn world() -> CAddr {
    CAddr::for_leaf(b"world")
}

/// `concat/v1(hello, world)` with no params.
fn concat_hello_world() -> Recipe {
    recipe(fid("concat", "v1"), vec![hello(), world()], &[])
}

/// `repeat/v1(hello)` with `count = 3`.
fn repeat_count_3() -> Recipe {
    recipe(fid("repeat", "v1"), vec![hello()], &[("count", "3")])
}

/// Asserts that `result` is `InvalidInput` whose message contains `needle`.
#[track_caller]
fn assert_invalid<T: std::fmt::Debug>(result: Result<T, DerivaError>, needle: &str) {
    match result {
        Err(DerivaError::InvalidInput(message)) => assert!(
            message.contains(needle),
            "InvalidInput message {message:?} does not mention {needle:?}"
        ),
        other => panic!("expected InvalidInput mentioning {needle:?}, got {other:?}"),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------------------------
// Golden vectors
// ---------------------------------------------------------------------------------------------

#[test]
fn constants_match_the_documented_encoding() {
    assert_eq!(RECIPE_ENCODING_VERSION, 0x01);
    assert_eq!(RECIPE_ADDR_CONTEXT, "deriva 2026-11-25 recipe address v1");
}

#[test]
fn leaf_address_is_plain_blake3() {
    let cases: [(&[u8], &str); 4] = [
        (
            b"hello",
            "ea8f163db38682925e4491c5e58d4bb3506ef8c14eb78a86e908c5624a67200f",
        ),
        (
            b"world",
            "d7894ae9716d38d2dfad0ec55424ca321ee12453d51f1b3adeb77d0475ed988c",
        ),
        (
            b"",
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262",
        ),
        (
            b"abc",
            "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85",
        ),
    ];
    for (data, expected) in cases {
        assert_eq!(CAddr::for_leaf(data).to_hex(), expected, "leaf {data:?}");
    }
    let all_bytes: Vec<u8> = (0..=255u8).collect();
    assert_eq!(
        CAddr::for_leaf(&all_bytes).to_string(),
        "4a495ba42461748eca8fdad618f976aa726cc2903de9fcb40735a786ac1c196b"
    );
}

#[test]
fn golden_concat_of_two_leaves() {
    assert_eq!(
        concat_hello_world().addr().to_hex(),
        "1ce491556b6ea72550221d570d3d9f2f6b3af961d709650a4caa8d78307368ff"
    );
}

#[test]
fn golden_concat_with_inputs_swapped() {
    let r = recipe(fid("concat", "v1"), vec![world(), hello()], &[]);
    assert_eq!(
        r.addr().to_hex(),
        "ce78f6628863a9afa03d80417d0551175e1f5f67a0fd33cb260ef94a59f5e60c"
    );
}

#[test]
fn golden_recipe_with_one_param() {
    assert_eq!(
        repeat_count_3().addr().to_hex(),
        "66603c2f10f63e30cc567604f6c5a472640c605f26677a28b514d594c4651b6d"
    );
}

#[test]
fn golden_recipe_without_inputs_or_params() {
    let r = recipe(fid("const", "v1"), vec![], &[]);
    assert_eq!(
        r.addr().to_hex(),
        "e8bd7d94c9fd659818eff7df65f20c94a6d867218c1cb89226a7ef8904252df4"
    );
    // version, "const", "v1", zero inputs, zero params.
    assert_eq!(
        hex(&r.canonical_bytes()),
        "0105000000636f6e73740200000076310000000000000000"
    );
}

#[test]
fn golden_recipe_with_unicode_and_several_params() {
    // Given deliberately out of order; the keys sort bytewise as
    // "Zeta" < "a" < "emoji" < "sep" < "z" < "é".
    let r = recipe(
        fid("tränsform", "v2.0-β"),
        vec![hello(), world(), hello()],
        &[
            ("sep", "éè—"),
            ("emoji", "🦀 rust"),
            ("z", ""),
            ("a", "漢字"),
            ("Zeta", "1"),
            ("é", "accent key"),
        ],
    );
    assert_eq!(
        r.addr().to_hex(),
        "ccc5bde8b71a08609fd4794d62e6668365ad4e336d4491a5a5422c621ed75270"
    );
    let keys: Vec<&str> = r.params().keys().map(String::as_str).collect();
    assert_eq!(keys, ["Zeta", "a", "emoji", "sep", "z", "é"]);
}

#[test]
fn golden_canonical_bytes() {
    // 01                                   version
    // 06000000 726570656174                "repeat"
    // 02000000 7631                        "v1"
    // 01000000 ea8f…200f                   one input: leaf("hello")
    // 01000000 05000000 636f756e74 01000000 33   one param: "count" = "3"
    assert_eq!(
        hex(&repeat_count_3().canonical_bytes()),
        "010600000072657065617402000000763101000000\
         ea8f163db38682925e4491c5e58d4bb3506ef8c14eb78a86e908c5624a67200f\
         0100000005000000636f756e740100000033"
    );
    assert_eq!(
        hex(&concat_hello_world().canonical_bytes()),
        "0106000000636f6e63617402000000763102000000\
         ea8f163db38682925e4491c5e58d4bb3506ef8c14eb78a86e908c5624a67200f\
         d7894ae9716d38d2dfad0ec55424ca321ee12453d51f1b3adeb77d0475ed988c\
         00000000"
    );
}

#[test]
fn recipe_address_is_not_the_leaf_address_of_its_encoding() {
    let r = concat_hello_world();
    let as_leaf = CAddr::for_leaf(&r.canonical_bytes());
    // Independently computed: blake3(canonical bytes) in plain hashing mode.
    assert_eq!(
        as_leaf.to_hex(),
        "61338564fcf7c9846e0103ece7d5091f1abfc5f5332a87deeadabe85b3e3b466"
    );
    assert_ne!(r.addr(), as_leaf);
}

#[test]
fn input_order_matters() {
    let ab = recipe(fid("concat", "v1"), vec![hello(), world()], &[]);
    let ba = recipe(fid("concat", "v1"), vec![world(), hello()], &[]);
    assert_ne!(ab.addr(), ba.addr());
    assert_ne!(ab, ba);
}

#[test]
fn canonical_decoding_rejects_malformed_encodings() {
    let good = repeat_count_3().canonical_bytes();
    assert_eq!(
        Recipe::from_canonical_bytes(&good).unwrap(),
        repeat_count_3()
    );

    let mut wrong_version = good.clone();
    wrong_version[0] = 2;
    assert!(Recipe::from_canonical_bytes(&wrong_version).is_err());

    let mut trailing = good.clone();
    trailing.push(0);
    assert!(Recipe::from_canonical_bytes(&trailing).is_err());

    assert!(Recipe::from_canonical_bytes(&good[..good.len() - 1]).is_err());
    assert!(Recipe::from_canonical_bytes(&[]).is_err());
}

// ---------------------------------------------------------------------------------------------
// FunctionId validation
// ---------------------------------------------------------------------------------------------

#[test]
fn function_id_rejects_empty_parts() {
    assert_invalid(FunctionId::new("", "v1"), "function name is empty");
    assert_invalid(FunctionId::new("concat", ""), "function version is empty");
}

#[test]
fn function_id_rejects_slash() {
    assert_invalid(FunctionId::new("con/cat", "v1"), "contains '/'");
    assert_invalid(FunctionId::new("concat", "v/1"), "contains '/'");
}

#[test]
fn function_id_rejects_control_characters() {
    assert_invalid(FunctionId::new("con\ncat", "v1"), "control character");
    assert_invalid(FunctionId::new("concat", "v1\u{7f}"), "control character");
}

#[test]
fn function_id_length_limit_is_128_bytes() {
    assert_eq!(MAX_FUNCTION_PART_LEN, 128);
    let ok = "a".repeat(128);
    let id = FunctionId::new(ok.clone(), ok.clone()).expect("128 bytes is allowed");
    assert_eq!(id.name(), ok);

    assert_invalid(FunctionId::new("a".repeat(129), "v1"), "129 bytes");
    assert_invalid(FunctionId::new("f", "a".repeat(129)), "limit is 128");
    // The limit is in bytes, not characters: 65 two-byte characters are 130 bytes.
    assert!(FunctionId::new("é".repeat(64), "v1").is_ok());
    assert_invalid(FunctionId::new("é".repeat(65), "v1"), "130 bytes");
}

#[test]
fn function_id_parses_and_displays() {
    let id: FunctionId = "concat/v1".parse().unwrap();
    assert_eq!(id.name(), "concat");
    assert_eq!(id.version(), "v1");
    assert_eq!(id, fid("concat", "v1"));
    assert_eq!(id.to_string(), "concat/v1");
    assert_eq!(id.to_string().parse::<FunctionId>().unwrap(), id);

    assert_invalid("concat".parse::<FunctionId>(), "name/version");
    assert_invalid("a/b/c".parse::<FunctionId>(), "contains '/'");
    assert_invalid("/v1".parse::<FunctionId>(), "function name is empty");
}

// ---------------------------------------------------------------------------------------------
// Recipe limits
// ---------------------------------------------------------------------------------------------

fn n_inputs(n: usize) -> Vec<CAddr> {
    (0..n).map(|i| CAddr::for_leaf(&i.to_le_bytes())).collect()
}

fn n_params(n: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|i| (format!("k{i:04}"), i.to_string()))
        .collect()
}

#[test]
fn recipe_input_limit() {
    assert_eq!(MAX_INPUTS, 1024);
    assert!(Recipe::new(fid("f", "v1"), n_inputs(1024), n_params(0)).is_ok());
    assert_invalid(
        Recipe::new(fid("f", "v1"), n_inputs(1025), n_params(0)),
        "1025",
    );
}

#[test]
fn recipe_param_limit() {
    assert_eq!(MAX_PARAMS, 256);
    assert!(Recipe::new(fid("f", "v1"), vec![], n_params(256)).is_ok());
    assert_invalid(
        Recipe::new(fid("f", "v1"), vec![], n_params(257)),
        "at most 256 params",
    );
}

#[test]
fn recipe_rejects_empty_param_key() {
    assert_invalid(
        Recipe::new(fid("f", "v1"), vec![], [("", "x")]),
        "param key",
    );
}

#[test]
fn recipe_rejects_duplicate_param_key() {
    assert_invalid(
        Recipe::new(
            fid("f", "v1"),
            vec![],
            [("k", "1"), ("other", "2"), ("k", "1")],
        ),
        "\"k\" is given twice",
    );
}

// ---------------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------------

/// Name or version: 1–16 characters (at most 32 bytes), no `/`, no control characters.
fn function_part() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9._é β-]{1,16}"
}

fn inputs() -> impl Strategy<Value = Vec<CAddr>> {
    prop::collection::vec(any::<[u8; 32]>().prop_map(CAddr::from_bytes), 0..6)
}

/// Unique params as a `Vec`, in key order.
fn unique_params(min: usize) -> impl Strategy<Value = Vec<(String, String)>> {
    prop::collection::btree_map("[a-zA-Z0-9_é漢]{1,10}", any::<String>(), min..8)
        .prop_map(|m| m.into_iter().collect())
}

fn build(name: &str, version: &str, inputs: &[CAddr], params: &[(String, String)]) -> Recipe {
    Recipe::new(fid(name, version), inputs.to_vec(), params.iter().cloned()).unwrap()
}

proptest! {
    #[test]
    fn address_is_deterministic(
        name in function_part(),
        version in function_part(),
        inputs in inputs(),
        params in unique_params(0),
    ) {
        let a = build(&name, &version, &inputs, &params);
        let b = build(&name, &version, &inputs, &params);
        prop_assert_eq!(a.addr(), b.addr());
        prop_assert_eq!(a.canonical_bytes(), b.canonical_bytes());
        // Domain separation holds for every recipe.
        prop_assert_ne!(a.addr(), CAddr::for_leaf(&a.canonical_bytes()));
    }

    #[test]
    fn param_insertion_order_does_not_matter(
        (params, shuffled) in unique_params(0)
            .prop_flat_map(|p| (Just(p.clone()), Just(p).prop_shuffle())),
        inputs in inputs(),
    ) {
        let sorted = build("f", "v1", &inputs, &params);
        let permuted = build("f", "v1", &inputs, &shuffled);
        prop_assert_eq!(sorted.addr(), permuted.addr());
        prop_assert_eq!(sorted.canonical_bytes(), permuted.canonical_bytes());
        prop_assert_eq!(sorted, permuted);
    }

    #[test]
    fn canonical_bytes_round_trip(
        name in function_part(),
        version in function_part(),
        inputs in inputs(),
        params in unique_params(0),
    ) {
        let r = build(&name, &version, &inputs, &params);
        let decoded = Recipe::from_canonical_bytes(&r.canonical_bytes()).unwrap();
        prop_assert_eq!(decoded.addr(), r.addr());
        prop_assert_eq!(&decoded, &r);
        prop_assert_eq!(decoded.canonical_bytes(), r.canonical_bytes());
    }

    #[test]
    fn changing_one_param_value_changes_the_address(
        params in unique_params(1),
        index in any::<prop::sample::Index>(),
        new_value in any::<String>(),
        inputs in inputs(),
    ) {
        let i = index.index(params.len());
        prop_assume!(params[i].1 != new_value);
        let mut changed = params.clone();
        changed[i].1 = new_value;
        let before = build("f", "v1", &inputs, &params);
        let after = build("f", "v1", &inputs, &changed);
        prop_assert_ne!(before.addr(), after.addr());
    }
}

// ---------------------------------------------------------------------------------------------
// Materialization records (deriva_core::provenance)
// ---------------------------------------------------------------------------------------------

/// The record the vectors below encode, computed by the same Python script from the layout in
/// `deriva_core::provenance`'s docs (`struct.pack('<I'…)`, `'<Q'`).
fn golden_record() -> deriva_core::Record {
    deriva_core::Record {
        recipe: CAddr::from([7; 32]),
        function: fid("concat", "v1"),
        inputs: vec![CAddr::from([1; 32]), CAddr::from([2; 32])],
        output_hash: CAddr::from([3; 32]),
        output_bytes: 11,
        node: "node-a".into(),
        started_at_micros: 1_765_000_000_000_000,
        duration_micros: 3_100_000,
        span: deriva_core::SpanRef::from_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
    }
}

const GOLDEN_RECORD: &str = concat!(
    "0107070707070707070707070707070707070707070707070707070707070707",
    "0706000000636f6e636174020000007631020000000101010101010101010101",
    "0101010101010101010101010101010101010101010202020202020202020202",
    "0202020202020202020202020202020202020202020303030303030303030303",
    "0303030303030303030303030303030303030303030b00000000000000060000",
    "006e6f64652d610050071642450600604d2f00000000004bf92f3577b34da6a3",
    "ce929d0e0e473600f067aa0ba902b7",
);

#[test]
fn golden_record_encoding() {
    let record = golden_record();
    assert_eq!(hex::encode(record.canonical_bytes()), GOLDEN_RECORD);
    assert_eq!(
        deriva_core::Record::from_canonical_bytes(&hex::decode(GOLDEN_RECORD).unwrap()).unwrap(),
        record
    );
}

#[test]
fn golden_signed_and_stored_record() {
    let signed = deriva_core::SignedRecord {
        record: golden_record(),
        signature: Some([9; 64]),
    };
    let expected_signed = format!("{GOLDEN_RECORD}01{}", "09".repeat(64));
    assert_eq!(hex::encode(signed.to_bytes()), expected_signed);
    let stored = deriva_core::Provenance {
        signed: signed.clone(),
        audits: deriva_core::Audits {
            matches: 5,
            mismatches: 1,
            errors: 0,
        },
    };
    let expected_stored = format!(
        "{expected_signed}{}{}{}",
        "0500000000000000", "0100000000000000", "0000000000000000"
    );
    assert_eq!(hex::encode(stored.to_bytes()), expected_stored);
    assert_eq!(
        deriva_core::Provenance::from_bytes(&hex::decode(expected_stored).unwrap()).unwrap(),
        stored
    );
    // Unsigned, with no span: zero ids and a zero flag.
    let mut unsigned = golden_record();
    unsigned.span = None;
    let bytes = deriva_core::SignedRecord {
        record: unsigned,
        signature: None,
    }
    .to_bytes();
    assert!(hex::encode(&bytes).ends_with(&format!("{}00", "00".repeat(24))));
}
