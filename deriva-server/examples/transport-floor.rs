//! The transport floor of issue 20: a tonic server of the same `service Deriva`, with no layers,
//! no tracing, no auth and no store. Its handlers answer fixed responses, so what it costs per
//! request is what tonic, hyper and the kernel cost, and `scripts/bench-floor.sh` divides
//! Deriva's cost per request by it.
//!
//! - `Status`: a fixed `StatusResponse`.
//! - `PutLeaf` and `PutRecipe`: a fixed 32-byte address (no hashing: the floor does no work).
//! - `Get`: exactly one message, whose chunk is one preallocated buffer of `--size` bytes,
//!   shared (never copied) by every answer.
//! - Every other RPC: `UNIMPLEMENTED`.
//!
//! The runtime and the HTTP/2 settings are those of `deriva-server` with its default flags (a
//! multi-thread runtime with one worker per core; its header-list, stream, keepalive and
//! message-size limits; no Nagle delay), so that the two differ only in the layers and the work.
//!
//! It prints its endpoint (`http://127.0.0.1:PORT`) as the first line of stdout, then serves
//! until killed.
//!
//! Run: `cargo run --release -p deriva-server --example transport-floor -- --size 1KiB`.

use std::io::Write as _;
use std::net::SocketAddr;

use bytes::Bytes;
use clap::Parser;
use deriva_proto::deriva_server::{Deriva, DerivaServer};
use deriva_proto::{
    CascadeInvalidateRequest, CascadeInvalidateResponse, ClusterStatusRequest,
    ClusterStatusResponse, ExplainRequest, ExplainResponse, GcRequest, GcResponse, GetRequest,
    GetResponse, InvalidateRequest, InvalidateResponse, ListPinsRequest, ListPinsResponse,
    PinRequest, PinResponse, PutLeafRequest, PutLeafResponse, PutLeafStreamRequest,
    PutRecipeRequest, PutRecipeResponse, ResolveRequest, ResolveResponse, StatusRequest,
    StatusResponse, UnpinRequest, UnpinResponse, VerifyRequest, VerifyResponse,
};
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};

/// Flags of the floor.
#[derive(Debug, Parser)]
#[command(
    name = "transport-floor",
    about = "A Deriva gRPC server that does no work"
)]
struct Args {
    /// Address to listen on; port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Bytes in the one chunk every `Get` answers, such as 1KiB or 1MiB.
    #[arg(long, default_value = "1KiB", value_parser = deriva_util::size::parse_size)]
    size: u64,
}

/// The service: fixed answers, built once.
#[derive(Debug, Clone)]
struct Floor {
    addr: Bytes,
    chunk: Bytes,
    status: StatusResponse,
}

impl Floor {
    fn new(size: usize) -> Self {
        Self {
            addr: Bytes::from_static(&[0x42; 32]),
            chunk: Bytes::from(vec![0x61; size]),
            // Shaped like a real answer (a few counters and the verification mode), so the
            // message on the wire is about as long as Deriva's.
            status: StatusResponse {
                recipe_count: 1,
                blob_count: 2,
                cache_entries: 1,
                cache_size_bytes: 1024,
                cache_hit_rate: 0.5,
                verification_mode: "off".into(),
                ..Default::default()
            },
        }
    }
}

fn unimplemented<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented(
        "the transport floor answers only Status, PutLeaf, PutRecipe and Get",
    ))
}

type OneChunk = futures::stream::Iter<std::iter::Once<Result<GetResponse, Status>>>;

#[tonic::async_trait]
impl Deriva for Floor {
    async fn put_leaf(
        &self,
        _: Request<PutLeafRequest>,
    ) -> Result<Response<PutLeafResponse>, Status> {
        Ok(Response::new(PutLeafResponse {
            addr: self.addr.clone(),
        }))
    }

    async fn put_leaf_stream(
        &self,
        _: Request<Streaming<PutLeafStreamRequest>>,
    ) -> Result<Response<PutLeafResponse>, Status> {
        unimplemented()
    }

    async fn put_recipe(
        &self,
        _: Request<PutRecipeRequest>,
    ) -> Result<Response<PutRecipeResponse>, Status> {
        Ok(Response::new(PutRecipeResponse {
            addr: self.addr.clone(),
        }))
    }

    type GetStream = OneChunk;

    async fn get(&self, _: Request<GetRequest>) -> Result<Response<Self::GetStream>, Status> {
        let message = GetResponse {
            chunk: self.chunk.clone(),
        };
        Ok(Response::new(futures::stream::iter(std::iter::once(Ok(
            message,
        )))))
    }

    async fn resolve(
        &self,
        _: Request<ResolveRequest>,
    ) -> Result<Response<ResolveResponse>, Status> {
        unimplemented()
    }

    async fn invalidate(
        &self,
        _: Request<InvalidateRequest>,
    ) -> Result<Response<InvalidateResponse>, Status> {
        unimplemented()
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(self.status.clone()))
    }

    async fn verify(&self, _: Request<VerifyRequest>) -> Result<Response<VerifyResponse>, Status> {
        unimplemented()
    }

    async fn explain(
        &self,
        _: Request<ExplainRequest>,
    ) -> Result<Response<ExplainResponse>, Status> {
        unimplemented()
    }

    async fn cascade_invalidate(
        &self,
        _: Request<CascadeInvalidateRequest>,
    ) -> Result<Response<CascadeInvalidateResponse>, Status> {
        unimplemented()
    }

    async fn garbage_collect(&self, _: Request<GcRequest>) -> Result<Response<GcResponse>, Status> {
        unimplemented()
    }

    async fn pin(&self, _: Request<PinRequest>) -> Result<Response<PinResponse>, Status> {
        unimplemented()
    }

    async fn unpin(&self, _: Request<UnpinRequest>) -> Result<Response<UnpinResponse>, Status> {
        unimplemented()
    }

    async fn list_pins(
        &self,
        _: Request<ListPinsRequest>,
    ) -> Result<Response<ListPinsResponse>, Status> {
        unimplemented()
    }

    async fn cluster_status(
        &self,
        _: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        unimplemented()
    }

    async fn provenance(
        &self,
        _: Request<deriva_server::proto::ProvenanceRequest>,
    ) -> Result<Response<deriva_server::proto::ProvenanceResponse>, Status> {
        unimplemented()
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let size = usize::try_from(args.size)?;
    // As deriva-server builds its runtime: multi-thread, one worker per core.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(args.listen, Floor::new(size)))
}

async fn serve(listen: SocketAddr, floor: Floor) -> Result<(), Box<dyn std::error::Error>> {
    // deriva-server's settings with its default flags, taken from its own defaults so the two
    // stay in step.
    let config = deriva_server::Config::default();
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let bound = listener.local_addr()?;
    // deriva-server's accept loop sets TCP_NODELAY on every connection too.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut builder = tonic::transport::Server::builder()
        .http2_max_header_list_size(deriva_server::server::MAX_HEADER_LIST_BYTES)
        .max_concurrent_streams(Some(config.max_streams_per_connection))
        .http2_keepalive_interval(Some(config.keepalive))
        .http2_keepalive_timeout(Some(deriva_server::config::KEEPALIVE_TIMEOUT));
    if let Some(timeout) = config.request_timeout {
        builder = builder.timeout(timeout);
    }
    let service = DerivaServer::new(floor).max_decoding_message_size(config.max_message_bytes);
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "http://{bound}")?;
    stdout.flush()?;
    drop(stdout);
    builder
        .add_service(service)
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}
