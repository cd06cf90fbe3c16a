//! [`ObjectOutputs`]: the shared output tier in the object store, at `outputs/<recipe hex>`.
//!
//! An output has no address of its own to check against, so each object is the BLAKE3 hash of
//! the output (32 bytes) followed by the output: a read whose bytes do not match their hash is
//! [`DerivaError::Corrupted`], never data.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use deriva_core::error::Result;
use deriva_core::store::OutputStore;
use deriva_core::{CAddr, DerivaError};

use crate::objects::Objects;

const HASH_LEN: usize = 32;

/// Computed outputs in the object store.
#[derive(Debug, Clone)]
pub struct ObjectOutputs {
    objects: Arc<Objects>,
}

impl ObjectOutputs {
    pub(crate) fn new(objects: Arc<Objects>) -> Self {
        Self { objects }
    }
}

#[async_trait]
impl OutputStore for ObjectOutputs {
    async fn get(&self, recipe: CAddr) -> Result<Option<Bytes>> {
        let Some(object) = self.objects.get(&self.objects.output_key(&recipe)).await? else {
            return Ok(None);
        };
        let damaged = |detail: String| DerivaError::Corrupted {
            addr: recipe,
            detail: format!("the stored output in {}: {detail}", self.objects.name()),
        };
        if object.len() < HASH_LEN {
            return Err(damaged(format!(
                "{} bytes, shorter than its header",
                object.len()
            )));
        }
        let output = object.slice(HASH_LEN..);
        if blake3::hash(&output).as_bytes()[..] != object[..HASH_LEN] {
            return Err(damaged("the bytes do not match their hash".into()));
        }
        Ok(Some(output))
    }

    async fn put(&self, recipe: CAddr, output: Bytes) -> Result<()> {
        let mut object = BytesMut::with_capacity(HASH_LEN + output.len());
        object.extend_from_slice(blake3::hash(&output).as_bytes());
        object.extend_from_slice(&output);
        self.objects
            .overwrite(&self.objects.output_key(&recipe), object.freeze())
            .await
    }

    async fn delete(&self, recipe: CAddr) -> Result<()> {
        self.objects.delete(&self.objects.output_key(&recipe)).await
    }

    async fn contains(&self, recipe: CAddr) -> Result<bool> {
        let key = self.objects.output_key(&recipe);
        Ok(self.objects.size(&key).await?.is_some())
    }

    async fn list(&self) -> Result<Vec<CAddr>> {
        self.objects.list_addrs("outputs").await
    }
}
