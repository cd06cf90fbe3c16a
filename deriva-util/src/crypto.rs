//! The process's one TLS crypto provider.
//!
//! Deriva builds rustls with ring only (no aws-lc, a C and CMake build). Clients whose TLS
//! takes the process's default provider rather than one of their own (reqwest built with
//! `rustls-no-provider`, as object_store's S3 client and the OTLP HTTP exporter use it) need
//! one installed before they are built; [`use_ring`] is the one place that does it.

/// Installs ring as the process's default rustls provider, if none is installed yet. Cheap
/// and safe to call before building every client: later calls change nothing.
pub fn use_ring() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // A concurrent first call may win the race; its provider is ring too.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ring_is_the_default_after_use_ring_and_stays_it() {
        super::use_ring();
        super::use_ring();
        let installed = rustls::crypto::CryptoProvider::get_default().expect("a provider");
        let ring = rustls::crypto::ring::default_provider();
        let names = |p: &rustls::crypto::CryptoProvider| {
            p.cipher_suites
                .iter()
                .map(|s| format!("{:?}", s.suite()))
                .collect::<Vec<_>>()
        };
        assert_eq!(names(installed), names(&ring));
    }
}
