//! Waking the callers, off the writer thread. A reply leaves through its
//! oneshot, and each send may wake a handler's task: an atomic and, when the
//! runtime's workers sleep, a futex syscall to unpark one. Serialised on the
//! writer, those wakes cost every request a few hundred nanoseconds of the
//! one thread that journals. With several replies to send, the writer hands
//! the whole synced batch to this thread instead (one channel send, one wake
//! at most) and goes on with the next batch. A batch of one or two replies is
//! still sent inline: there the hand-off would only add a hop.
//!
//! Only replies whose records are durable (or, in `--durability async`, that
//! may leave) are ever handed over: the writer calls this where it released
//! them before.

use super::Reply;
use crossbeam_channel::{Receiver, Sender};
use std::thread::JoinHandle;
use tokio::sync::oneshot;

pub type Held = Vec<(oneshot::Sender<Reply>, Reply)>;

/// Fewest replies a batch must hold to be handed to the reply thread.
const HANDOFF_MIN: usize = 3;
/// Batches waiting for the reply thread; a writer ahead of it waits.
const BATCHES_IN_FLIGHT: usize = 8;

/// The writer's side of the reply thread.
pub struct Releaser {
    batches: Option<Sender<Held>>,
    recycled: Receiver<Held>,
    thread: Option<JoinHandle<()>>,
    capacity: usize,
}

impl Releaser {
    /// `capacity`: replies a batch holds at most (the buffers are reused).
    pub fn start(capacity: usize) -> Releaser {
        let (tx, rx) = crossbeam_channel::bounded::<Held>(BATCHES_IN_FLIGHT);
        let (recycle_tx, recycled) = crossbeam_channel::bounded::<Held>(BATCHES_IN_FLIGHT + 1);
        let thread = std::thread::Builder::new()
            .name("engine-reply".into())
            .spawn(move || {
                for mut held in rx {
                    send_all(&mut held);
                    let _ = recycle_tx.try_send(held);
                }
            });
        match thread {
            Ok(thread) => Releaser {
                batches: Some(tx),
                recycled,
                thread: Some(thread),
                capacity,
            },
            // No thread: every batch is sent inline.
            Err(e) => {
                tracing::warn!(error = %e, "no reply thread: replies are sent by the writer");
                Releaser {
                    batches: None,
                    recycled,
                    thread: None,
                    capacity,
                }
            }
        }
    }

    /// Sends every held reply (a caller that gave up is not an error),
    /// leaving `held` empty.
    pub fn release(&self, held: &mut Held) {
        match &self.batches {
            Some(tx) if held.len() >= HANDOFF_MIN => {
                let empty = self
                    .recycled
                    .try_recv()
                    .unwrap_or_else(|_| Vec::with_capacity(self.capacity));
                let batch = std::mem::replace(held, empty);
                if let Err(e) = tx.send(batch) {
                    // The thread is gone (it cannot panic: sends do not).
                    send_all(&mut e.into_inner());
                }
            }
            _ => send_all(held),
        }
    }
}

fn send_all(held: &mut Held) {
    for (tx, reply) in held.drain(..) {
        let _ = tx.send(reply);
    }
}

impl Drop for Releaser {
    fn drop(&mut self) {
        // Closing the channel: the thread sends what it holds, then ends.
        self.batches = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(n: u64) -> (Held, Vec<oneshot::Receiver<Reply>>) {
        (0..n)
            .map(|i| {
                let (tx, rx) = oneshot::channel();
                let reply = Reply::Digest {
                    sequence: i,
                    digest: i,
                };
                ((tx, reply), rx)
            })
            .unzip()
    }

    fn sequence(rx: oneshot::Receiver<Reply>) -> u64 {
        match rx.blocking_recv().expect("a reply") {
            Reply::Digest { sequence, .. } => sequence,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_reply_reaches_its_caller_small_batches_inline_large_ones_handed_off() {
        let releaser = Releaser::start(16);
        for n in [1, 2, 3, 16, 0, 5] {
            let (mut batch, receivers) = held(n);
            releaser.release(&mut batch);
            assert!(batch.is_empty());
            let got: Vec<u64> = receivers.into_iter().map(sequence).collect();
            assert_eq!(got, (0..n).collect::<Vec<_>>());
        }
    }

    #[test]
    fn a_caller_that_gave_up_does_not_stop_the_others() {
        let releaser = Releaser::start(8);
        let (mut batch, mut receivers) = held(8);
        drop(receivers.remove(3));
        releaser.release(&mut batch);
        assert_eq!(receivers.into_iter().map(sequence).count(), 7);
    }

    #[test]
    fn dropping_the_releaser_sends_what_it_was_handed() {
        let releaser = Releaser::start(64);
        let mut all = Vec::new();
        for _ in 0..20 {
            let (mut batch, receivers) = held(64);
            releaser.release(&mut batch);
            all.extend(receivers);
        }
        drop(releaser);
        for mut rx in all {
            assert!(rx.try_recv().is_ok(), "sent before the drop returned");
        }
    }
}
