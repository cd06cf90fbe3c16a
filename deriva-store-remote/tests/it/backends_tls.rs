//! The remote backends over TLS, against the real services of `deriva-testkit/backends.sh`, whose
//! certificates a test CA signed for `localhost` and `127.0.0.1`:
//! - PostgreSQL with libpq's `sslmode`: `verify-full` checks the CA and the host name,
//!   `verify-ca` the CA only, `require` encrypts without checking; a client certificate logs in
//!   a role that accepts nothing else; every connection of the store really is TLS;
//! - S3 over https with the CA in `AWS_CA_BUNDLE`; without it, the store refuses the
//!   certificate and says so.

use deriva_testkit::backends as services;

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use deriva_core::{DerivaError, Params, Recipe};
use deriva_store::Store;
use deriva_store::observe::BackendMetrics;
use deriva_store_remote::RemoteConfig;
use rcgen::{CertificateParams, DnType, Issuer, KeyPair};
use services::Backends;

/// A place of one test's own in the shared services, with its own application name, so that
/// its connections can be told apart in `pg_stat_activity`.
struct Case {
    services: Arc<Backends>,
    tag: String,
    spool: tempfile::TempDir,
    files: tempfile::TempDir,
}

impl Case {
    fn new(test: &str) -> Self {
        Self {
            services: services::shared(),
            tag: format!("{test}_{}", std::process::id()),
            spool: tempfile::tempdir().expect("a spool directory"),
            files: tempfile::tempdir().expect("a directory for certificates"),
        }
    }

    fn ca(&self) -> String {
        self.services
            .tls_ca()
            .to_str()
            .expect("a UTF-8 path")
            .to_owned()
    }

    /// A URL that connects to 127.0.0.1 but names `host`, the name TLS checks; `app` is the
    /// connections' application name; `tls` the rest (`sslmode=…`).
    fn pg_url(&self, user: &str, host: &str, app: &str, tls: &str) -> String {
        format!(
            "postgres://{user}@{host}:{}/deriva?hostaddr=127.0.0.1&application_name={app}&{tls}",
            self.services.pg_port()
        )
    }

    fn config(&self, index: String, aws: Vec<(String, String)>) -> RemoteConfig {
        RemoteConfig {
            blob_store: format!("s3://{}/tls-{}", self.services.bucket(), self.tag),
            aws,
            index,
            schema: format!("tls_{}", self.tag),
            pool_size: 4,
            local_cache: None,
            spool_dir: Some(self.spool.path().to_owned()),
            output_tier: false,
            create_schema: true,
            node_id: "tls".into(),
            compute_lease_ttl: deriva_store_remote::LEASE_TTL,
        }
    }

    async fn open(&self, index: String, aws: Vec<(String, String)>) -> Result<Store, DerivaError> {
        deriva_store_remote::open(&self.config(index, aws), Arc::new(BackendMetrics::noop()))
            .await
            .map(|remote| remote.store)
    }

    /// The object store over https, trusting `bundle` (`AWS_CA_BUNDLE`) if given.
    fn https_aws(&self, bundle: Option<&str>) -> Vec<(String, String)> {
        let mut aws: Vec<_> = self
            .services
            .aws_env()
            .into_iter()
            .filter(|(k, _)| k != "AWS_ENDPOINT_URL")
            .collect();
        aws.push(("AWS_ENDPOINT_URL".into(), self.services.s3_https_endpoint()));
        if let Some(bundle) = bundle {
            aws.push(("AWS_CA_BUNDLE".into(), bundle.to_owned()));
        }
        aws
    }

    /// How many connections named `app` are open, over TLS and not: asked over a plaintext
    /// connection of its own.
    async fn connections(&self, app: &str) -> (i64, i64) {
        let (client, conn) =
            tokio_postgres::connect(&self.services.pg_url(), tokio_postgres::NoTls)
                .await
                .expect("connecting to PostgreSQL");
        tokio::spawn(conn);
        let row = client
            .query_one(
                "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl) \
                 FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
                 WHERE a.application_name = $1",
                &[&app],
            )
            .await
            .expect("reading pg_stat_ssl");
        (row.get(0), row.get(1))
    }

    fn write(&self, name: &str, text: &str) -> String {
        let path = self.files.path().join(name);
        std::fs::write(&path, text).expect("writing a file");
        path.to_str().expect("a UTF-8 path").to_owned()
    }
}

/// A leaf and a recipe over it go in and come back.
async fn round_trip(store: &Store, what: &str) {
    let leaf = store
        .put_leaf(Bytes::from(format!("over TLS: {what}")))
        .await
        .unwrap_or_else(|e| panic!("{what}: putting a leaf: {e}"));
    let concat = deriva_core::FunctionId::new("concat", "v1").unwrap();
    let recipe = Recipe::new(concat, vec![leaf], Params::new()).unwrap();
    let addr = store
        .put_recipe(recipe)
        .await
        .unwrap_or_else(|e| panic!("{what}: putting a recipe: {e}"));
    assert!(store.get_recipe(addr).await.unwrap().is_some(), "{what}");
    assert_eq!(
        store.get_leaf(leaf).await.unwrap().as_deref(),
        Some(format!("over TLS: {what}").as_bytes()),
        "{what}"
    );
}

/// The failure of opening a store that must not connect: UNAVAILABLE (the database cannot be
/// reached as asked), and its message.
async fn refused(case: &Case, index: String, what: &str) -> String {
    let aws = case.services.aws_env();
    match case.open(index, aws).await {
        Ok(_) => panic!("{what}: the store opened"),
        Err(e @ DerivaError::Unavailable { .. }) => e.to_string(),
        Err(e) => panic!("{what}: not UNAVAILABLE: {e:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_index_over_tls_checks_the_servers_certificate() {
    let case = Case::new("index");
    let ca = case.ca();
    let http = case.services.aws_env();

    // verify-full: the test CA, and the name the certificate is for. Every connection the
    // store holds is TLS.
    let app = format!("full_{}", case.tag);
    let url = case.pg_url(
        "deriva",
        "localhost",
        &app,
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    );
    let store = case.open(url, http.clone()).await.expect("verify-full");
    round_trip(&store, "verify-full").await;
    let (tls, plain) = case.connections(&app).await;
    assert!(
        tls > 0 && plain == 0,
        "{tls} TLS and {plain} plaintext connections"
    );
    drop(store);

    // The same CA, and a name the certificate is not for.
    let wrong_name = |mode: &str| {
        case.pg_url(
            "deriva",
            "deriva-other-host",
            &format!("wrong_{}", case.tag),
            &format!("sslmode={mode}&sslrootcert={ca}"),
        )
    };
    let e = refused(&case, wrong_name("verify-full"), "verify-full, wrong name").await;
    assert!(
        e.contains("certificate") && e.contains("deriva-other-host"),
        "{e}"
    );
    // verify-ca does not check the name.
    let store = case
        .open(wrong_name("verify-ca"), http.clone())
        .await
        .expect("verify-ca, another name");
    round_trip(&store, "verify-ca").await;
    drop(store);

    // A certificate another CA signed is refused, whatever the name.
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "another CA");
    let other = params.self_signed(&KeyPair::generate().unwrap()).unwrap();
    let other = case.write("other-ca.pem", &other.pem());
    for mode in ["verify-full", "verify-ca", "require"] {
        let url = case.pg_url(
            "deriva",
            "localhost",
            &format!("other_{}", case.tag),
            &format!("sslmode={mode}&sslrootcert={other}"),
        );
        let e = refused(&case, url, &format!("{mode} with another CA")).await;
        assert!(e.contains("UnknownIssuer"), "{mode}: {e}");
    }

    // require without a root certificate: encrypted, nothing checked (libpq's rule).
    let app = format!("require_{}", case.tag);
    let url = case.pg_url("deriva", "deriva-other-host", &app, "sslmode=require");
    let store = case.open(url, http.clone()).await.expect("require");
    round_trip(&store, "require").await;
    let (tls, plain) = case.connections(&app).await;
    assert!(
        tls > 0 && plain == 0,
        "{tls} TLS and {plain} plaintext connections"
    );
    drop(store);

    // A mistake in the parameters is named before anything connects.
    let url = case.pg_url("deriva", "localhost", "x", "sslmode=verify-full");
    match case.open(url, http).await {
        Err(DerivaError::InvalidInput(e)) => assert!(e.contains("needs sslrootcert"), "{e}"),
        other => panic!("verify-full without sslrootcert: {:?}", other.map(|_| ())),
    }
}

/// The role `deriva_cert` logs in only with a client certificate for its name, signed by the
/// test CA (`deriva-testkit/backends.sh` sets PostgreSQL up so): `sslcert` and `sslkey` give it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_logs_in_where_nothing_else_does() {
    let case = Case::new("client_cert");
    let ca_path = case.services.tls_ca();
    let ca_key = std::fs::read_to_string(Path::new(&ca_path).with_file_name("ca.key"))
        .expect("the test CA's key");
    let ca_pem = std::fs::read_to_string(&ca_path).expect("the test CA");
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, KeyPair::from_pem(&ca_key).unwrap())
        .expect("the test CA as an issuer");
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "deriva_cert");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let (cert, key) = (
        case.write("client.pem", &cert.pem()),
        case.write("client.key", &key.serialize_pem()),
    );
    let ca = case.ca();
    let http = case.services.aws_env();

    let verified = format!("sslmode=verify-full&sslrootcert={ca}");
    let url = case.pg_url(
        "deriva_cert",
        "localhost",
        "cert",
        &format!("{verified}&sslcert={cert}&sslkey={key}"),
    );
    let store = case
        .open(url, http)
        .await
        .expect("with the client certificate");
    round_trip(&store, "client certificate").await;
    drop(store);

    let e = refused(
        &case,
        case.pg_url("deriva_cert", "localhost", "nocert", &verified),
        "without a client certificate",
    )
    .await;
    assert!(e.contains("requires a valid client certificate"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_object_store_over_https_trusts_aws_ca_bundle() {
    let case = Case::new("objects");
    let ca = case.ca();
    let index = case.services.pg_url();

    let store = case
        .open(index.clone(), case.https_aws(Some(&ca)))
        .await
        .expect("https with AWS_CA_BUNDLE");
    round_trip(&store, "https").await;
    drop(store);

    // Without the bundle the machine's CAs do not know the test CA: the put fails, saying why,
    // and stores nothing.
    let store = case
        .open(index.clone(), case.https_aws(None))
        .await
        .expect("opening does not contact the object store");
    match store.put_leaf(Bytes::from_static(b"never stored")).await {
        Err(e @ DerivaError::Unavailable { .. }) => {
            assert!(e.to_string().contains("certificate"), "{e}");
        }
        other => panic!("https without the CA: {other:?}"),
    }
    let addr = deriva_core::CAddr::for_leaf(b"never stored");
    assert_eq!(store.kind_of(addr).await.unwrap(), None);
    drop(store);

    // A bundle that cannot be read is named when the store opens.
    for (bundle, why) in [
        ("/nonexistent/ca.pem".to_owned(), "No such file"),
        (
            case.write("empty.pem", "no certificate here\n"),
            "no PEM certificate",
        ),
    ] {
        match case
            .open(index.clone(), case.https_aws(Some(&bundle)))
            .await
        {
            Err(DerivaError::InvalidInput(e)) => {
                assert!(
                    e.contains(&format!("AWS_CA_BUNDLE={bundle}")) && e.contains(why),
                    "{e}"
                );
            }
            other => panic!("AWS_CA_BUNDLE={bundle}: {:?}", other.map(|_| ())),
        }
    }
}
