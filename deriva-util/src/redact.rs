//! Connection strings with their secrets hidden, for printing: [`redact_url`] is the one
//! redaction of every URL Deriva shows (`--print-config`, `/debug`, logs, error messages, the
//! name of a backend in spans and `Unavailable` answers), whatever crate prints it.
//!
//! A secret is hidden where the client that uses the string would find it, not where a generic
//! URL grammar would:
//!
//! - **`postgres://`, `postgresql://`** (tokio-postgres): the credentials run up to the *first*
//!   `@`, so a password may hold an unencoded `/`, `?`, `#` or `:`; the password is what
//!   follows the first `:` in them. The query begins at the first `?` after the credentials.
//! - **Any other scheme** (`http(s)://` OTLP endpoints, read by the `http` and `url` crates;
//!   `s3://`): the authority ends at the first `/`, `?` or `#` (also `\` for the web schemes),
//!   and the credentials at its *last* `@`.
//! - **A libpq `key=value` string** (no scheme): read as tokio-postgres reads it ([`key_values`]:
//!   values may be quoted and escape with `\`).
//!
//! In each, [`HIDDEN`] replaces the password and the value of every parameter whose name says it
//! is a secret ([`is_secret_name`]: `password`, `sslpassword`, `token`, any `X-Amz-*`, …,
//! case-insensitive, `%XX`-decoded first). What an operator needs stays: the scheme, the user,
//! the hosts and ports, the path (database, bucket, prefix) and the other parameters.
//!
//! A string its client would misread is hidden more widely, never less: an `@` after the first
//! one of a PostgreSQL URL, before its query (or anywhere, if the query does not read as
//! parameters), ends a password that held an unencoded `@`; an `@` after the authority of any
//! other URL whose authority holds a `:` ends a password that held an unencoded `/`, `?` or
//! `#`. Everything before such an `@` (after the user) is hidden.

use crate::escape::percent_decode;

/// What replaces a secret.
pub const HIDDEN: &str = "***";

/// `text` (a URL or a libpq `key=value` string) with its secrets replaced by [`HIDDEN`]: see the
/// module documentation for where they are found.
pub fn redact_url(text: &str) -> String {
    match Parsed::of(text) {
        Parsed::Url(url) => url.render(true),
        Parsed::KeyValues(pairs) => render_pairs(&pairs, |_| true),
        Parsed::Unreadable => hide_after_secret_word(text),
    }
}

/// [`redact_url`] without the query and the fragment (a `key=value` string: only its `host`,
/// `hostaddr`, `port`, `dbname` and `user`): a short name for a backend, for messages that may
/// reach clients.
pub fn redact_url_without_query(text: &str) -> String {
    match Parsed::of(text) {
        Parsed::Url(url) => url.render(false),
        Parsed::KeyValues(pairs) => render_pairs(&pairs, |key| {
            matches!(key, "host" | "hostaddr" | "port" | "dbname" | "user")
        }),
        Parsed::Unreadable => hide_after_secret_word(text),
    }
}

/// Whether a parameter's name says its value is a secret: it contains `password`, `passwd`,
/// `secret`, `token`, `signature`, `credential`, `apikey`, `api_key` or `api-key`, starts with
/// `x-amz-`, or is `sig` or `key`; case-insensitive.
pub fn is_secret_name(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    const PARTS: [&str; 9] = [
        "password",
        "passwd",
        "secret",
        "token",
        "signature",
        "credential",
        "apikey",
        "api_key",
        "api-key",
    ];
    PARTS.iter().any(|p| name.contains(p))
        || name.starts_with("x-amz-")
        || name == "sig"
        || name == "key"
}

/// Whether `url` is a PostgreSQL URL as tokio-postgres takes one (`postgres://` or
/// `postgresql://`).
pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// Where the query of a PostgreSQL URL begins, as tokio-postgres reads it: the byte offset of
/// the first `?` after the credentials (which end at the first `@`), or `None` if there is no
/// query (or `url` is not a [PostgreSQL URL](is_postgres_url)).
pub fn postgres_query_start(url: &str) -> Option<usize> {
    if !is_postgres_url(url) {
        return None;
    }
    let authority = url.find("://")? + 3;
    let from = url[authority..]
        .find('@')
        .map_or(authority, |at| authority + at + 1);
    url[from..].find('?').map(|q| from + q)
}

/// One `key=value` of a libpq connection string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue<'a> {
    /// The key, as written.
    pub key: String,
    /// The value, unquoted and unescaped.
    pub value: String,
    /// The pair as written (`password='a b'`).
    pub text: &'a str,
}

/// The pairs of a libpq `key=value` string, read as tokio-postgres reads them: pairs separated
/// by whitespace, whitespace allowed around `=`, values quoted (`'…'`) or not, `\` escaping
/// the next character. `None` if it does not read (no `=`, an empty key, an unterminated
/// quote).
pub fn key_values(text: &str) -> Option<Vec<KeyValue<'_>>> {
    let mut pairs = Vec::new();
    let mut chars = text.char_indices().peekable();
    loop {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let Some(&(start, _)) = chars.peek() else {
            return Some(pairs);
        };
        let mut key = String::new();
        while let Some((_, c)) = chars.next_if(|(_, c)| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        chars.next_if(|(_, c)| *c == '=')?;
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        let quoted = chars.next_if(|(_, c)| *c == '\'').is_some();
        let end = loop {
            match chars.next() {
                None if quoted => return None,
                None => break text.len(),
                Some((_, '\\')) => value.push(chars.next()?.1),
                Some((at, '\'')) if quoted => break at + 1,
                Some((at, c)) if c.is_whitespace() && !quoted => break at,
                Some((_, c)) => value.push(c),
            }
        };
        if key.is_empty() {
            return None;
        }
        pairs.push(KeyValue {
            key,
            value,
            text: &text[start..end],
        });
    }
}

/// A connection string, read for printing.
enum Parsed<'a> {
    Url(Url<'a>),
    KeyValues(Vec<KeyValue<'a>>),
    /// Neither a URL nor a `key=value` string.
    Unreadable,
}

/// A URL cut where its client cuts it.
struct Url<'a> {
    /// Up to and with `://`.
    scheme: &'a str,
    /// Before the `@` that ends the credentials, if there is one.
    credentials: Option<&'a str>,
    /// The hosts (and ports) and the path.
    location: &'a str,
    /// From the `?`, if there is one, up to the fragment.
    query: &'a str,
    /// From the `#` (not for PostgreSQL, whose client does not treat it apart).
    fragment: &'a str,
}

impl<'a> Parsed<'a> {
    fn of(text: &'a str) -> Self {
        match scheme_end(text) {
            Some(end) => {
                let (scheme, rest) = text.split_at(end);
                let postgres = scheme.eq_ignore_ascii_case("postgres://")
                    || scheme.eq_ignore_ascii_case("postgresql://");
                Parsed::Url(if postgres {
                    Url::postgres(scheme, rest)
                } else {
                    Url::other(scheme, rest)
                })
            }
            None => key_values(text).map_or(Parsed::Unreadable, Parsed::KeyValues),
        }
    }
}

/// The end of `scheme://` at the start of `text` (a letter, then letters, digits, `+`, `-` or
/// `.`), if it starts with one.
fn scheme_end(text: &str) -> Option<usize> {
    let colon = text.find("://")?;
    let scheme = &text[..colon];
    let mut chars = scheme.chars();
    let first = chars.next()?;
    (first.is_ascii_alphabetic()
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
    .then_some(colon + 3)
}

impl<'a> Url<'a> {
    /// tokio-postgres's reading: the credentials end at the first `@`, the query begins at the
    /// first `?` after them; widened for an unencoded `@` in the password (module docs).
    fn postgres(scheme: &'a str, rest: &'a str) -> Self {
        let mut credentials_end = rest.find('@');
        if let Some(first) = credentials_end {
            let after = first + 1;
            let query = rest[after..].find('?').map_or(rest.len(), |q| after + q);
            let widened = match rest[after..query].rfind('@') {
                Some(at) => Some(after + at),
                None if !query_reads(&rest[query..]) => {
                    rest[query..].rfind('@').map(|at| query + at)
                }
                None => None,
            };
            credentials_end = widened.or(credentials_end);
        }
        let (credentials, after) = split_credentials(rest, credentials_end);
        let query = after.find('?').unwrap_or(after.len());
        Self {
            scheme,
            credentials,
            location: &after[..query],
            query: &after[query..],
            fragment: "",
        }
    }

    /// The `http` and `url` crates' reading: the authority ends at the first `/`, `?` or `#`
    /// (or `\` for the web schemes), the credentials at its last `@`; widened for an unencoded
    /// `/`, `?` or `#` in the password (module docs).
    fn other(scheme: &'a str, rest: &'a str) -> Self {
        let web = ["http://", "https://", "ws://", "wss://", "ftp://"]
            .iter()
            .any(|s| scheme.eq_ignore_ascii_case(s));
        let authority_end = rest
            .find(|c| matches!(c, '/' | '?' | '#') || (web && c == '\\'))
            .unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(authority_end);
        let credentials_end = if authority.contains(':') && tail.contains('@') {
            rest.rfind('@')
        } else {
            authority.rfind('@')
        };
        let (credentials, after) = split_credentials(rest, credentials_end);
        let query = after.find(['?', '#']).unwrap_or(after.len());
        let (location, after_location) = after.split_at(query);
        let fragment = after_location.find('#').unwrap_or(after_location.len());
        Self {
            scheme,
            credentials,
            location,
            query: &after_location[..fragment],
            fragment: &after_location[fragment..],
        }
    }

    /// The URL with its secrets hidden; without its query and fragment unless `query`.
    fn render(&self, query: bool) -> String {
        let mut out = String::from(self.scheme);
        if let Some(credentials) = self.credentials {
            // The user is what precedes the first `:`, the password all the rest.
            let (user, password) = match credentials.split_once(':') {
                Some((user, _)) => (user, true),
                None => (credentials, false),
            };
            // A user that holds a query is a URL its client misreads: its secrets go too.
            match user.split_once('?') {
                Some((name, params)) => {
                    out.push_str(name);
                    out.push('?');
                    out.push_str(&redact_params(params));
                }
                None => out.push_str(user),
            }
            if password {
                out.push(':');
                out.push_str(HIDDEN);
            }
            out.push('@');
        }
        out.push_str(self.location);
        if query {
            for part in [self.query, self.fragment] {
                if let Some(first) = part.chars().next() {
                    out.push(first);
                    out.push_str(&redact_params(&part[first.len_utf8()..]));
                }
            }
        }
        out
    }
}

/// `rest` cut at the `@` at `end`, if any: the credentials, and what follows the `@`.
fn split_credentials(rest: &str, end: Option<usize>) -> (Option<&str>, &str) {
    match end {
        Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
        None => (None, rest),
    }
}

/// Whether a PostgreSQL query (from its `?`, or empty) reads as tokio-postgres's parameters:
/// `&`-separated `key=value`, each key made of letters, digits and `_` once decoded.
fn query_reads(query: &str) -> bool {
    let Some(params) = query.strip_prefix('?') else {
        return true;
    };
    params.split('&').all(|pair| {
        pair.split_once('=').is_some_and(|(key, _)| {
            let key = percent_decode(key).unwrap_or_else(|| key.to_owned());
            !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
    })
}

/// `&`-separated `key=value` pairs with the values of secret keys hidden.
fn redact_params(params: &str) -> String {
    params
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if is_secret_key(key) => format!("{key}={HIDDEN}"),
            _ => pair.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// [`is_secret_name`] of a key as written in a URL (`%XX`-decoded first).
fn is_secret_key(key: &str) -> bool {
    is_secret_name(key) || percent_decode(key).is_some_and(|k| is_secret_name(&k))
}

/// The pairs whose keys `keep` admits, secrets hidden, separated by spaces.
fn render_pairs(pairs: &[KeyValue<'_>], keep: impl Fn(&str) -> bool) -> String {
    pairs
        .iter()
        .filter(|p| keep(&p.key))
        .map(|p| {
            if is_secret_name(&p.key) {
                format!("{}={HIDDEN}", p.key)
            } else {
                p.text.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Text that reads neither as a URL nor as `key=value` pairs (an unterminated quote, say): cut
/// after the first word that names a secret, if there is one, the rest hidden.
fn hide_after_secret_word(text: &str) -> String {
    let lower = text.to_ascii_lowercase();
    let words = ["password", "passwd", "secret", "token"];
    match words
        .iter()
        .filter_map(|w| lower.find(w).map(|at| at + w.len()))
        .min()
    {
        Some(end) => format!("{}={HIDDEN}", text[..end].trim_end_matches([' ', '='])),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_credentials_end_at_the_first_at_sign() {
        for (url, shown) in [
            (
                "postgres://u:secret@h:5432/db",
                "postgres://u:***@h:5432/db",
            ),
            ("postgres://u:S3c/retPW@db/x", "postgres://u:***@db/x"),
            ("postgres://u:a?b#c:d@h/db?x=1", "postgres://u:***@h/db?x=1"),
            ("postgresql://u:p%40q@h", "postgresql://u:***@h"),
            ("postgres://u@h/db", "postgres://u@h/db"),
            ("postgres://u:@h/db", "postgres://u:***@h/db"),
            (
                "postgres://h1:5432,h2:5433/db",
                "postgres://h1:5432,h2:5433/db",
            ),
            ("POSTGRES://u:p/q@h/db", "POSTGRES://u:***@h/db"),
            // As tokio-postgres reads it: user "h", password "5432/db?application_name=a".
            (
                "postgres://h:5432/db?application_name=a@b",
                "postgres://h:***@b",
            ),
            // No ':' before the first '@': a strange user, no password.
            ("postgres://h/db?x=a@b", "postgres://h/db?x=a@b"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn an_unencoded_at_sign_in_a_postgres_password_hides_more() {
        for (url, shown) in [
            ("postgres://u:ab@cd@h:5432/db", "postgres://u:***@h:5432/db"),
            ("postgres://u:ab@c/d@h/db", "postgres://u:***@h/db"),
            ("postgres://u:a@b?c@h/db", "postgres://u:***@h/db"),
            (
                "postgres://u:a@b?c/d@h/db?sslmode=require",
                "postgres://u:***@h/db?sslmode=require",
            ),
            (
                "postgres://u:p@h/db?application_name=me@node",
                "postgres://u:***@h/db?application_name=me@node",
            ),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn other_urls_end_their_credentials_at_the_last_at_sign_of_the_authority() {
        for (url, shown) in [
            (
                "https://user:hunter2@otel:4318",
                "https://user:***@otel:4318",
            ),
            ("http://u:a@b:c@h:4318/v1", "http://u:***@h:4318/v1"),
            ("http://u:a%2Fb%3Fc@h/", "http://u:***@h/"),
            ("s3://bucket/prefix", "s3://bucket/prefix"),
            ("s3://key:secret@bucket/p", "s3://key:***@bucket/p"),
            ("http://h/v1@x", "http://h/v1@x"),
            // A password with an unencoded '/', '?' or '#', which the client cannot read.
            ("http://u:p/ss@h:4318/v1", "http://u:***@h:4318/v1"),
            ("http://u:1234/ss@h/", "http://u:***@h/"),
            ("http://u:ab@cd/ef@h:1/", "http://u:***@h:1/"),
            ("http://u:p?q#r@h/", "http://u:***@h/"),
            ("https://u:p\\q@h/", "https://u:***@h/"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn secret_parameters_are_hidden_and_the_others_kept() {
        for (url, shown) in [
            (
                "postgres://u@h/db?sslmode=require&password=s3cret&x=1",
                "postgres://u@h/db?sslmode=require&password=***&x=1",
            ),
            (
                "postgres://u@h/db?sslpassword=k&PassWord=z&pass%77ord=y",
                "postgres://u@h/db?sslpassword=***&PassWord=***&pass%77ord=***",
            ),
            (
                "https://b.s3.amazonaws.com/k?X-Amz-Credential=AK%2F1&x-amz-signature=ab&X-Amz-Date=1",
                "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&x-amz-signature=***&X-Amz-Date=***",
            ),
            (
                "http://h:4318/v1?Token=t&tenant=a#access_token=z",
                "http://h:4318/v1?Token=***&tenant=a#access_token=***",
            ),
            (
                "postgres://h/mypassword_db?sslrootcert=/etc/ca.pem",
                "postgres://h/mypassword_db?sslrootcert=/etc/ca.pem",
            ),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn key_value_strings_hide_their_passwords() {
        for (text, shown) in [
            ("host=h user=u", "host=h user=u"),
            (
                "host=h password='a b' user=u sslpassword=k",
                "host=h password=*** user=u sslpassword=***",
            ),
            (r"password='it\'s sec ret' host=h", "password=*** host=h"),
            (r"password=a\ b host=h", "password=*** host=h"),
            ("password = top", "password=***"),
            ("host=h password='unterminated sec", "host=h password=***"),
            ("./deriva-data", "./deriva-data"),
        ] {
            assert_eq!(redact_url(text), shown, "{text}");
        }
    }

    #[test]
    fn without_the_query_a_url_names_its_backend() {
        assert_eq!(
            redact_url_without_query(
                "postgres://u:p/w@db:5432/idx?sslmode=verify-full&sslrootcert=/ca.pem"
            ),
            "postgres://u:***@db:5432/idx"
        );
        assert_eq!(
            redact_url_without_query("host=db port=5 password=x dbname=d sslmode=require"),
            "host=db port=5 dbname=d"
        );
        assert_eq!(
            redact_url_without_query("http://u:p@h:4318/v1?token=x#f"),
            "http://u:***@h:4318/v1"
        );
    }

    #[test]
    fn the_query_of_a_postgres_url_begins_after_its_credentials() {
        assert_eq!(postgres_query_start("postgres://u:a?b@h/db?x=1"), Some(21));
        assert_eq!(postgres_query_start("postgres://h/db?x=1"), Some(15));
        assert_eq!(postgres_query_start("postgres://u:a?b@h/db"), None);
        assert_eq!(postgres_query_start("http://h/?x=1"), None);
    }
}
