//! The integration tests of deriva-core, one module per concern.

mod golden;
