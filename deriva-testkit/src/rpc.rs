//! RPC shorthands on a `DerivaClient`: a Put unwrapped to its address, a Get to its bytes.

use bytes::Bytes;
use deriva_core::CAddr;
use deriva_server::proto::deriva_client::DerivaClient;
use deriva_server::proto::{GetRequest, PutLeafRequest, PutRecipeRequest};
use tonic::transport::Channel;

/// `PutLeaf`, unwrapped: the address.
pub async fn put_leaf(client: &mut DerivaClient<Channel>, data: &[u8]) -> Bytes {
    let req = PutLeafRequest {
        data: Bytes::copy_from_slice(data),
    };
    client.put_leaf(req).await.unwrap().into_inner().addr
}

/// `PutRecipe` of `function/v1`: the address, or the status.
pub async fn try_put_recipe(
    client: &mut DerivaClient<Channel>,
    function: &str,
    inputs: &[&Bytes],
    params: &[(&str, &str)],
) -> Result<Bytes, tonic::Status> {
    let req = PutRecipeRequest {
        function_name: function.to_owned(),
        function_version: "v1".to_owned(),
        inputs: inputs.iter().map(|&i| i.clone()).collect(),
        params: params
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    };
    client.put_recipe(req).await.map(|r| r.into_inner().addr)
}

/// `PutRecipe` of `function/v1`, unwrapped: the address.
pub async fn put_recipe(
    client: &mut DerivaClient<Channel>,
    function: &str,
    inputs: &[&Bytes],
    params: &[(&str, &str)],
) -> Bytes {
    try_put_recipe(client, function, inputs, params)
        .await
        .unwrap()
}

/// Every chunk of a Get, or its status.
pub async fn get_chunks(
    client: &mut DerivaClient<Channel>,
    addr: &Bytes,
) -> Result<Vec<Bytes>, tonic::Status> {
    let req = GetRequest { addr: addr.clone() };
    let mut stream = client.get(req).await?.into_inner();
    let mut chunks = Vec::new();
    while let Some(msg) = stream.message().await? {
        chunks.push(msg.chunk);
    }
    Ok(chunks)
}

/// All the bytes of a Get, or its status.
pub async fn get_all(
    client: &mut DerivaClient<Channel>,
    addr: &Bytes,
) -> Result<Vec<u8>, tonic::Status> {
    Ok(get_chunks(client, addr).await?.concat())
}

/// All the bytes of a Get of `addr`, or its status.
pub async fn get_addr(
    client: &mut DerivaClient<Channel>,
    addr: &CAddr,
) -> Result<Vec<u8>, tonic::Status> {
    get_all(client, &Bytes::copy_from_slice(addr.as_bytes())).await
}
