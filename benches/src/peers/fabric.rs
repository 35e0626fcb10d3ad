//! kvfabric's rows: the gRPC path (an in-process node holding blocks in its
//! host tier, one [`Client`] connection per benchmark client, `put_many` /
//! `get_many` of `batch` values), the disk tier called directly (`batch`
//! concurrent puts / gets per client, as the existing disk driver issues
//! them), and the zero-copy local path ([`LocalBatch`]).

use super::workload::{BatchStore, Cell};
use crate::driver::Store;
use crate::driver::disk::DiskStore;
use anyhow::{Context, bail};
use bytes::{Bytes, BytesMut};
use kvfabric::client::{Client, Durability, LocalClient, LocalPut, PutObject};
use std::ops::Range;
use std::path::Path;
use std::sync::Mutex;

/// The zero-copy co-located path: one [`LocalClient`] (Unix socket plus the
/// node's arena mapped read-only) per client; `put_many` copies each value
/// straight into the arena, `get_many_into` copies it out into buffers the
/// client allocated and faulted in before the clock started (as Mooncake's
/// registered buffers are), so a get allocates nothing.
#[derive(Debug)]
pub(crate) struct LocalBatch {
    clients: Vec<LocalClient>,
    /// Per client: the not yet used part of its read buffer.
    read_bufs: Vec<Mutex<BytesMut>>,
    grpc: Client,
    namespace: String,
}

impl LocalBatch {
    /// Connects one local client per client of `cell` to `socket`, and one
    /// gRPC client to `endpoint` (to clear the namespace between cells).
    pub(crate) async fn connect(socket: &Path, endpoint: &str, cell: &Cell, namespace: String) -> anyhow::Result<Self> {
        let mut clients = Vec::with_capacity(cell.clients);
        let mut read_bufs = Vec::with_capacity(cell.clients);
        for _ in 0..cell.clients {
            clients.push(
                LocalClient::connect(socket)
                    .await
                    .with_context(|| format!("connecting to {}", socket.display()))?,
            );
            let n = (cell.per_client * cell.size) as usize;
            let mut b = BytesMut::with_capacity(n);
            b.resize(n, 0); // writes every page now, not in the timed region
            read_bufs.push(Mutex::new(b));
        }
        let grpc = Client::connect(endpoint)
            .await
            .with_context(|| format!("connecting to {endpoint}"))?;
        Ok(LocalBatch {
            clients,
            read_bufs,
            grpc,
            namespace,
        })
    }

    /// Deletes everything this cell wrote.
    pub(crate) async fn clear(&self) -> anyhow::Result<()> {
        self.grpc.clear(&self.namespace).await?;
        Ok(())
    }
}

impl BatchStore for LocalBatch {
    async fn put_batch(&self, cell: &Cell, client: usize, keys: Range<u64>) -> anyhow::Result<()> {
        let names: Vec<Bytes> = keys.clone().map(|k| cell.key(client, k)).collect();
        let puts: Vec<LocalPut<'_>> = names
            .iter()
            .zip(keys)
            .map(|(name, k)| LocalPut::new(name, &cell.payload(client, k).bytes))
            .collect();
        let tiers = self.clients[client]
            .put_many(&self.namespace, &puts, Durability::Memory)
            .await?;
        if tiers.len() != puts.len() {
            bail!("put of {} objects answered {} results", puts.len(), tiers.len());
        }
        Ok(())
    }

    async fn get_batch(&self, cell: &Cell, client: usize, keys: Range<u64>) -> anyhow::Result<Vec<Bytes>> {
        let names: Vec<Bytes> = keys.clone().map(|k| cell.key(client, k)).collect();
        let refs: Vec<&[u8]> = names.iter().map(|n| &n[..]).collect();
        let mut parts: Vec<BytesMut> = {
            let mut buf = self.read_bufs[client].lock().expect("read buffer lock");
            if buf.len() < names.len() * cell.size as usize {
                bail!("client {client} read more values than it put");
            }
            names.iter().map(|_| buf.split_to(cell.size as usize)).collect()
        };
        let mut views: Vec<&mut [u8]> = parts.iter_mut().map(|p| &mut p[..]).collect();
        let got = self.clients[client]
            .get_many_into(&self.namespace, &refs, &mut views)
            .await?;
        keys.zip(got)
            .zip(parts)
            .map(|((k, len), p)| match len {
                Some(n) if n == p.len() => Ok(p.freeze()),
                Some(n) => bail!("key {k} holds {n} bytes, not {}", p.len()),
                None => bail!("key {k} is missing"),
            })
            .collect()
    }
}

/// One gRPC connection per client, all in one namespace.
#[derive(Debug)]
pub(crate) struct GrpcBatch {
    clients: Vec<Client>,
    namespace: String,
}

impl GrpcBatch {
    /// Connects `clients` clients to `endpoint`, using `namespace`.
    pub(crate) async fn connect(endpoint: &str, clients: usize, namespace: String) -> anyhow::Result<GrpcBatch> {
        let mut v = Vec::with_capacity(clients);
        for _ in 0..clients {
            v.push(
                Client::connect(endpoint)
                    .await
                    .with_context(|| format!("connecting to {endpoint}"))?,
            );
        }
        Ok(GrpcBatch { clients: v, namespace })
    }

    /// Deletes everything this cell wrote.
    pub(crate) async fn clear(&self) -> anyhow::Result<()> {
        self.clients[0].clear(&self.namespace).await?;
        Ok(())
    }
}

impl BatchStore for GrpcBatch {
    async fn put_batch(&self, cell: &Cell, client: usize, keys: Range<u64>) -> anyhow::Result<()> {
        let objects: Vec<PutObject> = keys
            .map(|k| PutObject::new(cell.key(client, k), cell.payload(client, k).bytes.clone()))
            .collect();
        let n = objects.len();
        let tiers = self.clients[client]
            .put_many(&self.namespace, objects, Durability::Memory)
            .await?;
        if tiers.len() != n {
            bail!("put of {n} objects answered {} results", tiers.len());
        }
        Ok(())
    }

    async fn get_batch(&self, cell: &Cell, client: usize, keys: Range<u64>) -> anyhow::Result<Vec<Bytes>> {
        let names: Vec<Bytes> = keys.clone().map(|k| cell.key(client, k)).collect();
        let got = self.clients[client].get_many(&self.namespace, names).await?;
        keys.zip(got)
            .map(|(k, o)| o.map(|o| o.value).with_context(|| format!("key {k} is missing")))
            .collect()
    }
}

/// The disk tier, `batch` operations of a client in flight at once.
#[derive(Debug)]
pub(crate) struct DiskBatch(pub(crate) DiskStore);

impl BatchStore for DiskBatch {
    async fn put_batch(&self, cell: &Cell, client: usize, keys: Range<u64>) -> anyhow::Result<()> {
        futures::future::try_join_all(keys.map(|k| self.0.put(client, k, cell.payload(client, k)))).await?;
        Ok(())
    }

    async fn get_batch(&self, _cell: &Cell, client: usize, keys: Range<u64>) -> anyhow::Result<Vec<Bytes>> {
        let got = futures::future::try_join_all(keys.clone().map(|k| self.0.get(client, k))).await?;
        keys.zip(got)
            .map(|(k, v)| v.with_context(|| format!("key {k} is missing")))
            .collect()
    }
}
