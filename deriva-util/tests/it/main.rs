//! The integration tests of deriva-util, one module per concern.

mod redact;
