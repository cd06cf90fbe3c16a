//! End-to-end tests of the `deriva` binary against a real `deriva-server` child process, each
//! test with its own server on a free port and its own data directory. The tests of `deriva`
//! that need no server are in `deriva-cli/tests/it/usage.rs`.
//!
//! `deriva` is a binary of `deriva-cli`, which cargo does not build for this package's tests:
//! `cargo test --workspace` builds it, or `cargo build -p deriva-cli` before
//! `cargo test -p deriva-server --test it cli::`.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use deriva_core::CAddr;
use deriva_testkit::ServerProcess;
use deriva_testkit::cli::Output;

/// How long a `deriva` command may take to finish.
const DEADLINE: Duration = Duration::from_secs(120);

/// `deriva` commands aimed at a server.
trait Deriva {
    /// A `deriva` command aimed at this server.
    fn deriva(&self, args: &[&str]) -> Command;

    /// Runs `deriva ARGS` against this server, asserts success, and returns stdout as text.
    fn ok(&self, args: &[&str]) -> String {
        run(self.deriva(args), None).success(args)
    }

    /// `ok` for a command that prints one address: checks the form and returns it.
    fn addr(&self, args: &[&str]) -> String {
        let out = self.ok(args);
        let addr = out
            .strip_suffix('\n')
            .unwrap_or_else(|| panic!("{args:?}: {out:?}"));
        assert!(
            addr.len() == 64 && addr.bytes().all(|b| b.is_ascii_hexdigit()),
            "{args:?} printed {out:?}, not one address line"
        );
        addr.to_owned()
    }

    /// `put -` of `data`; returns the address.
    fn addr_of_stdin(&self, data: &[u8]) -> String {
        let out = run(self.deriva(&["put", "-"]), Some(data.to_vec())).success(&["put", "-"]);
        let addr = out.trim_end().to_owned();
        assert_eq!(addr, CAddr::for_leaf(data).to_string());
        addr
    }
}

impl Deriva for ServerProcess {
    fn deriva(&self, args: &[&str]) -> Command {
        let mut cmd = deriva_cmd(args);
        cmd.arg("--server").arg(self.url());
        cmd
    }
}

/// A `deriva` command with no server from the environment.
fn deriva_cmd(args: &[&str]) -> Command {
    let mut cmd = Command::new(deriva_testkit::deriva_bin());
    cmd.args(args).env_remove("DERIVA_SERVER");
    cmd
}

/// Runs `cmd` (feeding `stdin` if given), waiting at most [`DEADLINE`].
fn run(cmd: Command, stdin: Option<Vec<u8>>) -> Output {
    deriva_testkit::cli::run(cmd, stdin, DEADLINE)
}

/// Deterministic pseudo-random bytes (xorshift64*).
fn pseudo_random(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        out.extend_from_slice(&seed.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn key_values(text: &str) -> HashMap<String, String> {
    text.lines()
        .map(|l| {
            let (k, v) = l
                .split_once(": ")
                .unwrap_or_else(|| panic!("not key: value: {l:?}"));
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

fn dir_entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

#[test]
fn put_recipe_get_round_trip_and_status() {
    let server = ServerProcess::start();
    let dir = tempfile::tempdir().unwrap();
    let (a_path, b_path) = (dir.path().join("a.txt"), dir.path().join("b.bin"));
    let (a, b) = (b"hello, ".to_vec(), pseudo_random(70_000, 7));
    std::fs::write(&a_path, &a).unwrap();
    std::fs::write(&b_path, &b).unwrap();

    let a_addr = server.addr(&["put", path_str(&a_path)]);
    let b_addr = server.addr(&["put", path_str(&b_path)]);
    assert_eq!(a_addr, CAddr::for_leaf(&a).to_string());
    assert_eq!(b_addr, CAddr::for_leaf(&b).to_string());

    let r = server.addr(&["recipe", "concat", "v1", "-i", &a_addr, "--input", &b_addr]);
    let out = run(server.deriva(&["get", &r]), None);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(out.stdout, [a.as_slice(), b.as_slice()].concat());

    let status = key_values(&server.ok(&["status"]));
    assert_eq!(status["recipe_count"], "1");
    assert_eq!(status["blob_count"], "2");
    assert_eq!(status["verification_mode"], "off");
    for key in [
        "recipe_count",
        "blob_count",
        "cache_entries",
        "cache_size_bytes",
        "cache_hit_rate",
        "verification_mode",
        "verification_total",
        "verification_passed",
        "verification_failed",
        "verification_failure_rate",
    ] {
        assert!(status.contains_key(key), "status lacks {key}: {status:?}");
    }
    assert_eq!(status.len(), 10, "{status:?}");

    // The server also comes from DERIVA_SERVER.
    let mut cmd = deriva_cmd(&["resolve", &r]);
    cmd.env("DERIVA_SERVER", server.url());
    let out = run(cmd, None).success(&["resolve"]);
    assert!(out.starts_with("function: concat\n"), "{out}");
}

#[test]
fn put_reads_stdin() {
    let server = ServerProcess::start();
    let data = pseudo_random(300_000, 42);
    let out = run(server.deriva(&["put", "-"]), Some(data.clone())).success(&["put", "-"]);
    assert_eq!(out, format!("{}\n", CAddr::for_leaf(&data)));
    let out = run(server.deriva(&["get", out.trim_end()]), None);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(out.stdout, data);
}

/// Above 8 MiB, `put` streams (`PutLeafStream`): a leaf larger than the server's message limit
/// goes in from a file and from stdin. A `put` killed half-way stores nothing and leaves no
/// temporary file on the server.
#[test]
fn put_streams_large_leaves_and_a_killed_put_stores_nothing() {
    let server = ServerProcess::options()
        .args(["--max-message-bytes", "4MiB"])
        .start();
    let dir = tempfile::tempdir().unwrap();
    let data = pseudo_random(20 << 20, 0x5eed);
    let path = dir.path().join("big.bin");
    std::fs::write(&path, &data).unwrap();
    let expected = CAddr::for_leaf(&data).to_string();
    assert_eq!(server.addr(&["put", path_str(&path)]), expected);
    let tail = &data[3..];
    let out = run(server.deriva(&["put", "-"]), Some(tail.to_vec())).success(&["put", "-"]);
    assert_eq!(out.trim_end(), CAddr::for_leaf(tail).to_string());
    let back = dir.path().join("back.bin");
    server.ok(&["get", &expected, "-o", path_str(&back)]);
    assert!(std::fs::read(&back).unwrap() == data, "the leaf read back");

    // A put from a pipe that stalls after 12 MiB, killed while the server holds them.
    let fifo = dir.path().join("stalling.fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let writer = {
        let fifo = fifo.clone();
        std::thread::spawn(move || {
            use std::io::Write as _;
            let mut pipe = std::fs::OpenOptions::new().write(true).open(fifo).unwrap();
            // Its last bytes may meet the killed reader: a broken pipe then.
            let _ = pipe.write_all(&pseudo_random(12 << 20, 7));
            pipe // held open: the put never sees the end
        })
    };
    let mut put = server.deriva(&["put", path_str(&fifo)]);
    put.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut put = put.spawn().unwrap();
    let tmp = server.dir().join("blobs").join("tmp");
    let held = || -> u64 {
        std::fs::read_dir(&tmp)
            .unwrap()
            .filter_map(|e| e.ok()?.metadata().ok())
            .map(|m| m.len())
            .sum()
    };
    deriva_testkit::wait_for("the server to hold 10 MiB of the put", || {
        held() >= 10 << 20
    });
    put.kill().unwrap();
    put.wait().unwrap();
    deriva_testkit::wait_for("the killed put's file to go", || {
        dir_entries(&tmp).is_empty()
    });
    let status = key_values(&server.ok(&["status"]));
    assert_eq!(status["blob_count"], "2", "{status:?}");
    drop(writer.join().unwrap());
}

#[test]
fn unknown_address_is_not_found_and_leaves_no_file() {
    let server = ServerProcess::start();
    let unknown = CAddr::for_leaf(b"never stored").to_string();
    let line = run(server.deriva(&["get", &unknown]), None).failure(1);
    assert!(line.contains("not found"), "{line}");
    assert!(
        line.starts_with(&format!("deriva: get {}", &unknown[..8])),
        "{line}"
    );

    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("out.bin");
    let line = run(
        server.deriva(&["get", &unknown, "-o", path_str(&dest)]),
        None,
    )
    .failure(1);
    assert!(line.contains("not found"), "{line}");
    assert!(
        dir_entries(dir.path()).is_empty(),
        "{:?}",
        dir_entries(dir.path())
    );

    for cmd in ["resolve", "verify", "invalidate"] {
        let out = run(server.deriva(&[cmd, &unknown]), None);
        if cmd == "resolve" {
            // Resolve answers found=false rather than failing.
            let text = out.success(&[cmd]);
            assert!(text.contains("not a recipe"), "{text}");
        } else {
            let line = out.failure(1);
            assert!(line.contains("not found"), "{cmd}: {line}");
        }
    }
}

#[test]
fn unknown_function_is_named() {
    let server = ServerProcess::start();
    let dir = tempfile::tempdir().unwrap();
    let leaf = dir.path().join("leaf");
    std::fs::write(&leaf, b"x").unwrap();
    let addr = server.addr(&["put", path_str(&leaf)]);
    let line = run(
        server.deriva(&["recipe", "no_such_function", "v1", "-i", &addr]),
        None,
    )
    .failure(1);
    assert!(line.contains("no_such_function"), "{line}");
    let line = run(
        server.deriva(&["recipe", "repeat", "v1", "-i", &addr, "-p", "count=lots"]),
        None,
    )
    .failure(1);
    assert!(
        line.contains("invalid argument") && line.contains("count"),
        "{line}"
    );
}

#[test]
fn large_derived_output_streams_to_a_file() {
    const LEAF: usize = 1 << 20;
    const COUNT: usize = 100;
    let server = ServerProcess::start();
    let dir = tempfile::tempdir().unwrap();
    let leaf_path = dir.path().join("leaf.bin");
    let leaf = pseudo_random(LEAF, 0x5eed);
    std::fs::write(&leaf_path, &leaf).unwrap();
    let addr = server.addr(&["put", path_str(&leaf_path)]);
    let r = server.addr(&[
        "recipe",
        "repeat",
        "v1",
        "-i",
        &addr,
        "-p",
        &format!("count={COUNT}"),
    ]);
    let dest = dir.path().join("out.bin");
    let out = server.ok(&["get", &r, "-o", path_str(&dest)]);
    assert_eq!(out, "");
    assert_eq!(dir_entries(dir.path()), ["leaf.bin", "out.bin"]);

    let mut file = std::fs::File::open(&dest).unwrap();
    assert_eq!(file.metadata().unwrap().len(), (LEAF * COUNT) as u64);
    let mut chunk = vec![0u8; LEAF];
    for i in 0..COUNT {
        file.read_exact(&mut chunk).unwrap();
        assert!(chunk == leaf, "copy {i} of the leaf differs");
    }
    assert_eq!(file.read(&mut chunk).unwrap(), 0, "trailing bytes");
}

/// The client's side of a streamed leaf that turns out damaged: every chunk arrives, then
/// DATA_LOSS; `deriva get -o` keeps nothing (its temporary file is removed, the destination
/// never created).
#[test]
fn a_leaf_damaged_mid_way_leaves_no_file_behind() {
    const LEAF: usize = 1 << 20;
    let server = ServerProcess::start();
    let dir = tempfile::tempdir().unwrap();
    let leaf_path = dir.path().join("leaf.bin");
    std::fs::write(&leaf_path, pseudo_random(LEAF, 0xbad)).unwrap();
    let addr = server.addr(&["put", path_str(&leaf_path)]);
    let blob = server.dir().join("blobs").join(&addr[..2]).join(&addr);
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[LEAF / 2] ^= 0xff;
    std::fs::write(&blob, bytes).unwrap();

    let out_dir = tempfile::tempdir().unwrap();
    let dest = out_dir.path().join("out.bin");
    let line = run(server.deriva(&["get", &addr, "-o", path_str(&dest)]), None).failure(1);
    assert!(line.contains("corrupted") && line.contains(&addr), "{line}");
    assert!(
        dir_entries(out_dir.path()).is_empty(),
        "{:?}",
        dir_entries(out_dir.path())
    );
}

/// `deriva get -o` into something that is not a regular file (a FIFO here; `/dev/null` and
/// `/dev/stdout` are the same case) writes the bytes into it. Renaming a temporary file over it
/// instead, as for a regular file, replaced the pipe, and, run as root with `-o /dev/null`,
/// `/dev/null` itself.
#[test]
fn get_into_a_pipe_writes_to_it_and_leaves_it_a_pipe() {
    use std::os::unix::fs::FileTypeExt as _;
    let server = ServerProcess::start();
    let data = pseudo_random(300_000, 0xf1f0);
    let addr = server.addr_of_stdin(&data);
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("out.fifo");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::read(fifo).unwrap())
    };
    let out = server.ok(&["get", &addr, "-o", path_str(&fifo)]);
    assert_eq!(out, "");
    assert!(
        std::fs::symlink_metadata(&fifo)
            .unwrap()
            .file_type()
            .is_fifo(),
        "the FIFO was replaced by a file"
    );
    assert!(
        reader.join().unwrap() == data,
        "the bytes read from the FIFO"
    );
    assert_eq!(
        dir_entries(dir.path()),
        ["out.fifo"],
        "no temporary file left"
    );
}

/// Pins through the CLI: only what exists, once each, listed, unpinned; and `cluster` lists
/// the one node.
#[test]
fn pin_unpin_pins_and_cluster() {
    let server = ServerProcess::start();
    let a = server.addr_of_stdin(b"to keep");
    let r = server.addr(&["recipe", "reverse", "v1", "-i", &a]);
    assert_eq!(server.ok(&["pins"]), "");
    assert_eq!(server.ok(&["pin", &a]), "was_new: true\n");
    assert_eq!(server.ok(&["pin", &a]), "was_new: false\n");
    assert_eq!(server.ok(&["pin", &r]), "was_new: true\n");
    let mut listed: Vec<String> = server.ok(&["pins"]).lines().map(str::to_owned).collect();
    listed.sort();
    let mut expected = vec![a.clone(), r.clone()];
    expected.sort();
    assert_eq!(listed, expected);
    let unknown = CAddr::for_leaf(b"nothing").to_string();
    let line = run(server.deriva(&["pin", &unknown]), None).failure(1);
    assert!(
        line.contains("not found") || line.contains("no leaf or recipe"),
        "{line}"
    );
    assert_eq!(server.ok(&["unpin", &a]), "was_pinned: true\n");
    assert_eq!(server.ok(&["unpin", &a]), "was_pinned: false\n");
    assert_eq!(server.ok(&["pins"]), format!("{r}\n"));
    let cluster = server.ok(&["cluster"]);
    assert!(
        cluster.contains(" alive server ") && cluster.ends_with("alive: 1, suspect: 0, dead: 0\n"),
        "{cluster}"
    );
}

/// `deriva gc` output: its `key: value` lines, and the addresses listed after `removed:` or
/// `would_remove:` (with `--detail`).
fn gc_report(text: &str) -> (HashMap<String, String>, Vec<String>) {
    let mut values = HashMap::new();
    let mut addrs = Vec::new();
    for line in text.lines() {
        if let Some(addr) = line.strip_prefix("  ") {
            addrs.push(addr.to_owned());
        } else if let Some((k, v)) = line.split_once(": ") {
            values.insert(k.to_owned(), v.to_owned());
        } else {
            let header = line.strip_suffix(':');
            assert!(
                matches!(header, Some("removed" | "would_remove")),
                "unexpected line {line:?} in {text}"
            );
        }
    }
    (values, addrs)
}

/// Asserts the counts of a `deriva gc` report: removed blobs, recipes and cache entries, bytes
/// reclaimed (blobs, cache), live blobs and recipes, pins.
#[track_caller]
fn assert_gc_counts(report: &HashMap<String, String>, expected: [u64; 8]) {
    let [
        blobs,
        recipes,
        cached,
        blob_bytes,
        cache_bytes,
        live_blobs,
        live_recipes,
        pins,
    ] = expected;
    for (key, value) in [
        ("blobs_removed", blobs),
        ("recipes_removed", recipes),
        ("cache_entries_removed", cached),
        ("bytes_reclaimed_blobs", blob_bytes),
        ("bytes_reclaimed_cache", cache_bytes),
        ("total_bytes_reclaimed", blob_bytes + cache_bytes),
        ("live_blobs", live_blobs),
        ("live_recipes", live_recipes),
        ("pinned_count", pins),
    ] {
        assert_eq!(report[key], value.to_string(), "{key}: {report:?}");
    }
    assert!(
        report["duration_micros"].parse::<u64>().is_ok(),
        "{report:?}"
    );
}

/// `deriva gc` removes what no pin reaches once it is older than the grace period, deepest
/// recipe first, leaves last: a dry run lists it and removes nothing, a grace of an hour keeps
/// everything, `--max 1` removes the deepest unreachable recipe only, and the pinned tree (and
/// the leaf it shares with the garbage) stays retrievable.
#[test]
fn gc_removes_what_no_pin_reaches() {
    // Collections with no grace period, which --gc-min-grace 0s allows.
    let server = ServerProcess::options()
        .args(["--gc-min-grace", "0s"])
        .start();
    // Kept: the pinned recipe tree rk2 = repeat(concat(k1, shared)) and the pinned leaf k2.
    let k1 = server.addr_of_stdin(b"keep one");
    let k2 = server.addr_of_stdin(b"keep two, pinned itself");
    let shared = server.addr_of_stdin(b"shared");
    let rk = server.addr(&["recipe", "concat", "v1", "-i", &k1, "-i", &shared]);
    let rk2 = server.addr(&["recipe", "repeat", "v1", "-i", &rk, "-p", "count=2"]);
    // Unreachable: rg2 = reverse(concat(g1, shared)) and the lone leaf g2.
    let g1 = server.addr_of_stdin(b"gone one");
    let g2 = server.addr_of_stdin(b"gone two");
    let rg = server.addr(&["recipe", "concat", "v1", "-i", &g1, "-i", &shared]);
    let rg2 = server.addr(&["recipe", "reverse", "v1", "-i", &rg]);
    assert_eq!(server.ok(&["pin", &rk2]), "was_new: true\n");
    assert_eq!(server.ok(&["pin", &k2]), "was_new: true\n");
    // Materializing rg2 caches rg and rg2 (14 bytes each), which gc then drops.
    let rg2_bytes: Vec<u8> = b"gone oneshared".iter().rev().copied().collect();
    let out = run(server.deriva(&["get", &rg2]), None);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(out.stdout, rg2_bytes);
    let expected_bytes: [(&str, Vec<u8>); 9] = [
        (&k1, b"keep one".to_vec()),
        (&k2, b"keep two, pinned itself".to_vec()),
        (&shared, b"shared".to_vec()),
        (&rk, b"keep oneshared".to_vec()),
        (&rk2, b"keep onesharedkeep oneshared".to_vec()),
        (&g1, b"gone one".to_vec()),
        (&g2, b"gone two".to_vec()),
        (&rg, b"gone oneshared".to_vec()),
        (&rg2, rg2_bytes),
    ];
    // Age, not readiness: the server stamps puts to the millisecond, and a grace of 0 removes
    // only what was put strictly before the collection started.
    std::thread::sleep(Duration::from_millis(50));

    // 1. A dry run lists exactly the unreachable addresses, deepest recipe first, leaves last,
    // and removes nothing.
    let text = server.ok(&["gc", "--dry-run", "--grace", "0", "--detail"]);
    assert!(
        text.starts_with("dry_run: true (nothing was removed")
            && text.contains("\nwould_remove:\n"),
        "{text}"
    );
    let (report, listed) = gc_report(&text);
    assert_gc_counts(&report, [2, 2, 2, 16, 28, 3, 2, 2]);
    assert_eq!(listed[..2], [rg2.clone(), rg.clone()], "{text}");
    let mut leaves = listed[2..].to_vec();
    leaves.sort();
    let mut expected_leaves = vec![g1.clone(), g2.clone()];
    expected_leaves.sort();
    assert_eq!(leaves, expected_leaves, "{text}");
    for (addr, bytes) in &expected_bytes {
        let out = run(server.deriva(&["get", addr]), None);
        assert_eq!(
            out.code,
            Some(0),
            "get {addr} after a dry run: {}",
            out.stderr
        );
        assert_eq!(&out.stdout, bytes, "get {addr} after a dry run");
    }

    // 2. Everything is younger than an hour: nothing goes, and every recipe is a root.
    let text = server.ok(&["gc", "--grace", "1h"]);
    assert!(text.starts_with("dry_run: false\n"), "{text}");
    let (report, listed) = gc_report(&text);
    assert_gc_counts(&report, [0, 0, 0, 0, 0, 5, 4, 2]);
    assert!(listed.is_empty() && !text.contains("\nremoved:"), "{text}");

    // 3. At most one removal: the deepest unreachable recipe, with its cached output.
    let text = server.ok(&["gc", "--grace", "0", "--max", "1", "--detail"]);
    assert!(
        text.starts_with("dry_run: false\n") && text.contains("\nremoved:\n"),
        "{text}"
    );
    let (report, listed) = gc_report(&text);
    assert_gc_counts(&report, [0, 1, 1, 0, 14, 5, 3, 2]);
    assert_eq!(listed, [rg2.as_str()], "{text}");
    assert!(server.ok(&["resolve", &rg2]).contains("not a recipe"));
    assert!(
        server
            .ok(&["resolve", &rg])
            .starts_with("function: concat\n")
    );

    // 4. The rest of the garbage: rg, then the leaves g1 and g2 (8 bytes each).
    let text = server.ok(&["gc", "--grace", "0"]);
    let (report, listed) = gc_report(&text);
    assert_gc_counts(&report, [2, 1, 1, 16, 14, 3, 2, 2]);
    assert!(listed.is_empty() && !text.contains("\nremoved:"), "{text}");
    for (addr, bytes) in &expected_bytes[..5] {
        let out = run(server.deriva(&["get", addr]), None);
        assert_eq!(out.code, Some(0), "get {addr} after gc: {}", out.stderr);
        assert_eq!(&out.stdout, bytes, "get {addr} after gc");
    }
    for addr in [&g1, &g2, &rg, &rg2] {
        let line = run(server.deriva(&["get", addr]), None).failure(1);
        assert!(line.contains("not found"), "get {addr} after gc: {line}");
    }
    let status = key_values(&server.ok(&["status"]));
    assert_eq!(status["blob_count"], "3", "{status:?}");
    assert_eq!(status["recipe_count"], "2", "{status:?}");
    let text = server.ok(&["gc", "--grace", "0", "--detail"]);
    let (report, listed) = gc_report(&text);
    assert_gc_counts(&report, [0, 0, 0, 0, 0, 3, 2, 2]);
    assert!(
        listed.is_empty() && text.ends_with("\nremoved: (none)\n"),
        "{text}"
    );

    // 5. A grace that is not a duration is a usage error, before any RPC.
    let out = run(server.deriva(&["gc", "--grace", "banana"]), None);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(
        out.stderr.contains("--grace") && out.stderr.contains("\"banana\" is not a duration"),
        "{}",
        out.stderr
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn resolve_invalidate_and_verify_a_recipe() {
    let server = ServerProcess::start();
    let a = server.addr_of_stdin(b"abc");
    let b = server.addr_of_stdin(b"defg");
    let r = server.addr(&["recipe", "concat", "v1", "-i", &a, "-i", &b]);
    let r2 = server.addr(&["recipe", "repeat", "v1", "-i", &r, "-p", "count=2"]);

    assert_eq!(
        server.ok(&["resolve", &r2]),
        format!("function: repeat\nversion: v1\ninputs:\n  {r}\nparams:\n  count=2\n")
    );
    assert_eq!(
        server.ok(&["resolve", &r]),
        format!("function: concat\nversion: v1\ninputs:\n  {a}\n  {b}\nparams: (none)\n")
    );
    assert!(server.ok(&["resolve", &a]).contains("not a recipe"));

    // Materializing r2 caches r and r2; a leaf is never in the cache.
    let out = run(server.deriva(&["get", &r2]), None);
    assert_eq!(out.stdout, b"abcdefgabcdefg");
    // CascadeInvalidate: a dry run first (nothing evicted), then the real one. r and r2 hold
    // 7 + 14 bytes; r2 is two steps from a.
    assert_eq!(
        server.ok(&["invalidate", &a, "--cascade", "--dry-run", "--detail"]),
        format!(
            "dry_run: true\nevicted_count: 2\ntraversed_count: 3\nmax_depth: 2\n\
             bytes_reclaimed: 21\nevicted:\n  {r}\n  {r2}\n"
        )
    );
    assert_eq!(
        server.ok(&["invalidate", &a, "--cascade"]),
        "evicted_count: 2\ntraversed_count: 3\nmax_depth: 2\nbytes_reclaimed: 21\n"
    );
    assert_eq!(
        server.ok(&["invalidate", &r2]),
        "was_cached: false\nevicted_count: 0\n"
    );
    run(server.deriva(&["get", &r2]), None).success(&["get"]);
    assert_eq!(
        server.ok(&["invalidate", "--cascade", &r]),
        "evicted_count: 2\ntraversed_count: 2\nmax_depth: 1\nbytes_reclaimed: 21\n"
    );

    let verify = key_values(&server.ok(&["verify", &r]));
    assert_eq!(verify["deterministic"], "true");
    assert_eq!(
        verify["output_hash"],
        CAddr::for_leaf(b"abcdefg").to_string()
    );
    assert_eq!(verify["output_size"], "7");
    assert!(
        verify["compute_time_us"].parse::<u64>().is_ok(),
        "{verify:?}"
    );
    assert!(!verify.contains_key("error"), "{verify:?}");

    let line = run(server.deriva(&["verify", &a]), None).failure(1);
    assert!(line.contains("leaf"), "{line}");
}

#[test]
fn every_request_carries_the_commands_trace_context_and_trace_prints_its_id() {
    let server = ServerProcess::start();
    // A failing call: failures are logged at INFO (successes only at DEBUG).
    let unknown = "0".repeat(64);
    let out = run(server.deriva(&["--trace", "get", &unknown]), None);
    assert_eq!(out.code, Some(1));
    let stderr = out.stderr.clone();
    let trace_id = stderr
        .lines()
        .find_map(|l| l.strip_prefix("deriva: trace id "))
        .unwrap_or_else(|| panic!("no trace id on stderr: {stderr:?}"))
        .to_owned();
    assert!(trace_id.len() == 32 && trace_id.bytes().all(|b| b.is_ascii_hexdigit()));
    // The server's log line for that call carries the same trace id.
    let with_id = format!("trace_id={trace_id}");
    server.wait_for_stderr(&format!("line with {with_id}"), |line| {
        line.contains("rpc failed") && line.contains(&with_id)
    });
    // Without --trace nothing is printed, but a trace context is still sent.
    let out = run(server.deriva(&["status"]), None);
    assert!(!out.stderr.contains("trace id"));
}

#[test]
fn bench_runs_every_workload_and_reports_json() {
    let server = ServerProcess::start();
    for workload in [
        "status",
        "cached-get",
        "leaf-get",
        "compute-get",
        "put-leaf",
        "mixed",
    ] {
        let out = server.ok(&[
            "bench",
            "--workload",
            workload,
            "--requests",
            "40",
            "--concurrency",
            "4",
            "--json",
        ]);
        let report: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{workload}: {e}: {out}"));
        assert_eq!(report["workload"], workload);
        assert_eq!(report["requests"], 40, "{out}");
        assert_eq!(report["errors"], 0, "{out}");
        assert!(report["throughput_rps"].as_f64().unwrap() > 0.0);
        let latency = &report["latency_us"];
        assert!(latency["p50"].as_u64().unwrap() <= latency["p99"].as_u64().unwrap());
        assert!(latency["p99"].as_u64().unwrap() <= latency["max"].as_u64().unwrap());
        assert!(report["setup"].as_str().unwrap().len() > 10);
    }
    // compute-get really computes: the server's recipe count grows by the requests.
    let status = server.ok(&["status"]);
    let recipes: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("recipe_count: "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(recipes >= 40, "{status}");
    // Text mode, by duration.
    let text = server.ok(&[
        "bench",
        "--workload",
        "cached-get",
        "--duration",
        "300ms",
        "-c",
        "2",
    ]);
    for needle in ["workload:", "throughput:", "req/s", "p50", "p99", "p999"] {
        assert!(text.contains(needle), "{needle} missing in\n{text}");
    }
}

#[test]
fn get_explain_prints_the_materialization_tree() {
    // The local store's calls are lines of the tree only with --trace-local-store; without it,
    // the engine's steps alone. This server samples nothing, whatever the caller says: the
    // tree is there because `--explain` asks for it to be kept (`x-deriva-trace: capture`).
    let plain = ServerProcess::options()
        .env("OTEL_TRACES_SAMPLER", "always_off")
        .start();
    let dir = tempfile::tempdir().unwrap();
    let leaf = dir.path().join("leaf");
    std::fs::write(&leaf, b"plain").unwrap();
    let leaf = plain.addr(&["put", leaf.to_str().unwrap()]);
    let recipe = plain.addr(&["recipe", "reverse", "v1", "-i", &leaf]);
    let out = run(plain.deriva(&["get", &recipe, "--explain"]), None);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(out.stdout, b"nialp");
    assert!(out.stderr.contains("leaf read"), "{}", out.stderr);
    assert!(
        !out.stderr.lines().any(|l| {
            let l = l.trim_start();
            l.starts_with("redb ") || l.starts_with("file ")
        }),
        "a local store call traced without --trace-local-store:\n{}",
        out.stderr
    );
    drop(plain);

    let server = ServerProcess::options()
        .args(["--trace-local-store"])
        .start();
    let dir = tempfile::tempdir().unwrap();
    let (a, c) = (dir.path().join("a"), dir.path().join("c"));
    std::fs::write(&a, b"hello ").unwrap();
    std::fs::write(&c, b"dlrow").unwrap();
    let a = server.addr(&["put", a.to_str().unwrap()]);
    let c = server.addr(&["put", c.to_str().unwrap()]);
    let cached = server.addr(&["recipe", "reverse", "v1", "-i", &c]);
    server.ok(&["get", &cached]); // now cached
    let computed = server.addr(&["recipe", "uppercase", "v1", "-i", &a]);
    let top = server.addr(&["recipe", "concat", "v1", "-i", &cached, "-i", &computed]);

    let out = run(server.deriva(&["get", &top, "--explain"]), None);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(out.stdout, b"worldHELLO ");
    let tree: Vec<&str> = out.stderr.lines().collect();
    assert!(tree[0].starts_with("Get trace "), "{tree:#?}");
    assert!(tree.last().unwrap().starts_with("total "), "{tree:#?}");
    assert!(
        tree.iter().all(|l| l.chars().count() <= 80),
        "80 columns: {tree:#?}"
    );
    // The store's calls to its backend (the local one's redb transactions and files) are
    // lines too; the engine's steps are checked apart from them.
    let is_store_call = |l: &&str| {
        let l = l.trim_start();
        l.starts_with("redb ") || l.starts_with("file ")
    };
    assert!(
        tree.iter()
            .any(|l| l.trim_start().starts_with("redb read leaves")),
        "no redb transaction in the tree: {tree:#?}"
    );
    let steps: Vec<String> = tree[1..tree.len() - 1]
        .iter()
        .filter(|l| !is_store_call(l))
        .map(|l| {
            // The step without its right-aligned duration, and a hit without its origin
            // (checked below).
            let l = l.split(" · ").next().unwrap_or(l);
            let words: Vec<&str> = l.split_whitespace().collect();
            let keep = if matches!(words.last(), Some(&("ms" | "µs" | "s"))) {
                words.len() - 2
            } else {
                words.len()
            };
            let indent = l.len() - l.trim_start().len();
            format!("{}{}", " ".repeat(indent), words[..keep].join(" "))
        })
        .collect();
    let expected = [
        format!("  materialize {} computed", &top[..8]),
        "    cache miss".to_owned(),
        format!("    materialize {} hit", &cached[..8]),
        "      cache hit".to_owned(),
        format!("    materialize {} computed", &computed[..8]),
        "      cache miss".to_owned(),
        format!("      materialize {} leaf", &a[..8]),
        "        cache miss".to_owned(),
        "        leaf read".to_owned(),
        "      compute uppercase/v1 6 B → 6 B".to_owned(),
        "      cache put 6 B".to_owned(),
        "    compute concat/v1 11 B → 11 B".to_owned(),
        "    cache put 11 B".to_owned(),
    ];
    assert_eq!(steps, expected, "\n{}", out.stderr);
    let hit = format!("    materialize {} hit · computed on ", &cached[..8]);
    assert!(
        tree.iter()
            .any(|l| l.starts_with(&hit) && l.contains(" ago in ")),
        "the hit names its origin: {tree:#?}"
    );
}
