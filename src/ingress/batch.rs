//! The high-rate path of design 4.1: `ReserveBatch`, `UnreserveBatch`,
//! `ReserveStream`, `UnreserveStream`.
//!
//! Every item is its own request with its own key and its own reply, exactly
//! as if sent alone, except that a malformed item is answered
//! `RESULT_INVALID_ARGUMENT` naming `requests[i].field` (nothing journaled for
//! it) instead of failing the call. A batch, or whatever a stream has ready,
//! is **one** queue entry: one wake-up of the writer, one group commit.
//!
//! Streams keep at most [`STREAM_CHUNKS_IN_FLIGHT`] queue entries in the
//! engine; what arrives meanwhile gathers into one pending chunk, so items
//! sent one by one still reach the writer in chunks as large as a commit
//! takes. They keep at most [`STREAM_IN_FLIGHT_MAX`] items between
//! reading a request and sending its reply, and the replies wait in a bounded channel:
//! a client that stops reading stops the service reading its requests
//! (HTTP/2 flow control), never an unbounded buffer. An item the engine has
//! no room for is answered `RESULT_RESOURCE_EXHAUSTED` (nothing journaled).

// Refusals are `tonic::Status` by value: that is tonic's API.
#![allow(clippy::result_large_err)]

use super::grpc::submit_status;
use super::validate::{self, FieldError};
use crate::domain::{Command, Reserve};
use crate::engine::{codec, CommandReply, EngineHandle, Reply, RequestKind, SubmitError, Want};
use crate::proto::account::v1 as pb;
use crate::wire::convert;
use futures_util::stream::{FuturesOrdered, StreamExt};
use std::future::Future;
use tonic::Status;

/// Most requests in one batch call (design 4.1).
pub const BATCH_ITEMS_MAX: usize = 8_192;
/// Most requests in one `all_or_nothing` batch: one journal record.
pub const BASKET_ITEMS_MAX: usize = codec::BASKET_ITEMS_MAX;
/// Most stream items read but not yet answered, per stream.
pub const STREAM_IN_FLIGHT_MAX: usize = 4_096;
/// Most stream items taken into one queue entry.
pub const STREAM_CHUNK_MAX: usize = 1_024;
/// Queue entries of one stream in the engine at once. While they are, the
/// stream's next requests gather into one pending chunk, sent when one
/// comes back: a stream whose items arrive one by one still reaches the
/// writer in chunks as large as a commit takes, not as one entry (one
/// wake-up, one reply) per item.
pub const STREAM_CHUNKS_IN_FLIGHT: usize = 2;
/// Replies of a stream waiting for the client to read them.
const STREAM_REPLIES_BUFFERED: usize = 1_024;

/// A request type of the batch and stream RPCs.
pub trait Item: Send + 'static {
    type Reply: Send + 'static;

    fn request_id(&self) -> &str;
    /// The command, or the malformed field. `now_ms`, `window_ms`: see
    /// [`validate::reserve`].
    fn command(&self, now_ms: i64, window_ms: i64) -> Result<Command, FieldError>;
    /// The reply of an item the engine answered.
    fn reply(&self, reply: &CommandReply) -> Self::Reply;
    /// The reply of an item the engine never saw.
    fn refused(&self, result: pb::Result, message: String) -> Self::Reply;
}

impl Item for pb::ReserveRequest {
    type Reply = pb::ReserveReply;

    fn request_id(&self) -> &str {
        &self.request_id
    }

    fn command(&self, now_ms: i64, window_ms: i64) -> Result<Command, FieldError> {
        validate::reserve(self, now_ms, window_ms).map(Command::Reserve)
    }

    fn reply(&self, reply: &CommandReply) -> pb::ReserveReply {
        reserve_reply(&self.request_id, reply)
    }

    fn refused(&self, result: pb::Result, message: String) -> pb::ReserveReply {
        pb::ReserveReply {
            result: result as i32,
            message,
            request_id: self.request_id.clone(),
            ..pb::ReserveReply::default()
        }
    }
}

impl Item for pb::UnreserveRequest {
    type Reply = pb::UnreserveReply;

    fn request_id(&self) -> &str {
        &self.request_id
    }

    fn command(&self, _now_ms: i64, _window_ms: i64) -> Result<Command, FieldError> {
        validate::unreserve(self).map(Command::Unreserve)
    }

    fn reply(&self, reply: &CommandReply) -> pb::UnreserveReply {
        unreserve_reply(&self.request_id, reply)
    }

    fn refused(&self, result: pb::Result, message: String) -> pb::UnreserveReply {
        pb::UnreserveReply {
            result: result as i32,
            message,
            request_id: self.request_id.clone(),
            ..pb::UnreserveReply::default()
        }
    }
}

pub fn reserve_reply(request_id: &str, reply: &CommandReply) -> pb::ReserveReply {
    let o = &reply.outcome;
    pb::ReserveReply {
        result: convert::result(o.result) as i32,
        replayed: o.replayed,
        sequence: o.sequence,
        reservation: reply.reservation.as_ref().map(convert::reservation),
        available: o.available.to_string(),
        reserved: o.reserved.to_string(),
        message: convert::message(o),
        request_id: request_id.to_owned(),
    }
}

pub fn unreserve_reply(request_id: &str, reply: &CommandReply) -> pb::UnreserveReply {
    let o = &reply.outcome;
    pb::UnreserveReply {
        result: convert::result(o.result) as i32,
        replayed: o.replayed,
        sequence: o.sequence,
        released: o.released.to_string(),
        reservation: reply.reservation.as_ref().map(convert::reservation),
        available: o.available.to_string(),
        reserved: o.reserved.to_string(),
        message: convert::message(o),
        request_id: request_id.to_owned(),
    }
}

/// The size rule of a batch call: 1..=`max` requests.
pub fn check_size(len: usize, max: usize) -> Result<(), Status> {
    if (1..=max).contains(&len) {
        return Ok(());
    }
    Err(Status::invalid_argument(format!(
        "requests: a batch holds 1 to {max} requests, this one {len}"
    )))
}

/// Items validated: the commands of the well-formed ones, and for each item
/// either its command's index or its refusal message.
struct Validated {
    commands: Vec<Command>,
    slots: Vec<Result<usize, String>>,
}

/// How a malformed item's field is named: `requests[i].field` in a batch
/// call, the bare field on a stream (each stream message is one request).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    Batch,
    Stream,
}

fn validate_all<T: Item>(items: &[T], now_ms: i64, window_ms: i64, naming: Naming) -> Validated {
    let mut commands = Vec::with_capacity(items.len());
    let slots = items
        .iter()
        .enumerate()
        .map(|(i, item)| match item.command(now_ms, window_ms) {
            Ok(command) => {
                commands.push(command);
                Ok(commands.len() - 1)
            }
            Err(e) if naming == Naming::Batch => Err(format!("requests[{i}].{e}")),
            Err(e) => Err(e.to_string()),
        })
        .collect();
    Validated { commands, slots }
}

/// Submits a batch (not all-or-nothing); the future answers every item, in
/// order (`Err` only if the engine stops meanwhile). An engine that refuses
/// the entry (full queue, not serving) gives the items back with the reason.
#[allow(clippy::type_complexity)]
pub fn submit_batch<T: Item>(
    engine: &EngineHandle,
    items: Vec<T>,
    now_ms: i64,
    window_ms: i64,
    want: Want,
    naming: Naming,
) -> Result<
    impl Future<Output = Result<Vec<T::Reply>, SubmitError>> + Send + 'static,
    (SubmitError, Vec<T>),
> {
    let Validated { commands, slots } = validate_all(&items, now_ms, window_ms, naming);
    let rx = if commands.is_empty() {
        None
    } else {
        match engine.submit(RequestKind::Batch(commands, want)) {
            Ok(rx) => Some(rx),
            Err(e) => return Err((e, items)),
        }
    };
    Ok(async move {
        let replies = match rx {
            None => Vec::new(),
            Some(rx) => match crate::engine::settle(rx.await) {
                Ok(Reply::Batch(replies)) => replies,
                Ok(_) => unreachable!("a batch is answered with a batch"),
                Err(e) => return Err(e),
            },
        };
        Ok(merge(&items, &slots, &replies))
    })
}

/// One reply per item: the engine's for a well-formed item, the refusal for
/// a malformed one.
fn merge<T: Item>(
    items: &[T],
    slots: &[Result<usize, String>],
    replies: &[CommandReply],
) -> Vec<T::Reply> {
    items
        .iter()
        .zip(slots)
        .map(|(item, slot)| match slot {
            Ok(i) => item.reply(&replies[*i]),
            Err(message) => item.refused(pb::Result::InvalidArgument, message.clone()),
        })
        .collect()
}

/// An all-or-nothing batch of Reserves: one journal record. A malformed item,
/// or a request_id used twice, fails the basket before anything is
/// journaled: that item is `RESULT_INVALID_ARGUMENT`, the others
/// `RESULT_LINKED_REQUEST_FAILED`, and the caller may fix it and resend
/// with the same keys.
pub async fn basket(
    engine: &EngineHandle,
    items: Vec<pb::ReserveRequest>,
    now_ms: i64,
    window_ms: i64,
) -> Result<Vec<pb::ReserveReply>, Status> {
    let Validated {
        commands,
        mut slots,
    } = validate_all(&items, now_ms, window_ms, Naming::Batch);
    let mut seen = std::collections::HashMap::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        if let Some(first) = seen.insert(item.request_id.as_str(), i) {
            if slots[i].is_ok() {
                slots[i] = Err(format!(
                    "requests[{i}].request_id: repeats requests[{first}].request_id in one all_or_nothing batch"
                ));
            }
        }
    }
    if slots.iter().any(|s| s.is_err()) {
        let linked = "not applied: another item of the all-or-nothing batch is malformed";
        return Ok(items
            .iter()
            .zip(slots)
            .map(|(item, slot)| match slot {
                Ok(_) => item.refused(pb::Result::LinkedRequestFailed, linked.into()),
                Err(message) => item.refused(pb::Result::InvalidArgument, message),
            })
            .collect());
    }
    let reserves: Vec<Reserve> = commands
        .into_iter()
        .map(|c| match c {
            Command::Reserve(r) => r,
            _ => unreachable!("validated as Reserves"),
        })
        .collect();
    let rx = engine
        .submit(RequestKind::Basket(reserves))
        .map_err(submit_status)?;
    match crate::engine::settle(rx.await) {
        Ok(Reply::Batch(replies)) => Ok(items
            .iter()
            .zip(&replies)
            .map(|(item, reply)| item.reply(reply))
            .collect()),
        Ok(_) => unreachable!("a basket is answered with a batch"),
        Err(e) => Err(submit_status(e)),
    }
}

/// Where a stream's replies go, in request order.
pub type Replies<R> = tokio::sync::mpsc::Sender<Result<R, Status>>;

/// A stream's answer to one chunk: its item count and its replies.
type Answer<R> = std::pin::Pin<Box<dyn Future<Output = (usize, Result<Vec<R>, Status>)> + Send>>;

/// Serves one stream. Requests are read as they arrive (HTTP/2 keeps no
/// backlog of small frames, which it would count as abuse and close the
/// connection for) into a pending chunk; the chunk (at most
/// [`STREAM_CHUNK_MAX`] of its items) goes to the engine as one queue entry
/// whenever fewer than [`STREAM_CHUNKS_IN_FLIGHT`] of the stream's entries
/// are there. At most [`STREAM_IN_FLIGHT_MAX`] items are
/// read and not yet answered; beyond that the stream stops reading (HTTP/2
/// flow control). Each reply is sent once its item is durable, in order.
/// `admit` is asked once per chunk (rate limits); `Err(message)` answers the
/// chunk `RESULT_RESOURCE_EXHAUSTED`. Ends when the client closes its side
/// and every reply is sent, or the client goes away.
pub async fn serve_stream<T, S, A>(
    engine: EngineHandle,
    inbound: S,
    replies: Replies<T::Reply>,
    window_ms: i64,
    want: Want,
    admit: A,
) where
    T: Item,
    S: futures_util::Stream<Item = Result<T, Status>> + Unpin + Send,
    A: Fn(usize) -> Result<(), String> + Send,
{
    let mut inbound = inbound.ready_chunks(STREAM_CHUNK_MAX);
    let mut in_flight: FuturesOrdered<Answer<T::Reply>> = FuturesOrdered::new();
    // Items in `in_flight` and in `pending`: read and not yet answered.
    let mut unanswered = 0usize;
    let mut pending: Vec<T> = Vec::new();
    let mut reading = true;
    loop {
        if !pending.is_empty() && in_flight.len() < STREAM_CHUNKS_IN_FLIGHT {
            let items = if pending.len() <= STREAM_CHUNK_MAX {
                std::mem::take(&mut pending)
            } else {
                pending.drain(..STREAM_CHUNK_MAX).collect()
            };
            in_flight.push_back(answer_chunk(&engine, items, window_ms, want, &admit));
        }
        tokio::select! {
            // Replies first: they free room for more requests.
            biased;
            Some((count, answered)) = in_flight.next(), if !in_flight.is_empty() => {
                unanswered -= count;
                match answered {
                    Ok(answered) => {
                        for reply in answered {
                            if replies.send(Ok(reply)).await.is_err() {
                                return; // the client went away
                            }
                        }
                    }
                    Err(status) => {
                        let _ = replies.send(Err(status)).await;
                        return;
                    }
                }
            }
            chunk = inbound.next(), if reading && unanswered < STREAM_IN_FLIGHT_MAX => {
                let Some(chunk) = chunk else {
                    reading = false;
                    continue;
                };
                for item in chunk {
                    match item {
                        Ok(item) => {
                            pending.push(item);
                            unanswered += 1;
                        }
                        // A transport error ends the reading; what was read is answered.
                        Err(_) => {
                            reading = false;
                            break;
                        }
                    }
                }
            }
            else => return,
        }
    }
}

/// Sends one chunk of a stream to the engine (or answers it at once when
/// refused: rate limit, full queue).
fn answer_chunk<T: Item>(
    engine: &EngineHandle,
    items: Vec<T>,
    window_ms: i64,
    want: Want,
    admit: &impl Fn(usize) -> Result<(), String>,
) -> Answer<T::Reply> {
    let count = items.len();
    let refuse = |items: &[T], message: String| -> Answer<T::Reply> {
        let refused = items
            .iter()
            .map(|item| item.refused(pb::Result::ResourceExhausted, message.clone()))
            .collect();
        Box::pin(std::future::ready((count, Ok(refused))))
    };
    if let Err(message) = admit(count) {
        return refuse(&items, message);
    }
    let now = crate::engine::now_ms();
    match submit_batch(engine, items, now, window_ms, want, Naming::Stream) {
        Ok(answered) => Box::pin(async move { (count, answered.await.map_err(submit_status)) }),
        Err((SubmitError::Overloaded, items)) => refuse(
            &items,
            "the service's queue is full: not applied, nothing journaled; resend with the same request_id".into(),
        ),
        Err((e, _)) => Box::pin(std::future::ready((count, Err(submit_status(e))))),
    }
}

/// The channel a stream's replies wait in, and the response stream that
/// drains it.
pub fn reply_channel<R: Send + 'static>() -> (
    Replies<R>,
    impl futures_util::Stream<Item = Result<R, Status>> + Send + 'static,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(STREAM_REPLIES_BUFFERED);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|reply| (reply, rx))
    });
    (tx, stream)
}
