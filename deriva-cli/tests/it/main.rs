//! The integration tests of `deriva-cli`, one binary. The `deriva` binary's runner they use
//! (`deriva_testkit::cli`) is shared with the tests of `deriva-server`, which run the client
//! against a server.

mod usage;
