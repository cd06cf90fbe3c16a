//! [`RpcMethod`]: the RPCs of `service Deriva`, each with its gRPC path, its `method` metric
//! label and its OpenTelemetry span name. Adding an RPC to the service means one variant here
//! (and one row in [`RpcMethod::ALL`]) plus its handler in `service.rs`.

use deriva_util::token::Scope;

/// The gRPC service name of `service Deriva`.
pub const SERVICE: &str = "deriva.Deriva";

/// One RPC of `service Deriva`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RpcMethod {
    /// `PutLeaf`: store bytes, get their address.
    PutLeaf,
    /// `PutRecipe`: store a recipe, get its address.
    PutRecipe,
    /// `Get`: the bytes of an address, streamed.
    Get,
    /// `Resolve`: the recipe stored at an address.
    Resolve,
    /// `Invalidate`: evict an address (and its dependents) from the cache.
    Invalidate,
    /// `Status`: counts and rates.
    Status,
    /// `Verify`: compute a recipe twice and compare.
    Verify,
    /// `Explain`: the span tree of a recent request.
    Explain,
    /// `PutLeafStream`: store bytes sent as a stream of chunks, get their address.
    PutLeafStream,
    /// `CascadeInvalidate`: evict an address and its dependents, with a policy.
    CascadeInvalidate,
    /// `GarbageCollect`: remove what no pin reaches.
    GarbageCollect,
    /// `Pin`: make an address a root of what is kept.
    Pin,
    /// `Unpin`: stop keeping an address for its own sake.
    Unpin,
    /// `ListPins`: the pinned addresses.
    ListPins,
    /// `ClusterStatus`: the nodes serving the store.
    ClusterStatus,
    /// `Provenance`: where the bytes of an address came from.
    Provenance,
}

impl RpcMethod {
    /// Every method, in the order of [`RpcMethod::index`].
    pub const ALL: [RpcMethod; 16] = [
        Self::PutLeaf,
        Self::PutRecipe,
        Self::Get,
        Self::Resolve,
        Self::Invalidate,
        Self::Status,
        Self::Verify,
        Self::Explain,
        Self::PutLeafStream,
        Self::CascadeInvalidate,
        Self::GarbageCollect,
        Self::Pin,
        Self::Unpin,
        Self::ListPins,
        Self::ClusterStatus,
        Self::Provenance,
    ];

    /// The token scope the method needs under `--auth-tokens`.
    pub const fn scope(self) -> Scope {
        match self {
            Self::Get
            | Self::Resolve
            | Self::Status
            | Self::Explain
            | Self::ClusterStatus
            | Self::Provenance => Scope::Read,
            Self::PutLeaf
            | Self::PutLeafStream
            | Self::PutRecipe
            | Self::Invalidate
            | Self::CascadeInvalidate
            | Self::Verify => Scope::Write,
            Self::GarbageCollect | Self::Pin | Self::Unpin | Self::ListPins => Scope::Admin,
        }
    }

    /// How many methods there are: the length of per-method arrays.
    pub const COUNT: usize = Self::ALL.len();

    /// The method's name in the `.proto` and on the wire: `PutLeaf`.
    pub const fn grpc_name(self) -> &'static str {
        match self {
            Self::PutLeaf => "PutLeaf",
            Self::PutRecipe => "PutRecipe",
            Self::Get => "Get",
            Self::Resolve => "Resolve",
            Self::Invalidate => "Invalidate",
            Self::Status => "Status",
            Self::Verify => "Verify",
            Self::Explain => "Explain",
            Self::PutLeafStream => "PutLeafStream",
            Self::CascadeInvalidate => "CascadeInvalidate",
            Self::GarbageCollect => "GarbageCollect",
            Self::Pin => "Pin",
            Self::Unpin => "Unpin",
            Self::ListPins => "ListPins",
            Self::ClusterStatus => "ClusterStatus",
            Self::Provenance => "Provenance",
        }
    }

    /// The `method` label of the `deriva_rpc_*` metrics: `put_leaf`.
    pub const fn label(self) -> &'static str {
        match self {
            Self::PutLeaf => "put_leaf",
            Self::PutRecipe => "put_recipe",
            Self::Get => "get",
            Self::Resolve => "resolve",
            Self::Invalidate => "invalidate",
            Self::Status => "status",
            Self::Verify => "verify",
            Self::Explain => "explain",
            Self::PutLeafStream => "put_leaf_stream",
            Self::CascadeInvalidate => "cascade_invalidate",
            Self::GarbageCollect => "garbage_collect",
            Self::Pin => "pin",
            Self::Unpin => "unpin",
            Self::ListPins => "list_pins",
            Self::ClusterStatus => "cluster_status",
            Self::Provenance => "provenance",
        }
    }

    /// The OpenTelemetry name of the server span: `deriva.Deriva/PutLeaf`.
    pub const fn span_name(self) -> &'static str {
        match self {
            Self::PutLeaf => "deriva.Deriva/PutLeaf",
            Self::PutRecipe => "deriva.Deriva/PutRecipe",
            Self::Get => "deriva.Deriva/Get",
            Self::Resolve => "deriva.Deriva/Resolve",
            Self::Invalidate => "deriva.Deriva/Invalidate",
            Self::Status => "deriva.Deriva/Status",
            Self::Verify => "deriva.Deriva/Verify",
            Self::Explain => "deriva.Deriva/Explain",
            Self::PutLeafStream => "deriva.Deriva/PutLeafStream",
            Self::CascadeInvalidate => "deriva.Deriva/CascadeInvalidate",
            Self::GarbageCollect => "deriva.Deriva/GarbageCollect",
            Self::Pin => "deriva.Deriva/Pin",
            Self::Unpin => "deriva.Deriva/Unpin",
            Self::ListPins => "deriva.Deriva/ListPins",
            Self::ClusterStatus => "deriva.Deriva/ClusterStatus",
            Self::Provenance => "deriva.Deriva/Provenance",
        }
    }

    /// Position in [`RpcMethod::ALL`], for per-method arrays.
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The method of a request path, `/deriva.Deriva/Get`; `None` for other services.
    pub fn from_path(path: &str) -> Option<Self> {
        let name = path
            .strip_prefix('/')?
            .strip_prefix(SERVICE)?
            .strip_prefix('/')?;
        Self::ALL.into_iter().find(|m| m.grpc_name() == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_agree_and_paths_parse() {
        for (i, m) in RpcMethod::ALL.into_iter().enumerate() {
            assert_eq!(m.index(), i);
            assert_eq!(m.span_name(), format!("{SERVICE}/{}", m.grpc_name()));
            assert_eq!(
                RpcMethod::from_path(&format!("/{SERVICE}/{}", m.grpc_name())),
                Some(m)
            );
            let snake: String = m
                .grpc_name()
                .chars()
                .enumerate()
                .flat_map(|(j, c)| {
                    let sep = (j > 0 && c.is_ascii_uppercase()).then_some('_');
                    sep.into_iter()
                        .chain(std::iter::once(c.to_ascii_lowercase()))
                })
                .collect();
            assert_eq!(m.label(), snake);
        }
        assert_eq!(RpcMethod::from_path("/grpc.health.v1.Health/Check"), None);
        assert_eq!(RpcMethod::from_path("/deriva.Deriva/Nope"), None);
        assert_eq!(RpcMethod::from_path("/deriva.DerivaX/Get"), None);
    }

    /// Every `rpc` of `deriva.proto` has a variant.
    #[test]
    fn every_rpc_of_the_proto_has_a_variant() {
        let proto = include_str!("../../deriva-proto/proto/deriva.proto");
        let rpcs: Vec<&str> = proto
            .lines()
            .filter_map(|l| l.trim().strip_prefix("rpc "))
            .filter_map(|l| l.split('(').next())
            .map(str::trim)
            .collect();
        let known: Vec<&str> = RpcMethod::ALL.iter().map(|m| m.grpc_name()).collect();
        assert_eq!(rpcs.len(), RpcMethod::COUNT, "{rpcs:?}");
        for rpc in rpcs {
            assert!(known.contains(&rpc), "rpc {rpc} has no RpcMethod variant");
        }
    }
}
