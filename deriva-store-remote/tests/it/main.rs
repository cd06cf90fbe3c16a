//! The integration tests of deriva-store-remote, one module per concern. Those that need the
//! real services (SeaweedFS, PostgreSQL) start them through `services`, which drives
//! `scripts/backends.sh`.

mod backends_script;
mod backends_tls;
mod conformance;
mod services;
