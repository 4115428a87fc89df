//! A thread of the backend's own, started on first use, that runs the jobs
//! sent to it (in order) until its owner drops it; the drop waits for the
//! jobs already sent. The capture landing threads are these.

use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;

use crate::error::{PipelineError, Result};

pub(super) struct JobThread<J> {
    jobs: Option<Sender<J>>,
    thread: Option<JoinHandle<()>>,
}

impl<J> Default for JobThread<J> {
    fn default() -> Self {
        Self { jobs: None, thread: None }
    }
}

impl<J: Send + 'static> JobThread<J> {
    /// Sends `job`; the first time, starts the thread `name` running
    /// `run` on the jobs.
    pub(super) fn send(&mut self, name: &str, job: J, run: impl FnOnce(Receiver<J>) + Send + 'static) -> Result<()> {
        if self.jobs.is_none() {
            let (tx, rx) = channel();
            let thread = std::thread::Builder::new()
                .name(name.into())
                .spawn(move || run(rx))
                .map_err(|e| PipelineError::Gpu(format!("starting the thread {name}: {e}")))?;
            self.jobs = Some(tx);
            self.thread = Some(thread);
        }
        self.jobs
            .as_ref()
            .expect("started above")
            .send(job)
            .map_err(|_| PipelineError::Gpu(format!("the thread {name} stopped")))
    }
}

impl<J> Drop for JobThread<J> {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
