//! [`Cutoff`]: ends the Deriva calls still running when the server's shutdown grace is over.
//! [`crate::rpc::RpcLayer`] applies it to every call but `Status`, around the service's
//! response future: a call cut off answers `UNAVAILABLE`, and drops what it holds (its
//! materializations, and with them the store). A `Get` whose stream has started is past the
//! cutoff: it finishes, or the server gives up on its connection one grace period later.

use std::future::Future;

use tokio::sync::watch;
use tonic::Status;

/// See the module docs. Without [`Cutoff::new`] (the default), nothing is ever cut off.
#[derive(Debug, Clone, Default)]
pub struct Cutoff(Option<watch::Receiver<bool>>);

/// The message of a call cut off.
const MESSAGE: &str = "the server is shutting down, and this call outlived the shutdown grace";

impl Cutoff {
    /// A cutoff, and the sender that triggers it with `true` (or by being dropped).
    pub fn new() -> (watch::Sender<bool>, Self) {
        let (tx, rx) = watch::channel(false);
        (tx, Self(Some(rx)))
    }

    /// Runs `call` (a service's response future) until it answers, or until the cutoff
    /// triggers: then `call` is dropped, and the answer is `UNAVAILABLE`.
    pub(crate) async fn run<B, E>(
        self,
        call: impl Future<Output = Result<http::Response<B>, E>>,
    ) -> Result<http::Response<B>, E>
    where
        B: Default,
    {
        let Some(mut rx) = self.0 else {
            return call.await;
        };
        tokio::select! {
            biased;
            done = call => done,
            _ = rx.wait_for(|cut| *cut) => Ok(Status::unavailable(MESSAGE).into_http()),
        }
    }
}
