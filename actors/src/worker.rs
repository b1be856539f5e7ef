//! A dedicated OS thread that owns blocking compute (a model) and takes jobs from a crossbeam
//! channel. Model work never runs on a tokio worker. A panic on the thread is caught and reported
//! once through `on_panic`, and the thread ends; its owner turns that into an actor failure.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::thread::JoinHandle;

use crossbeam_channel::{unbounded, Sender};

/// The sending end of a worker thread. Dropping it lets the thread finish its queue and exit.
pub struct Worker<J> {
    tx: Option<Sender<J>>,
    handle: Option<JoinHandle<()>>,
}

impl<J: Send + 'static> Worker<J> {
    /// Starts a thread named `name` that runs `run(&mut state, job)` for each job.
    pub fn spawn<S, R, P>(
        name: &str,
        mut state: S,
        mut run: R,
        on_panic: P,
    ) -> std::io::Result<Self>
    where
        S: Send + 'static,
        R: FnMut(&mut S, J) + Send + 'static,
        P: FnOnce(String) + Send + 'static,
    {
        let (tx, rx) = unbounded::<J>();
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                for job in rx {
                    if let Err(panic) = catch_unwind(AssertUnwindSafe(|| run(&mut state, job))) {
                        on_panic(panic_message(panic.as_ref()));
                        return;
                    }
                }
            })?;
        Ok(Self {
            tx: Some(tx),
            handle: Some(handle),
        })
    }

    /// Queues a job; false if the thread has ended.
    pub fn send(&self, job: J) -> bool {
        self.tx.as_ref().is_some_and(|tx| tx.send(job).is_ok())
    }

    /// Another sending end of the thread's queue (`None` once stopped).
    pub fn sender(&self) -> Option<Sender<J>> {
        self.tx.clone()
    }

    /// Closes the queue: the thread finishes the jobs already queued and exits. Returns its
    /// handle, for a caller that waits for it (once; `None` after).
    pub fn stop(&mut self) -> Option<JoinHandle<()>> {
        self.tx = None;
        self.handle.take()
    }

    /// Whether the thread is still running.
    pub fn is_alive(&self) -> bool {
        self.handle.as_ref().is_some_and(|h| !h.is_finished())
    }
}

/// The text of a panic payload.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic with a non-string payload".into())
}
