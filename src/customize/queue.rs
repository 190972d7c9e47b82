//! Outputs written while the appliance works: each image whose edits are done is handed to a writer
//! thread, which produces its output while the main thread (the only one that may use the libguestfs
//! handle) edits the next image. One write is in flight at a time: the disk is the limit, and two
//! outputs written at once would only compete for it and for the page cache. A job waiting its turn
//! holds no memory, only a reference to an overlay already on disk.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::{Scope, ScopedJoinHandle};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::support::cleanup;

/// Jobs handed to one writer thread, and their results in the order the jobs were submitted.
pub struct Queue<'scope, J, R> {
    jobs: Option<mpsc::Sender<J>>,
    done: mpsc::Receiver<R>,
    worker: ScopedJoinHandle<'scope, ()>,
    submitted: usize,
}

impl<'scope, J: Send + 'scope, R: Send + 'scope> Queue<'scope, J, R> {
    /// Starts the writer thread, which runs `work` on each job in turn.
    pub fn start<'env>(
        scope: &'scope Scope<'scope, 'env>,
        mut work: impl FnMut(J) -> R + Send + 'scope,
    ) -> Result<Self> {
        let (jobs, todo) = mpsc::channel::<J>();
        let (results, done) = mpsc::channel::<R>();
        let worker = std::thread::Builder::new()
            .name("output writer".into())
            .spawn_scoped(scope, move || {
                for job in todo {
                    if results.send(work(job)).is_err() {
                        break;
                    }
                }
            })
            .context("starting the thread that writes the outputs")?;
        Ok(Queue { jobs: Some(jobs), done, worker, submitted: 0 })
    }

    /// Queues a job; never blocks, so the appliance goes on with the next image at once.
    pub fn submit(&mut self, job: J) {
        let jobs = self.jobs.as_ref().expect("jobs are submitted before finish");
        // The writer only stops early by panicking, which `finish` passes on.
        if jobs.send(job).is_ok() {
            self.submitted += 1;
        }
    }

    /// Waits for every job's result, in the order submitted. While it waits, an interrupt parks
    /// this thread as any blocking call's failure would (see [`cleanup::checkpoint`]).
    pub fn finish(mut self) -> Vec<R> {
        drop(self.jobs.take());
        let mut out = Vec::with_capacity(self.submitted);
        while out.len() < self.submitted {
            match self.done.recv_timeout(Duration::from_millis(100)) {
                Ok(result) => out.push(result),
                Err(RecvTimeoutError::Timeout) => cleanup::checkpoint(),
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        if let Err(panic) = self.worker.join() {
            std::panic::resume_unwind(panic);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn results_come_in_order_and_a_failed_job_fails_alone() {
        let results = std::thread::scope(|scope| {
            let mut queue =
                Queue::start(scope, |n: u32| if n == 2 { Err(format!("job {n} failed")) } else { Ok(n * 10) }).unwrap();
            (1..=4).for_each(|n| queue.submit(n));
            queue.finish()
        });
        assert_eq!(results, vec![Ok(10), Err("job 2 failed".to_string()), Ok(30), Ok(40)]);
    }

    #[test]
    fn one_job_runs_at_a_time_and_the_submitter_never_waits() {
        let running = Arc::new(Mutex::new((0u32, 0u32)));
        let (gate, opened) = mpsc::channel::<()>();
        let seen = Arc::clone(&running);
        let results = std::thread::scope(|scope| {
            let mut queue = Queue::start(scope, move |n: u32| {
                let _ = opened.recv();
                let mut r = seen.lock().unwrap();
                r.0 += 1;
                r.1 = r.1.max(r.0);
                drop(r);
                seen.lock().unwrap().0 -= 1;
                n
            })
            .unwrap();
            // All three are queued while the writer is held on the first: submitting does not block.
            (1..=3).for_each(|n| queue.submit(n));
            (0..3).for_each(|_| gate.send(()).unwrap());
            queue.finish()
        });
        assert_eq!(results, vec![1, 2, 3]);
        assert_eq!(running.lock().unwrap().1, 1, "at most one write in flight");
    }

    #[test]
    fn no_jobs_no_results() {
        let results: Vec<u8> = std::thread::scope(|scope| Queue::start(scope, |n: u8| n).unwrap().finish());
        assert!(results.is_empty());
    }
}
