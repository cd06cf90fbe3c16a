//! The integration tests of deriva-store-remote, one module per concern. Those that need the
//! real services (SeaweedFS, PostgreSQL) start them through `deriva_testkit::backends`,
//! which drives `deriva-testkit/backends.sh`.

mod backends_tls;
mod conformance;
mod counts;
