//! A dedicated OS thread that owns blocking compute (a model) and takes jobs from a crossbeam
//! channel. Model work never runs on a tokio worker. A panic on the thread is caught and reported
//! once through `on_panic`, and the thread ends; its owner turns that into an actor failure.
//!
//! Others may hold a [`JobSender`] and queue jobs straight onto the thread (the scheduler does,
//! so a step reaches the model without a hop through an actor). The thread ends at
//! [`Worker::stop`], after the jobs queued before it, or once every sender is gone.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::thread::JoinHandle;

use crossbeam_channel::{unbounded, Sender};

/// What the thread's queue carries.
enum Envelope<J> {
    Job(J),
    Stop,
}

/// A sending end of a worker thread's queue.
pub struct JobSender<J>(Sender<Envelope<J>>);

impl<J> Clone for JobSender<J> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<J> JobSender<J> {
    /// Queues a job; false if the thread has ended.
    pub fn send(&self, job: J) -> bool {
        self.0.send(Envelope::Job(job)).is_ok()
    }
}

/// A worker thread and its queue.
pub struct Worker<J> {
    tx: JobSender<J>,
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
        let (tx, rx) = unbounded::<Envelope<J>>();
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                for envelope in rx {
                    let Envelope::Job(job) = envelope else {
                        return;
                    };
                    if let Err(panic) = catch_unwind(AssertUnwindSafe(|| run(&mut state, job))) {
                        on_panic(panic_message(panic.as_ref()));
                        return;
                    }
                }
            })?;
        Ok(Self {
            tx: JobSender(tx),
            handle: Some(handle),
        })
    }

    /// Queues a job; false if the thread has ended.
    pub fn send(&self, job: J) -> bool {
        self.tx.send(job)
    }

    /// Another sending end of the thread's queue.
    pub fn sender(&self) -> JobSender<J> {
        self.tx.clone()
    }

    /// Whether the thread is still running.
    pub fn is_alive(&self) -> bool {
        self.handle.as_ref().is_some_and(|h| !h.is_finished())
    }

    /// Tells the thread to end after the jobs already queued, and returns its handle for a
    /// caller that waits for it (once; `None` after).
    pub fn stop(&mut self) -> Option<JoinHandle<()>> {
        let _ = self.tx.0.send(Envelope::Stop);
        self.handle.take()
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
