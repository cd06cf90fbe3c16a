//! Property tests of [`redact_url`]: generated URLs whose passwords hold `/ ? # @ :` and other
//! printable characters, written as the client that takes them reads them (each test first
//! checks that it does: tokio-postgres, the `url` crate, the `http` crate), never show the
//! password, and show everything else as it was.

use deriva_util::redact::{redact_url, redact_url_without_query};
use proptest::prelude::*;
use std::str::FromStr;

/// A password: printable ASCII with now and then a character beyond it, and at least one of
/// `/ ? # @ :` somewhere.
fn password() -> impl Strategy<Value = String> {
    let char = prop_oneof![
        12 => (0x20u8..=0x7e).prop_map(char::from),
        1 => prop::sample::select(vec!['é', '€', 'ß', '日']),
    ];
    (
        prop::collection::vec(char, 7..24),
        any::<prop::sample::Index>(),
        prop::sample::select(vec!['/', '?', '#', '@', ':']),
    )
        .prop_map(|(mut chars, at, special)| {
            chars.insert(at.index(chars.len() + 1), special);
            chars.into_iter().collect()
        })
}

fn user() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9_]{0,11}"
}

/// A host and maybe a port, as both kinds of client read it.
fn host_port() -> impl Strategy<Value = String> {
    let host = prop_oneof![
        "h[a-z0-9]{0,10}(\\.[a-z]{2,5}){0,2}",
        (0u8..=255, 0u8..=255, 0u8..=255, 1u8..=254)
            .prop_map(|(a, b, c, d)| format!("{a}.{b}.{c}.{d}")),
        Just("[::1]".to_owned()),
    ];
    (host, prop::option::of(1u16..)).prop_map(|(host, port)| match port {
        Some(port) => format!("{host}:{port}"),
        None => host,
    })
}

/// A secret parameter value: any printable character, percent-encoded but for the unreserved.
fn secret_value() -> impl Strategy<Value = String> {
    "[ -~]{6,20}"
}

/// `text` with every character that `keep` refuses written as `%XX` (its UTF-8 bytes).
fn encode(text: &str, keep: impl Fn(char) -> bool) -> String {
    let mut out = String::new();
    for c in text.chars() {
        if keep(c) {
            out.push(c);
        } else {
            let mut buf = [0; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        }
    }
    out
}

fn unreserved(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-._~".contains(c)
}

/// Parameters, each `(name, value as written, secret value or None)`.
fn params(
    secret: &'static [&'static str],
    plain: &'static [&'static str],
) -> impl Strategy<Value = Vec<(String, String, Option<String>)>> {
    let secret = (prop::sample::select(secret), secret_value())
        .prop_map(|(name, value)| (name.to_owned(), encode(&value, unreserved), Some(value)));
    let plain = (prop::sample::select(plain), "[a-z0-9_]{1,8}")
        .prop_map(|(name, value)| (name.to_owned(), value, None));
    prop::collection::vec(prop_oneof![secret, plain], 0..4)
}

/// `?a=1&b=2`, or nothing; with the secret values hidden if `hide`.
fn query(params: &[(String, String, Option<String>)], hide: bool) -> String {
    if params.is_empty() {
        return String::new();
    }
    let pairs: Vec<String> = params
        .iter()
        .map(|(name, value, secret)| match (secret, hide) {
            (Some(_), true) => format!("{name}=***"),
            _ => format!("{name}={value}"),
        })
        .collect();
    format!("?{}", pairs.join("&"))
}

/// The secrets that must not show: each password and secret value, raw and as written.
fn assert_hidden(shown: &str, secrets: &[(&str, &str)]) {
    for (raw, written) in secrets {
        assert!(!shown.contains(raw), "{raw:?} shows in {shown:?}");
        assert!(!shown.contains(written), "{written:?} shows in {shown:?}");
    }
}

/// The password and every secret parameter value, each as chosen and as written.
fn secrets<'a>(
    password: &'a str,
    written: &'a str,
    params: &'a [(String, String, Option<String>)],
) -> Vec<(&'a str, &'a str)> {
    let mut secrets = vec![(password, written)];
    for (_, value, secret) in params {
        if let Some(raw) = secret {
            secrets.push((raw, value));
        }
    }
    secrets
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 2000,
        ..ProptestConfig::default()
    }
}

/// The settings of a PostgreSQL URL, less its password.
#[derive(Debug, Clone)]
struct Pg {
    scheme: &'static str,
    user: String,
    hosts: Vec<String>,
    db: Option<String>,
    params: Vec<(String, String, Option<String>)>,
}

fn pg() -> impl Strategy<Value = Pg> {
    (
        prop::sample::select(vec!["postgres://", "postgresql://"]),
        user(),
        prop::collection::vec(host_port(), 1..3),
        prop::option::of("[a-z][a-z0-9_]{0,10}"),
        params(
            &["password", "sslpassword", "PassWord", "token"],
            &["application_name", "sslmode", "connect_timeout"],
        ),
    )
        .prop_map(|(scheme, user, hosts, db, params)| Pg {
            scheme,
            user,
            hosts,
            db,
            params,
        })
}

impl Pg {
    /// The URL with `written` as the password, with its query if `with_query`.
    fn url(&self, written: &str, with_query: bool, hide: bool) -> String {
        let db = self
            .db
            .as_deref()
            .map_or(String::new(), |d| format!("/{d}"));
        let query = if with_query {
            query(&self.params, hide)
        } else {
            String::new()
        };
        format!(
            "{}{}:{written}@{}{db}{query}",
            self.scheme,
            self.user,
            self.hosts.join(",")
        )
    }

    /// What redaction must show.
    fn shown(&self) -> String {
        self.url("***", true, true)
    }

    /// The URL without the parameters tokio-postgres does not know (a query `password`
    /// would replace the URL's): what the client check parses.
    fn for_client(&self, written: &str) -> String {
        let known = Pg {
            params: self
                .params
                .iter()
                .filter(|p| p.2.is_none())
                .map(|(n, v, _)| {
                    let v = if n == "sslmode" {
                        "prefer".to_owned()
                    } else if n == "connect_timeout" {
                        "5".to_owned()
                    } else {
                        v.clone()
                    };
                    (n.clone(), v, None)
                })
                .collect(),
            ..self.clone()
        };
        known.url(written, true, false)
    }
}

proptest! {
    #![proptest_config(config())]

    /// PostgreSQL URLs as tokio-postgres reads them: the credentials up to the first `@`, so
    /// only `%` and `@` need encoding.
    #[test]
    fn postgres_passwords_never_show(pg in pg(), password in password()) {
        let written = encode(&password, |c| c != '%' && c != '@');
        let client = tokio_postgres::Config::from_str(&pg.for_client(&written)).unwrap();
        prop_assert_eq!(client.get_password(), Some(password.as_bytes()));
        prop_assert_eq!(client.get_user(), Some(pg.user.as_str()));

        let url = pg.url(&written, true, false);
        let shown = redact_url(&url);
        assert_hidden(&shown, &secrets(&password, &written, &pg.params));
        prop_assert_eq!(&shown, &pg.shown());
        let short = redact_url_without_query(&url);
        assert_hidden(&short, &secrets(&password, &written, &pg.params));
        prop_assert_eq!(short, pg.url("***", false, true));
    }

    /// A password with an unencoded `@`, which tokio-postgres cuts at: the rest of it would
    /// read as a host or a database name. All of it is hidden all the same.
    #[test]
    fn postgres_passwords_with_an_unencoded_at_sign_never_show(
        pg in pg(),
        head in "[ -?A-~]{1,10}",
        tail in "[ ->@-~]{6,12}",
    ) {
        // `head` has no '@', `tail` no '?' (which would start tokio-postgres's query).
        let password = format!("{head}@{tail}");
        let written = password.replace('%', "%25");
        let url = pg.url(&written, true, false);
        let shown = redact_url(&url);
        assert_hidden(&shown, &secrets(&password, &written, &pg.params));
        assert!(!shown.contains(&tail), "{tail:?} shows in {shown:?}");
        prop_assert_eq!(shown, pg.shown());
    }

    /// libpq `key=value` strings, as tokio-postgres reads them: the password quoted, with `\`
    /// before `'` and `\`.
    #[test]
    fn key_value_passwords_never_show(
        user in user(),
        host in "[a-z][a-z0-9.-]{0,12}",
        db in "[a-z][a-z0-9_]{0,10}",
        password in password(),
        at in 0usize..4,
    ) {
        let written = format!(
            "'{}'",
            password.replace('\\', "\\\\").replace('\'', "\\'")
        );
        let mut pairs = vec![
            format!("host={host}"),
            format!("user={user}"),
            format!("dbname={db}"),
        ];
        pairs.insert(at.min(pairs.len()), format!("password={written}"));
        let text = pairs.join(" ");
        let client = tokio_postgres::Config::from_str(&text).unwrap();
        prop_assert_eq!(client.get_password(), Some(password.as_bytes()));

        let shown = redact_url(&text);
        assert_hidden(&shown, &[(&password, &written)]);
        pairs[at.min(3)] = "password=***".to_owned();
        prop_assert_eq!(shown, pairs.join(" "));
    }
}

/// The settings of an `http(s)://` URL (an OTLP endpoint), less its password.
#[derive(Debug, Clone)]
struct Http {
    scheme: &'static str,
    user: String,
    host: String,
    path: String,
    params: Vec<(String, String, Option<String>)>,
}

fn http() -> impl Strategy<Value = Http> {
    (
        prop::sample::select(vec!["http://", "https://"]),
        user(),
        host_port(),
        "(/[a-z0-9]{1,8}){0,3}",
        params(
            &[
                "X-Amz-Signature",
                "x-amz-credential",
                "X-AMZ-Security-Token",
                "token",
                "Token",
                "access_token",
            ],
            &["tenant", "region", "v"],
        ),
    )
        .prop_map(|(scheme, user, host, path, params)| Http {
            scheme,
            user,
            host,
            path,
            params,
        })
}

impl Http {
    fn url(&self, written: &str, hide: bool) -> String {
        format!(
            "{}{}:{written}@{}{}{}",
            self.scheme,
            self.user,
            self.host,
            self.path,
            query(&self.params, hide)
        )
    }

    fn shown(&self) -> String {
        self.url("***", true)
    }
}

/// What the `url` and `http` crates take unencoded in a password: the unreserved characters,
/// the sub-delimiters, `:` and `@` (the last `@` of the authority ends the credentials).
fn userinfo_char(c: char) -> bool {
    unreserved(c) || "!$&'()*+,;=:@".contains(c)
}

proptest! {
    #![proptest_config(config())]

    /// `http(s)://` URLs as the `url` and `http` crates read them: the authority ends at the
    /// first `/ ? #`, the credentials at its last `@`.
    #[test]
    fn http_passwords_never_show(http in http(), password in password()) {
        let written = encode(&password, userinfo_char);
        let url = http.url(&written, false);
        let parsed = url::Url::parse(&url).unwrap();
        let read = deriva_util::escape::percent_decode(parsed.password().unwrap()).unwrap();
        prop_assert_eq!(&read, &password);
        prop_assert_eq!(parsed.username(), http.user.as_str());
        let uri = http::Uri::from_str(&url).unwrap();
        let authority = uri.authority().unwrap().as_str();
        let (credentials, _) = authority.rsplit_once('@').unwrap();
        let (_, written_back) = credentials.split_once(':').unwrap();
        prop_assert_eq!(written_back, written.as_str());

        let shown = redact_url(&url);
        assert_hidden(&shown, &secrets(&password, &written, &http.params));
        prop_assert_eq!(shown, http.shown());
    }

    /// A password with `/ ? #` left unencoded, which the clients cannot read (the rest of it
    /// would read as a path): all of it is hidden all the same.
    #[test]
    fn http_passwords_with_unencoded_delimiters_never_show(
        http in http(),
        head in "[a-zA-Z0-9@:]{0,6}",
        delimiter in prop::sample::select(vec!['/', '?', '#', '\\']),
        tail in "[ -~]{6,12}",
    ) {
        let password = format!("{head}{delimiter}{tail}");
        // Only what would end the URL's parts early besides the delimiters is encoded.
        let written = encode(&password, |c| c != '%' && c != ' ');
        let url = http.url(&written, false);
        let shown = redact_url(&url);
        assert_hidden(&shown, &secrets(&password, &written, &http.params));
        prop_assert_eq!(shown, http.shown());
    }
}
