//! A server of the same proto that answers every call at once: the ceiling any
//! unary gRPC service reaches on this machine with this client. Design 6
//! measures the real service as a share of it, in the same run.

// Handlers answer `tonic::Status` by value: that is tonic's API.
#![allow(clippy::result_large_err)]

use account_service::proto::account::v1 as pb;
use account_service::proto::account::v1::account_service_server::{
    AccountService, AccountServiceServer,
};
use account_service::proto::account::v1::admin_service_server::{AdminService, AdminServiceServer};
use account_service::proto::events;
use futures_util::StreamExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tonic::{Request, Response, Status, Streaming};

#[derive(Clone, Default)]
pub struct Echo {
    sequence: Arc<AtomicU64>,
}

impl Echo {
    fn next(&self) -> u64 {
        self.sequence.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn ok(&self) -> pb::CommandReply {
        pb::CommandReply {
            result: pb::Result::Ok as i32,
            sequence: self.next(),
            ..Default::default()
        }
    }
}

#[tonic::async_trait]
impl AccountService for Echo {
    async fn reserve(
        &self,
        _r: Request<pb::ReserveRequest>,
    ) -> Result<Response<pb::ReserveReply>, Status> {
        Ok(Response::new(pb::ReserveReply {
            result: pb::Result::Ok as i32,
            sequence: self.next(),
            available: "0".into(),
            reserved: "0".into(),
            ..Default::default()
        }))
    }

    async fn unreserve(
        &self,
        _r: Request<pb::UnreserveRequest>,
    ) -> Result<Response<pb::UnreserveReply>, Status> {
        Ok(Response::new(pb::UnreserveReply {
            result: pb::Result::Ok as i32,
            sequence: self.next(),
            released: "0".into(),
            ..Default::default()
        }))
    }

    async fn get_account(
        &self,
        r: Request<pb::GetAccountRequest>,
    ) -> Result<Response<pb::Account>, Status> {
        Ok(Response::new(pb::Account {
            account_id: r.get_ref().account_id,
            status: pb::AccountStatus::Active as i32,
            base_currency: "USD".into(),
            ..Default::default()
        }))
    }

    async fn get_reservation(
        &self,
        r: Request<pb::GetReservationRequest>,
    ) -> Result<Response<pb::Reservation>, Status> {
        Ok(Response::new(pb::Reservation {
            account_id: r.get_ref().account_id,
            order_id: r.get_ref().order_id.clone(),
            ..Default::default()
        }))
    }

    async fn reserve_batch(
        &self,
        r: Request<pb::ReserveBatchRequest>,
    ) -> Result<Response<pb::ReserveBatchReply>, Status> {
        let replies = r
            .into_inner()
            .requests
            .into_iter()
            .map(|q| self.reserved(q))
            .collect();
        Ok(Response::new(pb::ReserveBatchReply { replies }))
    }

    async fn unreserve_batch(
        &self,
        r: Request<pb::UnreserveBatchRequest>,
    ) -> Result<Response<pb::UnreserveBatchReply>, Status> {
        let replies = r
            .into_inner()
            .requests
            .into_iter()
            .map(|q| self.unreserved(q))
            .collect();
        Ok(Response::new(pb::UnreserveBatchReply { replies }))
    }

    type ReserveStreamStream = Replies<pb::ReserveReply>;

    async fn reserve_stream(
        &self,
        r: Request<Streaming<pb::ReserveRequest>>,
    ) -> Result<Response<Self::ReserveStreamStream>, Status> {
        let echo = self.clone();
        let replies = r.into_inner().map(move |q| q.map(|q| echo.reserved(q)));
        Ok(Response::new(Box::pin(replies)))
    }

    type UnreserveStreamStream = Replies<pb::UnreserveReply>;

    async fn unreserve_stream(
        &self,
        r: Request<Streaming<pb::UnreserveRequest>>,
    ) -> Result<Response<Self::UnreserveStreamStream>, Status> {
        let echo = self.clone();
        let replies = r.into_inner().map(move |q| q.map(|q| echo.unreserved(q)));
        Ok(Response::new(Box::pin(replies)))
    }
}

type Replies<R> = std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<R, Status>> + Send>>;

impl Echo {
    fn reserved(&self, q: pb::ReserveRequest) -> pb::ReserveReply {
        pb::ReserveReply {
            result: pb::Result::Ok as i32,
            sequence: self.next(),
            available: "0".into(),
            reserved: "0".into(),
            request_id: q.request_id,
            ..Default::default()
        }
    }

    fn unreserved(&self, q: pb::UnreserveRequest) -> pb::UnreserveReply {
        pb::UnreserveReply {
            result: pb::Result::Ok as i32,
            sequence: self.next(),
            released: "0".into(),
            request_id: q.request_id,
            ..Default::default()
        }
    }
}

#[tonic::async_trait]
impl AdminService for Echo {
    async fn open_account(
        &self,
        _r: Request<pb::OpenAccountRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        Ok(Response::new(self.ok()))
    }
    async fn set_account_status(
        &self,
        _r: Request<pb::SetAccountStatusRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        Ok(Response::new(self.ok()))
    }
    async fn deposit(
        &self,
        _r: Request<events::DepositEvent>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        Ok(Response::new(self.ok()))
    }
    async fn withdraw(
        &self,
        _r: Request<events::WithdrawEvent>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        Ok(Response::new(self.ok()))
    }
    async fn apply_fill(
        &self,
        _r: Request<events::FillEvent>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        Ok(Response::new(self.ok()))
    }
    async fn cluster_status(
        &self,
        _r: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusReply>, Status> {
        Ok(Response::new(pb::ClusterStatusReply {
            role: "SINGLE".into(),
            ..Default::default()
        }))
    }
    async fn add_replica(
        &self,
        _r: Request<pb::AddReplicaRequest>,
    ) -> Result<Response<pb::ClusterStatusReply>, Status> {
        Err(Status::failed_precondition(
            "the echo server has no replicas",
        ))
    }
    async fn remove_replica(
        &self,
        _r: Request<pb::RemoveReplicaRequest>,
    ) -> Result<Response<pb::ClusterStatusReply>, Status> {
        Err(Status::failed_precondition(
            "the echo server has no replicas",
        ))
    }
}

/// Serves until the process ends, with the service's own server settings.
pub async fn serve(listen: std::net::SocketAddr) -> Result<(), tonic::transport::Error> {
    let echo = Echo::default();
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        // The service's HTTP/2 windows: the same ceiling.
        .initial_stream_window_size(Some(account_service::server::STREAM_WINDOW_BYTES))
        .initial_connection_window_size(Some(account_service::server::CONNECTION_WINDOW_BYTES))
        .add_service(AccountServiceServer::new(echo.clone()))
        .add_service(AdminServiceServer::new(echo))
        .serve(listen)
        .await
}
