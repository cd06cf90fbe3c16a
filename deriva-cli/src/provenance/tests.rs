//! Tests of the provenance tree, its JSON and the check of signatures.

use bytes::Bytes;
use deriva_core::provenance::{Record, SpanRef};
use deriva_core::recipe::FunctionId;
use deriva_util::signing::SigningKey;
use serde_json::{Value, json};

use super::*;

const TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
/// 2026-12-04T10:00:00Z.
const STARTED: u64 = 1_796_378_400_000_000;

fn now() -> SystemTime {
    // Three days and two hours after STARTED.
    UNIX_EPOCH + Duration::from_micros(STARTED) + Duration::from_secs(3 * 86_400 + 7200)
}

fn addr(n: u8) -> CAddr {
    CAddr::from([n; 32])
}

fn key() -> SigningKey {
    SigningKey::from_pem(SigningKey::generate_pem().unwrap().as_bytes()).unwrap()
}

fn record(recipe: CAddr, inputs: &[CAddr]) -> Record {
    Record {
        recipe,
        function: FunctionId::new("concat", "v1").unwrap(),
        inputs: inputs.to_vec(),
        output_hash: CAddr::for_leaf(b"out"),
        output_bytes: 11,
        node: "node-a".into(),
        started_at_micros: STARTED,
        duration_micros: 3_100_000,
        span: SpanRef::from_traceparent(TRACE),
    }
}

/// The envelope of `record`, signed by `key` if given.
fn envelope(record: Record, key: Option<&SigningKey>) -> Bytes {
    let signature = key.map(|k| k.sign(&record.canonical_bytes()));
    SignedRecord { record, signature }.to_bytes().into()
}

fn raw(a: CAddr) -> Bytes {
    Bytes::copy_from_slice(a.as_bytes())
}

fn leaf(a: CAddr, depth: u32, size: u64, stored_at: u64) -> ProvenanceEntry {
    ProvenanceEntry {
        addr: raw(a),
        kind: "leaf".into(),
        depth,
        leaf_size: size,
        stored_at_unix_micros: stored_at,
        ..Default::default()
    }
}

fn recipe(a: CAddr, depth: u32, function: &str, inputs: &[CAddr]) -> ProvenanceEntry {
    let (name, version) = function.split_once('/').unwrap();
    ProvenanceEntry {
        addr: raw(a),
        kind: "recipe".into(),
        depth,
        function_name: name.into(),
        function_version: version.into(),
        inputs: inputs.iter().map(|i| raw(*i)).collect(),
        ..Default::default()
    }
}

/// A DAG asked to depth 1: R = concat(L, S, M, U), S = uppercase(L, D); L is shared, M is
/// missing, S is not computed, D is below the depth asked, and U is a leaf that did not fit
/// (the answer is truncated).
fn dag(key: Option<&SigningKey>) -> (ProvenanceResponse, [CAddr; 6]) {
    let [r, l, s, m, u, d] = [1, 2, 3, 4, 5, 6].map(addr);
    let mut root = recipe(r, 0, "concat/v1", &[l, s, m, u]);
    root.record = envelope(record(r, &[l, s, m, u]), key);
    (root.audit_match, root.audit_mismatch) = (5, 1);
    let missing = ProvenanceEntry {
        addr: raw(m),
        kind: "missing".into(),
        depth: 1,
        ..Default::default()
    };
    let answer = ProvenanceResponse {
        entries: vec![
            root,
            leaf(l, 1, 2048, STARTED - 2 * 3_600_000_000),
            recipe(s, 1, "uppercase/v1", &[l, d]),
            missing,
        ],
        truncated: true,
    };
    (answer, [r, l, s, m, u, d])
}

#[test]
fn the_tree_shows_each_address_once_and_says_what_it_left_out() {
    let (answer, [r, ..]) = dag(None);
    let tree = Provenance::read(r, 1, &answer, None).unwrap();
    let text = tree.text(now());
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        [
            format!("provenance of {r} (depth 1, 4 entries)").as_str(),
            "  recipe 01010101 concat/v1 · node-a · 3 d ago (2026-12-04T10:00:00.000000Z) · \
             3.10 s · trace 4bf92f3577b34da6a3ce929d0e0e4736 · audits 5 match, 1 mismatch · \
             DISPUTED · unsigned",
            "    leaf 02020202 2.0 KiB · put 3 d ago (2026-12-04T08:00:00.000000Z)",
            "    recipe 03030303 uppercase/v1 · not computed",
            "      leaf 02020202 (shown above)",
            "      … 1 input not shown (below --depth 1)",
            "    missing 04040404 · not stored (collected, or never put)",
            "    … 1 input not shown (cut: the answer was truncated)",
            "(truncated: the server stopped at 4 entries; inputs past them are not shown)",
        ]
    );
    // Unsigned, never audited, a leaf without a put time, no trace.
    let mut unsigned = record(r, &[addr(2)]);
    unsigned.span = None;
    let mut root = recipe(r, 0, "concat/v1", &[addr(2)]);
    root.record = envelope(unsigned, None);
    let answer = ProvenanceResponse {
        entries: vec![root, leaf(addr(2), 1, 5, 0)],
        truncated: false,
    };
    let text = Provenance::read(r, 8, &answer, None).unwrap().text(now());
    assert!(
        text.contains("3.10 s · no trace · not audited · unsigned\n"),
        "{text}"
    );
    assert!(
        text.contains("leaf 02020202 5 B · put time unknown\n"),
        "{text}"
    );
    assert!(!text.contains("truncated"), "{text}");
}

#[test]
fn the_json_nests_inputs_once_each_with_every_field() {
    let (answer, [r, l, s, m, u, d]) = dag(None);
    let tree = Provenance::read(r, 1, &answer, None).unwrap();
    let json = serde_json::to_value(tree.json()).unwrap();
    let fields = [
        "addr",
        "kind",
        "function",
        "node",
        "trace_id",
        "span_id",
        "computed_at",
        "duration_seconds",
        "output_hash",
        "output_bytes",
        "size",
        "stored_at",
        "audits",
        "disputed",
        "signed",
        "signature",
        "error",
        "inputs",
    ];
    let keys = |v: &Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    let mut expected: Vec<String> = fields.iter().map(|f| (*f).to_owned()).collect();
    expected.sort();
    let mut with_truncated = expected.clone();
    with_truncated.push("truncated".into());
    with_truncated.sort();
    assert_eq!(keys(&json), with_truncated);
    assert_eq!(json["addr"], r.to_string());
    assert_eq!(json["kind"], "recipe");
    assert_eq!(json["function"], "concat/v1");
    assert_eq!(json["node"], "node-a");
    assert_eq!(json["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(json["span_id"], "00f067aa0ba902b7");
    assert_eq!(json["computed_at"], "2026-12-04T10:00:00.000000Z");
    assert_eq!(json["duration_seconds"], 3.1);
    assert_eq!(json["output_hash"], CAddr::for_leaf(b"out").to_string());
    assert_eq!(json["output_bytes"], 11);
    assert_eq!(
        json["audits"],
        json!({"match": 5, "mismatch": 1, "error": 0})
    );
    assert_eq!(json["disputed"], true);
    assert_eq!(json["signed"], false);
    assert_eq!(json["signature"], "unsigned");
    assert_eq!(json["truncated"], true);
    assert_eq!(
        (&json["size"], &json["stored_at"]),
        (&Value::Null, &Value::Null)
    );

    let inputs = json["inputs"].as_array().unwrap();
    assert_eq!(inputs.len(), 4);
    // The leaf, in full at its first place.
    assert_eq!(keys(&inputs[0]), expected);
    assert_eq!(inputs[0]["kind"], "leaf");
    assert_eq!(inputs[0]["size"], 2048);
    assert_eq!(inputs[0]["stored_at"], "2026-12-04T08:00:00.000000Z");
    for unknown in [
        "function",
        "node",
        "trace_id",
        "computed_at",
        "audits",
        "signature",
    ] {
        assert_eq!(inputs[0][unknown], Value::Null, "{unknown}");
    }
    // The recipe not computed: its record's fields are null, its audits are counted.
    let sub = &inputs[1];
    assert_eq!(keys(sub), expected);
    assert_eq!(sub["addr"], s.to_string());
    assert_eq!(sub["function"], "uppercase/v1");
    assert_eq!(sub["node"], Value::Null);
    assert_eq!(sub["signed"], Value::Null);
    assert_eq!(
        sub["audits"],
        json!({"match": 0, "mismatch": 0, "error": 0})
    );
    // Below it, the shared leaf only refers to the one above, and D was not explored.
    assert_eq!(
        sub["inputs"],
        json!([
            {"addr": l.to_string(), "kind": "leaf", "repeated": true},
            {"addr": d.to_string(), "kind": "unexplored"},
        ])
    );
    assert_eq!(inputs[2]["kind"], "missing");
    assert_eq!(inputs[2]["addr"], m.to_string());
    assert_eq!(inputs[2]["inputs"], json!([]));
    assert_eq!(
        inputs[3],
        json!({"addr": u.to_string(), "kind": "unexplored"})
    );
    // One object, pretty-printed as the command prints it, reads back the same.
    let printed = serde_json::to_string_pretty(&tree.json()).unwrap();
    assert_eq!(serde_json::from_str::<Value>(&printed).unwrap(), json);
}

#[test]
fn signatures_verify_and_one_altered_byte_fails_and_is_named() {
    let signer = key();
    let public = signer.public();
    let (answer, [r, ..]) = dag(Some(&signer));
    let tree = Provenance::read(r, 1, &answer, Some(&public)).unwrap();
    assert!(tree.failures().is_empty());
    assert!(tree.text(now()).contains("· DISPUTED · signature OK\n"));
    assert!(
        tree.text(now())
            .contains("signatures: 1 OK, 0 unsigned, 0 FAIL\n")
    );
    assert_eq!(
        serde_json::to_value(tree.json()).unwrap()["signature"],
        "ok"
    );
    // Without a key the signature is shown, not checked.
    let unchecked = Provenance::read(r, 1, &answer, None).unwrap();
    assert_eq!(
        serde_json::to_value(unchecked.json()).unwrap()["signature"],
        "unchecked"
    );
    assert!(unchecked.failures().is_empty());
    assert!(unchecked.text(now()).contains("· DISPUTED · signed\n"));

    // One byte of the node name altered: the record still decodes, the signature fails.
    let mut altered = answer.clone();
    let at = altered.entries[0]
        .record
        .windows(6)
        .position(|w| w == b"node-a")
        .unwrap();
    let mut bytes = altered.entries[0].record.to_vec();
    bytes[at + 5] = b'b';
    altered.entries[0].record = bytes.into();
    let tree = Provenance::read(r, 1, &altered, Some(&public)).unwrap();
    let failures = tree.failures();
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0].0, r);
    assert!(failures[0].1.contains("does not verify"), "{failures:?}");
    assert!(tree.text(now()).contains("node-b"));
    assert!(
        tree.text(now())
            .contains("signature FAILS: the signature does not verify")
    );
    let json = serde_json::to_value(tree.json()).unwrap();
    assert_eq!(json["signature"], "fails");
    assert!(json["error"].as_str().unwrap().contains("does not verify"));

    // Another key, a record that does not decode, a record of another recipe: failures.
    let tree = Provenance::read(r, 1, &answer, Some(&key().public())).unwrap();
    assert_eq!(tree.failures()[0].0, r);
    let mut broken = answer.clone();
    broken.entries[0].record.truncate(10);
    let tree = Provenance::read(r, 1, &broken, Some(&public)).unwrap();
    assert!(
        tree.failures()[0].1.contains("does not decode"),
        "{:?}",
        tree.failures()
    );
    let tree = Provenance::read(r, 1, &broken, None).unwrap();
    assert!(tree.failures().is_empty());
    assert!(tree.text(now()).contains("record unreadable"));
    let mut other = answer.clone();
    other.entries[0].record = envelope(record(addr(9), &[]), Some(&signer));
    let tree = Provenance::read(r, 1, &other, Some(&public)).unwrap();
    assert!(
        tree.failures()[0].1.contains("another recipe"),
        "{:?}",
        tree.failures()
    );

    // Unsigned records are reported, not failed.
    let (unsigned, _) = dag(None);
    let tree = Provenance::read(r, 1, &unsigned, Some(&public)).unwrap();
    assert!(tree.failures().is_empty());
    assert!(tree.text(now()).contains("· unsigned\n"));
    assert!(
        tree.text(now())
            .contains("signatures: 0 OK, 1 unsigned, 0 FAIL\n")
    );
}

#[test]
fn answers_that_do_not_fit_the_question_are_refused() {
    let (answer, [r, l, ..]) = dag(None);
    let err = Provenance::read(l, 1, &answer, None).unwrap_err();
    assert!(err.contains(&r.to_string()), "{err}");
    let err = Provenance::read(r, 1, &ProvenanceResponse::default(), None).unwrap_err();
    assert!(err.contains("no entries"), "{err}");
    let mut odd = answer.clone();
    odd.entries[1].kind = "tree".into();
    let err = Provenance::read(r, 1, &odd, None).unwrap_err();
    assert!(err.contains("unknown kind \"tree\""), "{err}");
    let mut short = answer;
    short.entries[2].inputs[0].truncate(31);
    assert!(Provenance::read(r, 1, &short, None).is_err());
}

#[test]
fn a_chain_as_deep_as_the_deepest_depth_renders_without_recursion() {
    // On a test thread's 2 MiB stack: the walk and the JSON of MAX_DEPTH levels.
    let depth = MAX_DEPTH;
    let entries: Vec<ProvenanceEntry> = (0..=depth)
        .map(|d| {
            let a = CAddr::for_leaf(&d.to_le_bytes());
            if d == depth {
                leaf(a, d, 1, STARTED)
            } else {
                recipe(a, d, "id/v1", &[CAddr::for_leaf(&(d + 1).to_le_bytes())])
            }
        })
        .collect();
    let answer = ProvenanceResponse {
        entries,
        truncated: false,
    };
    let root = CAddr::for_leaf(&0u32.to_le_bytes());
    let tree = Provenance::read(root, depth, &answer, None).unwrap();
    let text = tree.text(now());
    assert_eq!(text.lines().count(), depth as usize + 2);
    assert!(text.contains(&format!("[{depth}] leaf ")), "deepest line");
    let printed = serde_json::to_string(&tree.json()).unwrap();
    assert_eq!(
        printed.matches("\"kind\":\"recipe\"").count(),
        depth as usize
    );
}
