//! The integration tests of deriva-testkit: the backends script (`backends.sh`) as the tests of
//! the other crates drive it.

mod backends_script;
