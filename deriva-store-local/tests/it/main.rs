//! The integration tests of deriva-store-local, one module per concern.

mod conformance;
mod observe;
mod small_leaves;
mod store;
