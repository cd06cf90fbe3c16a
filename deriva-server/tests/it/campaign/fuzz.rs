//! Random bytes and random valid-looking gRPC frames at both listeners (proptest strategies,
//! drawn for a fixed time), then the node must still serve and must have lost nothing.
//!
//! Four kinds of attack, drawn at random by four concurrent attackers for 20 s (`DERIVA_LONG`
//! multiplies it; `DERIVA_SEED` replays a run):
//!
//! - **raw bytes** to either listener, sometimes behind the HTTP/2 preface or an HTTP/1
//!   request line, sometimes followed by an immediate close;
//! - **HTTP/2 frames** after a correct preface: random types, flags, stream ids and
//!   payloads, with lengths that may lie;
//! - **gRPC calls** over a real HTTP/2 connection (the `h2` crate): any method path (the
//!   real ones, the health service, made-up ones), hostile metadata (`authorization`,
//!   `traceparent`, `grpc-timeout`, `x-request-id`, `x-deriva-trace`), and bodies framed as
//!   gRPC messages whose compression flag and length prefix may lie, holding a real request
//!   message with hostile field values (a `count` of 2⁶⁴−1, a wrong-length address), or that
//!   message with bytes flipped, or noise;
//! - **HTTP/1 requests** to the HTTP listener: every page and made-up paths, random methods,
//!   headers and bodies, lying `Content-Length`s and broken chunked bodies.
//!
//! Before the attack the test stores leaves and recipes and pins them; after it, the server
//! process is alive, its stderr has no panic, every stored address gives its bytes back, the
//! pins are all there, `/metrics`, `/healthz` and `Status` answer, its descriptors are back
//! near where they started, and SIGTERM ends it cleanly.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use deriva_server::proto::{
    CascadeInvalidateRequest, ExplainRequest, GcRequest, GetRequest, InvalidateRequest,
    ListPinsRequest, PinRequest, PutLeafRequest, PutLeafStreamRequest, PutRecipeRequest,
    ResolveRequest, StatusRequest, UnpinRequest, VerifyRequest,
};
use proptest::prelude::*;
use proptest::strategy::ValueTree as _;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use prost::Message as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use deriva_testkit::{self, Rng, get_all, hex, put_leaf, put_recipe};

/// The HTTP/2 connection preface.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How long an attacker waits for an answer before it hangs up.
const PATIENCE: Duration = Duration::from_millis(400);

/// Every method of the Deriva service, and the health service's check.
const METHODS: [&str; 16] = [
    "/deriva.Deriva/PutLeaf",
    "/deriva.Deriva/PutRecipe",
    "/deriva.Deriva/Get",
    "/deriva.Deriva/Resolve",
    "/deriva.Deriva/Invalidate",
    "/deriva.Deriva/Status",
    "/deriva.Deriva/Verify",
    "/deriva.Deriva/Explain",
    "/deriva.Deriva/PutLeafStream",
    "/deriva.Deriva/CascadeInvalidate",
    "/deriva.Deriva/GarbageCollect",
    "/deriva.Deriva/Pin",
    "/deriva.Deriva/Unpin",
    "/deriva.Deriva/ListPins",
    "/deriva.Deriva/ClusterStatus",
    "/grpc.health.v1.Health/Check",
];

/// The pages of the HTTP listener.
const PAGES: [&str; 8] = [
    "/metrics",
    "/health",
    "/healthz",
    "/readyz",
    "/debug",
    "/debug/traces",
    "/debug/traces/00000000000000000000000000000000",
    "/debug/traces/",
];

/// Values that have hurt servers before.
const HOSTILE_TEXT: [&str; 14] = [
    "",
    "0",
    "1",
    "18446744073709551615",
    "18446744073709551616",
    "-1",
    "1e9",
    "\u{0}",
    "../../etc/passwd",
    "%00%0a",
    "<script>alert(1)</script>",
    "\"quoted\\\"",
    "deriva",
    "\u{202e}emit",
];

/// One attack.
#[derive(Debug, Clone)]
enum Attack {
    /// Bytes to a listener, then a short wait for an answer (or none, `close_at_once`).
    Raw {
        http_listener: bool,
        prefix: RawPrefix,
        bytes: Vec<u8>,
        close_at_once: bool,
    },
    /// The HTTP/2 preface, then these frames, to the gRPC listener.
    Frames(Vec<Frame>),
    /// gRPC calls on one HTTP/2 connection.
    Calls(Vec<Call>),
    /// HTTP/1 requests on one connection to the HTTP listener.
    Http1(Vec<Http1Request>),
}

#[derive(Debug, Clone, Copy)]
enum RawPrefix {
    None,
    Preface,
    RequestLine,
}

#[derive(Debug, Clone)]
struct Frame {
    /// The length written in the header; `None`: the payload's true length.
    lying_length: Option<u32>,
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

#[derive(Debug, Clone)]
struct Call {
    path: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<GrpcMessage>,
    /// Whether the request stream is ended after the body (else it is left open, then reset).
    end_stream: bool,
    /// Whether an address the call is answered (a put's) is then asked for with a Get.
    follow_get: bool,
}

#[derive(Debug, Clone)]
struct GrpcMessage {
    compressed_flag: u8,
    /// The length written in the prefix; `None`: the payload's true length.
    lying_length: Option<u32>,
    payload: Payload,
}

#[derive(Debug, Clone)]
enum Payload {
    /// A real request message of the method, encoded.
    Real(RealRequest),
    /// A real request message with bytes overwritten: (position per mille, byte).
    Mutated(RealRequest, Vec<(u16, u8)>),
    Noise(Vec<u8>),
}

/// The fields of a real request message; which message is made from them depends on the path.
#[derive(Debug, Clone)]
struct RealRequest {
    addr: AddrChoice,
    data: Vec<u8>,
    text: String,
    function: String,
    version: String,
    inputs: Vec<AddrChoice>,
    params: Vec<(String, String)>,
    number: u64,
    flag: bool,
}

#[derive(Debug, Clone, Copy)]
enum AddrChoice {
    /// One the test stored (by index, modulo their number).
    Stored(usize),
    /// One an attacker's PutLeaf or PutRecipe was answered (by index, modulo their number).
    Made(usize),
    /// The empty leaf the test stored.
    Empty,
    /// 32 random bytes from this seed.
    Random(u64),
    /// A wrong length.
    Length(usize),
}

#[derive(Debug, Clone)]
struct Http1Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// The `Content-Length` written, true or not; `None` writes none.
    content_length: Option<u64>,
    chunked: bool,
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => proptest::sample::select(&HOSTILE_TEXT[..]).prop_map(str::to_owned),
        2 => "[a-z0-9_./-]{0,24}",
        1 => any::<String>().prop_map(|s| s.chars().take(64).collect()),
        1 => proptest::collection::vec(any::<u8>(), 0..8000)
            .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
    ]
}

fn addr_choice() -> impl Strategy<Value = AddrChoice> {
    prop_oneof![
        3 => any::<usize>().prop_map(AddrChoice::Stored),
        3 => any::<usize>().prop_map(AddrChoice::Made),
        1 => Just(AddrChoice::Empty),
        2 => any::<u64>().prop_map(AddrChoice::Random),
        1 => (0usize..80).prop_map(AddrChoice::Length),
    ]
}

/// The builtins: name, number of inputs (`None`: any), params.
const BUILTINS: [(&str, Option<usize>, &[&str]); 10] = [
    ("identity", Some(1), &[]),
    ("concat", None, &[]),
    ("uppercase", Some(1), &[]),
    ("lowercase", Some(1), &[]),
    ("reverse", Some(1), &[]),
    ("repeat", Some(1), &["count"]),
    ("slice", Some(1), &["offset", "length"]),
    ("blake3", Some(1), &[]),
    ("gzip", Some(1), &["level"]),
    ("gunzip", Some(1), &[]),
];

/// Numbers at and around the builtins' limits, or any.
fn number() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => proptest::sample::select(&[
            "0", "1", "2", "9", "10", "65536", "1073741824", "1073741825", "4294967296",
            "9223372036854775807", "18446744073709551615", "18446744073709551616",
        ][..])
        .prop_map(str::to_owned),
        1 => any::<u64>().prop_map(|n| n.to_string()),
    ]
}

/// A recipe's function, inputs and params: a well-formed call of a builtin (the right number
/// of inputs, the empty leaf often among them, each of its params with a number at or around
/// a limit), or anything.
fn recipe() -> impl Strategy<Value = (String, Vec<AddrChoice>, Vec<(String, String)>)> {
    let input = prop_oneof![2 => Just(AddrChoice::Empty), 3 => addr_choice()];
    let well_formed = (
        0..BUILTINS.len(),
        proptest::collection::vec(input, 0..400),
        proptest::collection::vec(number(), 2),
    )
        .prop_map(|(i, mut inputs, numbers)| {
            let (name, arity, params) = BUILTINS[i];
            if let Some(n) = arity {
                inputs.resize(n, AddrChoice::Empty);
            }
            let params = params
                .iter()
                .zip(numbers)
                .map(|(k, v)| ((*k).to_owned(), v))
                .collect();
            (name.to_owned(), inputs, params)
        });
    let function = prop_oneof![
        4 => proptest::sample::select(&BUILTINS[..]).prop_map(|b| b.0.to_owned()),
        1 => text(),
    ];
    let params = prop_oneof![
        2 => proptest::collection::vec(
            (
                proptest::sample::select(&["count", "offset", "length", "level"][..])
                    .prop_map(str::to_owned),
                number(),
            ),
            0..3,
        ),
        1 => proptest::collection::vec((text(), text()), 0..4),
    ];
    let inputs = prop_oneof![
        3 => proptest::collection::vec(addr_choice(), 1..=1),
        2 => proptest::collection::vec(addr_choice(), 0..6),
        1 => proptest::collection::vec(addr_choice(), 0..300),
    ];
    prop_oneof![
        1 => well_formed,
        1 => (function, inputs, params),
    ]
}

fn real_request() -> impl Strategy<Value = RealRequest> {
    (
        addr_choice(),
        proptest::collection::vec(any::<u8>(), 0..4096),
        text(),
        recipe(),
        prop_oneof![4 => Just("v1".to_owned()), 1 => text()],
        prop_oneof![
            2 => Just(u64::MAX),
            2 => 0u64..4,
            1 => any::<u64>(),
        ],
        any::<bool>(),
    )
        .prop_map(
            |(addr, data, text, (function, inputs, params), version, number, flag)| RealRequest {
                addr,
                data,
                text,
                function,
                version,
                inputs,
                params,
                number,
                flag,
            },
        )
}

fn grpc_message() -> impl Strategy<Value = GrpcMessage> {
    let payload = prop_oneof![
        4 => real_request().prop_map(Payload::Real),
        2 => (
            real_request(),
            proptest::collection::vec((0u16..1000, any::<u8>()), 1..6)
        )
            .prop_map(|(r, m)| Payload::Mutated(r, m)),
        1 => proptest::collection::vec(any::<u8>(), 0..2048).prop_map(Payload::Noise),
    ];
    (
        prop_oneof![6 => Just(0u8), 1 => Just(1u8), 1 => any::<u8>()],
        prop_oneof![6 => Just(None), 1 => any::<u32>().prop_map(Some), 1 => (0u32..64).prop_map(Some)],
        payload,
    )
        .prop_map(|(compressed_flag, lying_length, payload)| GrpcMessage {
            compressed_flag,
            lying_length,
            payload,
        })
}

fn metadata() -> impl Strategy<Value = (String, Vec<u8>)> {
    let name = prop_oneof![
        3 => proptest::sample::select(&[
            "authorization", "traceparent", "tracestate", "grpc-timeout", "x-request-id",
            "x-deriva-trace", "grpc-encoding", "grpc-accept-encoding", "content-type",
            "grpc-status", "te",
        ][..])
        .prop_map(str::to_owned),
        1 => "[a-z][a-z0-9-]{0,30}",
    ];
    let value = prop_oneof![
        3 => text().prop_map(String::into_bytes),
        1 => Just(b"force".to_vec()),
        1 => Just(b"Bearer deriva_not_a_token".to_vec()),
        1 => Just(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_vec()),
        1 => proptest::collection::vec(any::<u8>(), 0..300),
        1 => Just(vec![b'a'; 70_000]),
    ];
    (name, value)
}

fn call() -> impl Strategy<Value = Call> {
    let path = prop_oneof![
        8 => proptest::sample::select(&METHODS[..]).prop_map(str::to_owned),
        4 => Just("/deriva.Deriva/PutRecipe".to_owned()),
        2 => Just("/deriva.Deriva/Get".to_owned()),
        1 => "/[a-zA-Z./]{0,40}",
        1 => text().prop_map(|t| format!("/{t}")),
    ];
    (
        path,
        proptest::collection::vec(metadata(), 0..5),
        proptest::collection::vec(grpc_message(), 0..4),
        prop_oneof![6 => Just(true), 1 => Just(false)],
        any::<bool>(),
    )
        .prop_map(|(path, headers, body, end_stream, follow_get)| Call {
            path,
            headers,
            body,
            end_stream,
            follow_get,
        })
}

fn frame() -> impl Strategy<Value = Frame> {
    (
        prop_oneof![6 => Just(None), 1 => (0u32..(1 << 24)).prop_map(Some)],
        prop_oneof![6 => 0u8..=9, 1 => any::<u8>()],
        any::<u8>(),
        prop_oneof![3 => Just(0u32), 3 => 0u32..16, 1 => any::<u32>()],
        proptest::collection::vec(any::<u8>(), 0..600),
    )
        .prop_map(|(lying_length, kind, flags, stream, payload)| Frame {
            lying_length,
            kind,
            flags,
            stream,
            payload,
        })
}

fn http1_request() -> impl Strategy<Value = Http1Request> {
    let method = prop_oneof![
        6 => Just("GET".to_owned()),
        1 => proptest::sample::select(&["POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PRI", "CONNECT"][..])
            .prop_map(str::to_owned),
        1 => "[A-Za-z]{0,12}",
    ];
    let path = prop_oneof![
        6 => proptest::sample::select(&PAGES[..]).prop_map(str::to_owned),
        1 => "/[a-zA-Z0-9./%?=&#-]{0,80}",
        1 => text(),
        1 => Just(format!("/debug/traces/{}", "f".repeat(5000))),
    ];
    let header = (
        prop_oneof![
            2 => proptest::sample::select(&[
                "host", "accept", "authorization", "content-type", "connection", "upgrade",
                "expect", "transfer-encoding", "x-forwarded-for",
            ][..])
            .prop_map(str::to_owned),
            1 => "[A-Za-z-]{1,20}",
        ],
        prop_oneof![
            2 => "[ -~]{0,60}",
            1 => Just("text/html".to_owned()),
            1 => Just("Bearer deriva_not_a_token".to_owned()),
            1 => Just("h2c".to_owned()),
            1 => Just("100-continue".to_owned()),
        ],
    );
    (
        method,
        path,
        proptest::collection::vec(header, 0..6),
        proptest::collection::vec(any::<u8>(), 0..512),
        prop_oneof![3 => Just(None), 1 => (0u64..2048).prop_map(Some), 1 => Just(Some(u64::MAX))],
        prop_oneof![5 => Just(false), 1 => Just(true)],
    )
        .prop_map(
            |(method, path, headers, body, content_length, chunked)| Http1Request {
                method,
                path,
                headers,
                body,
                content_length,
                chunked,
            },
        )
}

fn attack() -> impl Strategy<Value = Attack> {
    prop_oneof![
        2 => (
            any::<bool>(),
            prop_oneof![
                Just(RawPrefix::None),
                Just(RawPrefix::Preface),
                Just(RawPrefix::RequestLine)
            ],
            proptest::collection::vec(any::<u8>(), 0..3000),
            any::<bool>(),
        )
            .prop_map(|(http_listener, prefix, bytes, close_at_once)| Attack::Raw {
                http_listener,
                prefix,
                bytes,
                close_at_once,
            }),
        2 => proptest::collection::vec(frame(), 0..12).prop_map(Attack::Frames),
        4 => proptest::collection::vec(call(), 1..6).prop_map(Attack::Calls),
        2 => proptest::collection::vec(http1_request(), 1..4).prop_map(Attack::Http1),
    ]
}

/// What the test stored before the attack, and what the attackers made.
struct Stored {
    /// Every address with the bytes a Get of it must give.
    values: Vec<(Bytes, Bytes)>,
    /// The addresses the attackers' puts were answered, the last [`MADE`].
    made: parking_lot::Mutex<std::collections::VecDeque<Bytes>>,
}

/// How many of the attackers' own addresses are kept to attack again.
const MADE: usize = 512;

impl Stored {
    fn addr(&self, choice: AddrChoice) -> Bytes {
        match choice {
            AddrChoice::Stored(i) => self.values[i % self.values.len()].0.clone(),
            AddrChoice::Made(i) => {
                let made = self.made.lock();
                match made.len() {
                    0 => self.values[i % self.values.len()].0.clone(),
                    n => made[i % n].clone(),
                }
            }
            AddrChoice::Empty => self.values[0].0.clone(),
            AddrChoice::Random(seed) => {
                let mut rng = Rng(seed);
                Bytes::from(rng.bytes(32))
            }
            AddrChoice::Length(n) => Bytes::from(vec![0xab; n]),
        }
    }
}

impl RealRequest {
    /// The request message of `path`, encoded (for an unknown path: a `GetRequest`).
    fn encode(&self, path: &str, stored: &Stored) -> Vec<u8> {
        let addr = stored.addr(self.addr);
        // Unpin never names what the test stored: the pins are what must survive.
        let unpinned = match self.addr {
            AddrChoice::Stored(i) | AddrChoice::Made(i) => {
                stored.addr(AddrChoice::Random(i as u64))
            }
            AddrChoice::Empty => stored.addr(AddrChoice::Random(0)),
            other => stored.addr(other),
        };
        let method = path.rsplit('/').next().unwrap_or_default();
        match method {
            "PutLeaf" => PutLeafRequest {
                data: self.data.clone().into(),
            }
            .encode_to_vec(),
            "PutLeafStream" => PutLeafStreamRequest {
                chunk: self.data.clone().into(),
            }
            .encode_to_vec(),
            "PutRecipe" => PutRecipeRequest {
                function_name: self.function.clone(),
                function_version: self.version.clone(),
                inputs: self.inputs.iter().map(|c| stored.addr(*c)).collect(),
                params: self.params.iter().cloned().collect(),
            }
            .encode_to_vec(),
            "Resolve" => ResolveRequest { addr }.encode_to_vec(),
            "Invalidate" => InvalidateRequest {
                addr,
                cascade: self.flag,
            }
            .encode_to_vec(),
            "Status" => StatusRequest {}.encode_to_vec(),
            "Verify" => VerifyRequest { addr }.encode_to_vec(),
            "Explain" => ExplainRequest {
                trace_id: self.text.clone(),
            }
            .encode_to_vec(),
            "CascadeInvalidate" => CascadeInvalidateRequest {
                addr,
                policy: self.text.clone(),
                include_root: self.flag,
                detail_addrs: !self.flag,
            }
            .encode_to_vec(),
            "GarbageCollect" => GcRequest {
                grace_period_secs: self.number,
                dry_run: self.flag,
                detail_addrs: true,
                max_removals: self.number,
            }
            .encode_to_vec(),
            "Pin" => PinRequest { addr }.encode_to_vec(),
            "Unpin" => UnpinRequest { addr: unpinned }.encode_to_vec(),
            "ListPins" => ListPinsRequest {}.encode_to_vec(),
            _ => GetRequest { addr }.encode_to_vec(),
        }
    }
}

impl GrpcMessage {
    fn encode(&self, path: &str, stored: &Stored) -> Bytes {
        let payload = match &self.payload {
            Payload::Real(r) => r.encode(path, stored),
            Payload::Mutated(r, changes) => {
                let mut bytes = r.encode(path, stored);
                let len = bytes.len();
                if len > 0 {
                    for (at, b) in changes {
                        bytes[(usize::from(*at) * len / 1000).min(len - 1)] = *b;
                    }
                }
                bytes
            }
            Payload::Noise(n) => n.clone(),
        };
        let mut out = BytesMut::with_capacity(5 + payload.len());
        out.put_u8(self.compressed_flag);
        out.put_u32(
            self.lying_length
                .unwrap_or(u32::try_from(payload.len()).unwrap()),
        );
        out.extend_from_slice(&payload);
        out.freeze()
    }
}

/// Tallies of what the attackers did and got.
#[derive(Default)]
struct Tally {
    attacks: AtomicU64,
    raw: AtomicU64,
    frames: AtomicU64,
    calls: AtomicU64,
    calls_answered: AtomicU64,
    follow_gets: AtomicU64,
    http1: AtomicU64,
    http1_answered: AtomicU64,
    connect_failures: AtomicU64,
}

async fn connect(addr: &str, tally: &Tally) -> Option<TcpStream> {
    match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await {
        Ok(Ok(s)) => Some(s),
        _ => {
            tally.connect_failures.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Reads whatever comes within [`PATIENCE`] (at most 1 MiB), then returns.
async fn drain(stream: &mut TcpStream) -> usize {
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0;
    let until = tokio::time::Instant::now() + PATIENCE;
    while total < (1 << 20) {
        match tokio::time::timeout_at(until, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => total += n,
            _ => break,
        }
    }
    total
}

async fn run(attack: Attack, grpc: &str, http: &str, stored: &Stored, tally: &Tally) {
    tally.attacks.fetch_add(1, Ordering::Relaxed);
    match attack {
        Attack::Raw {
            http_listener,
            prefix,
            bytes,
            close_at_once,
        } => {
            tally.raw.fetch_add(1, Ordering::Relaxed);
            let Some(mut s) = connect(if http_listener { http } else { grpc }, tally).await else {
                return;
            };
            let mut out = match prefix {
                RawPrefix::None => Vec::new(),
                RawPrefix::Preface => PREFACE.to_vec(),
                RawPrefix::RequestLine => b"GET /metrics HTTP/1.1\r\n".to_vec(),
            };
            out.extend_from_slice(&bytes);
            if s.write_all(&out).await.is_ok() && !close_at_once {
                drain(&mut s).await;
            }
        }
        Attack::Frames(frames) => {
            tally.frames.fetch_add(1, Ordering::Relaxed);
            let Some(mut s) = connect(grpc, tally).await else {
                return;
            };
            let mut out = PREFACE.to_vec();
            for f in &frames {
                let len = f
                    .lying_length
                    .unwrap_or(u32::try_from(f.payload.len()).unwrap());
                out.extend_from_slice(&len.to_be_bytes()[1..]);
                out.push(f.kind);
                out.push(f.flags);
                out.extend_from_slice(&f.stream.to_be_bytes());
                out.extend_from_slice(&f.payload);
            }
            if s.write_all(&out).await.is_ok() {
                drain(&mut s).await;
            }
        }
        Attack::Calls(calls) => {
            let Some(s) = connect(grpc, tally).await else {
                return;
            };
            let Ok(Ok((client, connection))) =
                tokio::time::timeout(PATIENCE, h2::client::handshake(s)).await
            else {
                return;
            };
            let connection = tokio::spawn(connection);
            for c in calls {
                tally.calls.fetch_add(1, Ordering::Relaxed);
                let answered =
                    tokio::time::timeout(PATIENCE, one_call(client.clone(), &c, stored)).await;
                let Ok((true, made)) = answered else {
                    continue;
                };
                tally.calls_answered.fetch_add(1, Ordering::Relaxed);
                if let Some(addr) = made.filter(|_| c.follow_get) {
                    // What the attacker just made, computed: a hostile recipe runs now.
                    tally.follow_gets.fetch_add(1, Ordering::Relaxed);
                    let get = Call {
                        path: "/deriva.Deriva/Get".into(),
                        headers: Vec::new(),
                        body: vec![GrpcMessage {
                            compressed_flag: 0,
                            lying_length: None,
                            payload: Payload::Noise(GetRequest { addr }.encode_to_vec()),
                        }],
                        end_stream: true,
                        follow_get: false,
                    };
                    let _ = tokio::time::timeout(PATIENCE, one_call(client.clone(), &get, stored))
                        .await;
                }
            }
            connection.abort();
        }
        Attack::Http1(requests) => {
            let Some(mut s) = connect(http, tally).await else {
                return;
            };
            for r in requests {
                tally.http1.fetch_add(1, Ordering::Relaxed);
                let mut out = format!("{} {} HTTP/1.1\r\nHost: {http}\r\n", r.method, r.path);
                for (k, v) in &r.headers {
                    out.push_str(&format!("{k}: {v}\r\n"));
                }
                if let Some(n) = r.content_length {
                    out.push_str(&format!("Content-Length: {n}\r\n"));
                }
                let mut out = out.into_bytes();
                if r.chunked {
                    out.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
                    out.extend_from_slice(format!("{:x}\r\n", r.body.len() + 3).as_bytes());
                    out.extend_from_slice(&r.body);
                    out.extend_from_slice(b"\r\n0\r\n");
                } else {
                    out.extend_from_slice(b"\r\n");
                    out.extend_from_slice(&r.body);
                }
                if s.write_all(&out).await.is_err() {
                    return;
                }
                if drain(&mut s).await > 0 {
                    tally.http1_answered.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// One gRPC call: whether the server answered it (headers, or a reset of the stream), and the
/// address it answered a put with.
async fn one_call(
    client: h2::client::SendRequest<Bytes>,
    c: &Call,
    stored: &Stored,
) -> (bool, Option<Bytes>) {
    let Ok(mut client) = client.ready().await else {
        return (false, None);
    };
    let mut request = http::Request::builder()
        .method("POST")
        .uri(format!("http://deriva{}", c.path))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in &c.headers {
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::from_bytes(k.as_bytes()),
            http::HeaderValue::from_bytes(v),
        ) {
            request = request.header(k, v);
        }
    }
    let Ok(request) = request.body(()) else {
        return (false, None);
    };
    let Ok((response, mut body)) = client.send_request(request, false) else {
        return (false, None);
    };
    let n = c.body.len();
    for (i, m) in c.body.iter().enumerate() {
        let last = i + 1 == n && c.end_stream;
        if body.send_data(m.encode(&c.path, stored), last).is_err() {
            break;
        }
    }
    if n == 0 && c.end_stream {
        let _ = body.send_data(Bytes::new(), true);
    }
    match response.await {
        Ok(response) => {
            let mut answer = response.into_body();
            let mut data = BytesMut::new();
            while let Some(Ok(chunk)) = answer.data().await {
                let _ = answer.flow_control().release_capacity(chunk.len());
                if data.len() < 4096 {
                    data.extend_from_slice(&chunk);
                }
            }
            let _ = answer.trailers().await;
            // The address a put was answered, to attack again (Get, Verify, a recipe over it).
            let put = c.path.ends_with("/PutLeaf") || c.path.ends_with("/PutRecipe");
            let made = (put && data.len() > 5)
                .then(|| deriva_server::proto::PutRecipeResponse::decode(&data[5..]).ok())
                .flatten()
                .map(|r| r.addr)
                .filter(|a| a.len() == 32);
            if let Some(addr) = &made {
                let mut pool = stored.made.lock();
                if pool.len() == MADE {
                    pool.pop_front();
                }
                pool.push_back(addr.clone());
            }
            (true, made)
        }
        Err(e) => (e.is_reset() || e.is_go_away(), None),
    }
}

/// How many descriptors the process has open.
fn open_fds(pid: rustix::process::Pid) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", pid.as_raw_nonzero()))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_bytes_and_frames_at_both_listeners_leave_the_node_serving_and_whole() {
    let seed = Rng::from_env("fuzz").0;
    let duration = Duration::from_secs(20 * deriva_testkit::long_factor());
    // A compute the attackers start and abandon is cancelled when they hang up; one that
    // outlives its callers anyway (a Get of the same address came meanwhile) ends at 5 s, so
    // none holds a compute slot the checks below need.
    let mut server = super::server()
        .args([
            "--handshake-timeout-secs",
            "2",
            "--compute-timeout-secs",
            "5",
        ])
        .start();
    let grpc = server.grpc_addr().to_owned();
    let http = server.metrics_addr().to_owned();

    // What must survive: leaves, recipes over them, all pinned.
    let mut client = server.client().await;
    let mut rng = Rng(seed);
    let mut values = vec![(put_leaf(&mut client, b"").await, Bytes::new())];
    for i in 0..24 {
        let data = rng.bytes(if i % 6 == 0 { 200_000 } else { 1 + i * 37 });
        let addr = put_leaf(&mut client, &data).await;
        values.push((addr, Bytes::from(data)));
    }
    for i in 0..8 {
        let (a, da) = values[i].clone();
        let (b, db) = values[i + 1].clone();
        let r = put_recipe(&mut client, "concat", &[&a, &b], &[]).await;
        values.push((r, [da, db].concat().into()));
        let (c, dc) = values[i + 2].clone();
        let u = put_recipe(&mut client, "uppercase", &[&c], &[]).await;
        values.push((u, dc.to_ascii_uppercase().into()));
    }
    for (addr, _) in &values {
        client
            .pin(PinRequest { addr: addr.clone() })
            .await
            .unwrap_or_else(|e| panic!("pin {}: {e}", hex(addr)));
    }
    let stored = Arc::new(Stored {
        values,
        made: Default::default(),
    });
    let fds_before = open_fds(server.pid());

    // The attack: four attackers drawing from one seeded runner each.
    let tally = Arc::new(Tally::default());
    let start = Instant::now();
    let attackers: Vec<_> = (0..4u64)
        .map(|n| {
            let (grpc, http, stored, tally) =
                (grpc.clone(), http.clone(), stored.clone(), tally.clone());
            tokio::spawn(async move {
                let mut seed_bytes = [0u8; 32];
                seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
                seed_bytes[8..16].copy_from_slice(&n.to_le_bytes());
                let mut runner = TestRunner::new_with_rng(
                    Config::default(),
                    TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes),
                );
                let strategy = attack();
                while start.elapsed() < duration {
                    let attack = strategy.new_tree(&mut runner).unwrap().current();
                    run(attack, &grpc, &http, &stored, &tally).await;
                }
            })
        })
        .collect();
    for a in attackers {
        a.await.unwrap();
    }
    let t = &tally;
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    eprintln!(
        "fuzz: {} attacks in {:.1} s: {} raw, {} frame sequences, {} gRPC calls ({} answered, \
         {} Gets of what a put made), {} HTTP/1 requests ({} answered), {} failed connects; \
         seed {seed}",
        load(&t.attacks),
        start.elapsed().as_secs_f64(),
        load(&t.raw),
        load(&t.frames),
        load(&t.calls),
        load(&t.calls_answered),
        load(&t.follow_gets),
        load(&t.http1),
        load(&t.http1_answered),
        load(&t.connect_failures),
    );
    assert!(
        load(&t.calls_answered) > 0 && load(&t.http1_answered) > 0,
        "the attack never reached the server"
    );

    // The node still serves, and has lost nothing: every Get within the deadline.
    let mut client = server.client().await;
    client.status(StatusRequest {}).await.unwrap();
    for (addr, bytes) in stored.values.iter() {
        let got = tokio::time::timeout(deriva_testkit::DEADLINE, get_all(&mut client, addr))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "Get {} after the attack did not answer within {:?}; stderr:\n{}",
                    hex(addr),
                    deriva_testkit::DEADLINE,
                    server.stderr()
                )
            })
            .unwrap_or_else(|e| panic!("Get {} after the attack: {e}", hex(addr)));
        assert!(
            got == bytes.as_ref(),
            "{} changed under the attack",
            hex(addr)
        );
    }
    let pins = client
        .list_pins(ListPinsRequest {})
        .await
        .unwrap()
        .into_inner()
        .addrs;
    for (addr, _) in stored.values.iter() {
        assert!(pins.contains(addr), "the pin of {} is gone", hex(addr));
    }
    assert!(server.scrape().await.contains("deriva_rpc_total"));
    let healthz = deriva_testkit::http_get(&http, "/healthz").await.unwrap();
    assert_eq!(healthz.status, 200);
    // The attackers' connections close: within the handshake timeout for those that never
    // finished a request, at once for the rest.
    drop(client);
    let mut fds = open_fds(server.pid());
    let settle = Instant::now();
    while fds > fds_before + 16 && settle.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        fds = open_fds(server.pid());
    }
    assert!(
        fds <= fds_before + 16,
        "{fds} descriptors open after the attack, {fds_before} before"
    );
    let stderr = server.stderr();
    assert!(
        !stderr.contains("panicked"),
        "the server panicked under the attack:\n{stderr}"
    );
    let status = server.stop();
    assert!(status.success(), "exit after the attack: {status}");
}
