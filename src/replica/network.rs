//! openraft's RPCs between replicas, over tonic on the raft port
//! (`proto/raft.proto`): each message is openraft's own, postcard-encoded, and
//! each reply carries openraft's `Result`, so a refusal by the remote raft
//! (a higher vote, a conflict) reaches the local one as it was sent.

use super::{Member, NodeId, TypeConfig};
use crate::proto::account::raft::v1::raft_client::RaftClient;
use crate::proto::account::raft::v1::raft_server;
use crate::proto::account::raft::v1::RaftMessage;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use tonic::transport::Channel;

/// Largest raft message: an AppendEntries of 16 entries of at most
/// [`super::writer::ENTRY_BYTES_MAX`], or a snapshot chunk.
pub const MESSAGE_BYTES_MAX: usize = 72 << 20;

fn encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, postcard::Error> {
    postcard::to_allocvec(value)
}

/// Opens connections to the other replicas (lazily, on first use).
#[derive(Clone, Default)]
pub struct Network;

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> Connection {
        Connection {
            target,
            client: channel(&node.raft_addr).map(|c| {
                RaftClient::new(c)
                    .max_decoding_message_size(MESSAGE_BYTES_MAX)
                    .max_encoding_message_size(MESSAGE_BYTES_MAX)
            }),
        }
    }
}

/// How this process connects to the other replicas' raft ports: TLS and
/// the bearer token, set once at start-up (a process runs one replica).
struct Client {
    tls: Option<tonic::transport::ClientTlsConfig>,
    token: Option<tonic::metadata::AsciiMetadataValue>,
}

static CLIENT: std::sync::OnceLock<Client> = std::sync::OnceLock::new();

/// Sets how this replica reaches the others (before raft starts).
pub fn secure(security: &super::RaftSecurity) -> Result<(), String> {
    let token = security
        .token
        .as_deref()
        .map(|t| format!("Bearer {t}").parse())
        .transpose()
        .map_err(|_| "--raft-token: not a valid header value".to_string())?;
    let client = Client {
        tls: security.client_tls.clone(),
        token,
    };
    CLIENT
        .set(client)
        .map_err(|_| "the raft client is configured once per process".to_string())
}

/// Puts this replica's token on a raft request.
fn authorize<T>(request: &mut tonic::Request<T>) {
    if let Some(token) = CLIENT.get().and_then(|c| c.token.clone()) {
        request.metadata_mut().insert("authorization", token);
    }
}

/// A lazily connected channel to `addr` (`HOST:PORT`), over TLS when the
/// service's gRPC port is.
pub fn channel(addr: &str) -> Result<Channel, String> {
    let tls = CLIENT.get().and_then(|c| c.tls.clone());
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{addr}"))
        .map_err(|e| format!("raft address {addr}: {e}"))?
        .tcp_nodelay(true)
        .connect_timeout(std::time::Duration::from_millis(500));
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| format!("raft address {addr}: TLS: {e}"))?;
    }
    Ok(endpoint.connect_lazy())
}

pub struct Connection {
    target: NodeId,
    client: Result<RaftClient<Channel>, String>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Failure(String);

impl Connection {
    /// Sends `request` with `rpc`, decoding openraft's result from the reply.
    async fn call<Req, Resp, E>(
        &mut self,
        rpc: &'static str,
        request: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, Member, E>>
    where
        Req: serde::Serialize,
        Resp: serde::de::DeserializeOwned,
        E: std::error::Error + serde::de::DeserializeOwned,
    {
        let client = match &mut self.client {
            Ok(c) => c,
            Err(e) => return Err(RPCError::Unreachable(Unreachable::new(&Failure(e.clone())))),
        };
        let payload = encode(request)
            .map_err(|e| RPCError::Network(NetworkError::new(&Failure(e.to_string()))))?;
        let mut request = tonic::Request::new(RaftMessage { payload });
        request.set_timeout(option.hard_ttl());
        authorize(&mut request);
        let reply = match rpc {
            "append" => client.append_entries(request).await,
            "vote" => client.vote(request).await,
            _ => client.install_snapshot(request).await,
        };
        let reply = reply.map_err(|status| {
            let failure = Failure(format!("{rpc} to replica {}: {status}", self.target));
            match status.code() {
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
                    RPCError::Unreachable(Unreachable::new(&failure))
                }
                _ => RPCError::Network(NetworkError::new(&failure)),
            }
        })?;
        let result: Result<Resp, E> = postcard::from_bytes(&reply.into_inner().payload)
            .map_err(|e| RPCError::Network(NetworkError::new(&Failure(e.to_string()))))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        self.call("append", &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Member, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call("snapshot", &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        self.call("vote", &rpc, &option).await
    }
}

/// The raft port's service: hands each message to the local raft.
pub struct RaftService {
    pub raft: openraft::Raft<TypeConfig>,
    pub node_id: NodeId,
    pub me: Member,
    /// `--auth-tokens`: only a caller of role `replica` gets through.
    pub auth: crate::ingress::auth::Auth,
}

impl RaftService {
    fn admit<T>(&self, request: &tonic::Request<T>, rpc: &str) -> Result<(), tonic::Status> {
        self.auth
            .authorize(
                request.metadata(),
                rpc,
                crate::ingress::auth::Access::Replica,
            )
            .map(|_| ())
            .map_err(Into::into)
    }
}

fn decode<T: serde::de::DeserializeOwned>(
    request: tonic::Request<RaftMessage>,
) -> Result<T, tonic::Status> {
    postcard::from_bytes(&request.into_inner().payload)
        .map_err(|e| tonic::Status::invalid_argument(format!("payload: {e}")))
}

fn reply<T: serde::Serialize>(value: &T) -> Result<tonic::Response<RaftMessage>, tonic::Status> {
    let payload = encode(value).map_err(|e| tonic::Status::internal(e.to_string()))?;
    Ok(tonic::Response::new(RaftMessage { payload }))
}

#[tonic::async_trait]
impl raft_server::Raft for RaftService {
    async fn append_entries(
        &self,
        request: tonic::Request<RaftMessage>,
    ) -> Result<tonic::Response<RaftMessage>, tonic::Status> {
        self.admit(&request, "Raft.AppendEntries")?;
        let rpc: AppendEntriesRequest<TypeConfig> = decode(request)?;
        reply(&self.raft.append_entries(rpc).await)
    }

    async fn vote(
        &self,
        request: tonic::Request<RaftMessage>,
    ) -> Result<tonic::Response<RaftMessage>, tonic::Status> {
        self.admit(&request, "Raft.Vote")?;
        let rpc: VoteRequest<NodeId> = decode(request)?;
        reply(&self.raft.vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        request: tonic::Request<RaftMessage>,
    ) -> Result<tonic::Response<RaftMessage>, tonic::Status> {
        self.admit(&request, "Raft.InstallSnapshot")?;
        let rpc: InstallSnapshotRequest<TypeConfig> = decode(request)?;
        reply(&self.raft.install_snapshot(rpc).await)
    }

    async fn hello(
        &self,
        request: tonic::Request<RaftMessage>,
    ) -> Result<tonic::Response<RaftMessage>, tonic::Status> {
        self.admit(&request, "Raft.Hello")?;
        let initialized = self.raft.is_initialized().await.unwrap_or(false);
        reply(&Hello {
            node_id: self.node_id,
            member: self.me.clone(),
            initialized,
        })
    }
}

/// A replica's answer to `Hello`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Hello {
    pub node_id: NodeId,
    pub member: Member,
    /// It belongs to an initialized group (its log holds a membership).
    pub initialized: bool,
}

/// Asks the replica at `raft_addr` who it is: its node id and addresses.
pub async fn hello(raft_addr: &str) -> Result<Hello, String> {
    let mut client = RaftClient::new(channel(raft_addr)?);
    let mut request = tonic::Request::new(RaftMessage::default());
    request.set_timeout(std::time::Duration::from_secs(1));
    authorize(&mut request);
    let reply = client
        .hello(request)
        .await
        .map_err(|s| format!("{raft_addr}: {}", s.message()))?;
    postcard::from_bytes(&reply.into_inner().payload).map_err(|e| e.to_string())
}
