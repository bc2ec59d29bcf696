//! The gRPC listener's connections, bounded: at most `--max-connections` at
//! once (one more is closed as soon as it is accepted, and counted), and a
//! connection from which nothing at all is read for `--idle-connection-timeout-secs`
//! is closed.
//!
//! A live HTTP/2 client is never idle that long: the server pings every
//! connection that is quiet for 30 s (`KEEPALIVE_INTERVAL`) and the client's
//! acknowledgement is a read. What the timeout closes is a socket that sends
//! nothing (never a preface, never a TLS hello) or a peer gone without a FIN
//! before its HTTP/2 handshake; after the handshake keepalive closes a peer
//! that stops answering. Both keep a flood of idle sockets from holding memory
//! and file descriptors for ever.

use crate::metrics::Metrics;
use futures_util::{Stream, StreamExt};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};
use tonic::transport::server::Connected;

/// Limits on the listener's connections.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub idle_timeout: Duration,
}

/// Wraps the accepted sockets of `incoming`: over the limit, a socket is
/// closed at once; the others close after `idle_timeout` without a byte read.
pub fn guard<S, IO>(
    incoming: S,
    limits: ConnectionLimits,
    metrics: Arc<Metrics>,
) -> impl Stream<Item = io::Result<Guarded<IO>>>
where
    S: Stream<Item = io::Result<IO>>,
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let live = Arc::new(AtomicUsize::new(0));
    let mut last_warning: Option<std::time::Instant> = None;
    incoming.filter_map(move |accepted| {
        let result = match accepted {
            Err(e) => Some(Err(e)),
            Ok(io) => {
                if live.fetch_add(1, Ordering::AcqRel) >= limits.max_connections {
                    live.fetch_sub(1, Ordering::AcqRel);
                    metrics.connections_refused_total.inc();
                    if last_warning.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
                        last_warning = Some(std::time::Instant::now());
                        tracing::warn!(
                            max_connections = limits.max_connections,
                            "gRPC connection refused: at --max-connections (logged once per 10 s)"
                        );
                    }
                    drop(io);
                    None
                } else {
                    metrics.connections.inc();
                    Some(Ok(Guarded {
                        io,
                        idle_timeout: limits.idle_timeout,
                        last_read: Instant::now(),
                        idle: Box::pin(tokio::time::sleep(limits.idle_timeout)),
                        _live: LiveGuard {
                            live: live.clone(),
                            metrics: metrics.clone(),
                        },
                    }))
                }
            }
        };
        std::future::ready(result)
    })
}

struct LiveGuard {
    live: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::AcqRel);
        self.metrics.connections.dec();
    }
}

/// An accepted socket that fails its reads once nothing came for the idle
/// timeout (the server then closes the connection).
pub struct Guarded<IO> {
    io: IO,
    idle_timeout: Duration,
    last_read: Instant,
    idle: Pin<Box<Sleep>>,
    _live: LiveGuard,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Guarded<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    this.last_read = Instant::now();
                }
                Poll::Ready(result)
            }
            Poll::Pending => loop {
                // The timer is moved only when it fires: one reset per idle
                // period, not one per read.
                ready!(this.idle.as_mut().poll(cx));
                let deadline = this.last_read + this.idle_timeout;
                if deadline <= Instant::now() {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "idle connection: nothing read for the idle timeout",
                    )));
                }
                this.idle.as_mut().reset(deadline);
            },
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Guarded<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl<IO: Connected> Connected for Guarded<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}
