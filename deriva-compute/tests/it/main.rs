//! The integration tests of `deriva-compute`, one binary: a module per subject. The engine
//! harness they share is `deriva_testkit::compute`.
//!
//! Every test here shares one process with the others; none sets process-wide state. Spans and
//! log events go to a subscriber of the test's own thread (`tracing::subscriber::set_default`),
//! metrics to a meter provider and Prometheus registry of the test's own.

mod executor;
mod gc;
mod leaf_cache;
mod logs;
mod metrics;
mod output_tier;
mod spans;
