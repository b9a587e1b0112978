//! Group commit of a worker process's bookkeeping. Every operation this process runs at once
//! records its claim, its task starts and its task ends; done one by one, each is a statement
//! and a commit, and the store spends most of its time on those rather than on the rows. So
//! they go through one [`Recorder`]: a request is written at once when the store is free, and
//! requests that arrive while earlier ones are being written are written together next, in one
//! [`Store::record_progress`] (on PostgreSQL one transaction, a statement for each kind). Under
//! no load nothing waits; under load the batches grow by themselves. Each caller still gets
//! exactly the answer its own call would have had, and only once it is committed.

use std::sync::Arc;

use hefring_store::{
    NamedClaim, OperationRecord, Progress, Store, StoreError, TaskFinish, TaskStart,
};
use tokio::sync::{mpsc, oneshot, Semaphore};

/// How many batches may be in the store at once: one being written while the next gathers.
/// (The distributed queue benchmark at concurrency 128 drained 5,100-6,000 operations/s with
/// 1, 2, 3 or 4: within its run-to-run spread.)
const IN_FLIGHT: usize = 2;

/// The most requests written together (PostgreSQL's bound values are arrays, so this only
/// bounds one transaction's length).
const MOST: usize = 512;

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

enum Request {
    Finish(TaskFinish, Reply<()>),
    Claim(NamedClaim, Reply<Option<OperationRecord>>),
    Start(TaskStart, Reply<()>),
}

/// Records claims, task starts and task ends of this process's operation runs, batched.
pub(crate) struct Recorder {
    requests: mpsc::UnboundedSender<Request>,
}

impl Recorder {
    /// Starts recording into `store`; claims are restricted to `queues` (empty: any). Stops
    /// when the recorder is dropped.
    pub fn start(store: Arc<dyn Store>, queues: Vec<String>) -> Recorder {
        let (requests, received) = mpsc::unbounded_channel();
        tokio::spawn(record(store, queues, received));
        Recorder { requests }
    }

    pub async fn claim(&self, claim: NamedClaim) -> Result<Option<OperationRecord>, StoreError> {
        self.ask(|reply| Request::Claim(claim, reply)).await
    }

    pub async fn start_task(&self, start: TaskStart) -> Result<(), StoreError> {
        self.ask(|reply| Request::Start(start, reply)).await
    }

    pub async fn finish_task(&self, finish: TaskFinish) -> Result<(), StoreError> {
        self.ask(|reply| Request::Finish(finish, reply)).await
    }

    async fn ask<T>(&self, request: impl FnOnce(Reply<T>) -> Request) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.requests.send(request(reply)).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

fn stopped() -> StoreError {
    StoreError::Corrupt("the progress recorder stopped".into())
}

/// Takes a slot, waits for a request, adds every request already waiting, and writes them
/// (the slot is given back once written). While both slots are taken, requests pile up into
/// the next batch.
async fn record(
    store: Arc<dyn Store>,
    queues: Vec<String>,
    mut received: mpsc::UnboundedReceiver<Request>,
) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = received.recv().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MOST {
            match received.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        let (store, queues) = (store.clone(), queues.clone());
        tokio::spawn(async move {
            write(&*store, queues, batch).await;
            drop(slot);
        });
    }
}

async fn write(store: &dyn Store, queues: Vec<String>, batch: Vec<Request>) {
    let mut progress = Progress {
        queues,
        ..Progress::default()
    };
    let (mut finished, mut claimed, mut started) = (Vec::new(), Vec::new(), Vec::new());
    for request in batch {
        match request {
            Request::Finish(finish, reply) => {
                progress.finishes.push(finish);
                finished.push(reply);
            }
            Request::Claim(claim, reply) => {
                progress.claims.push(claim);
                claimed.push(reply);
            }
            Request::Start(start, reply) => {
                progress.starts.push(start);
                started.push(reply);
            }
        }
    }
    let made = store.record_progress(&progress).await;
    // A caller that went away (its run was dropped at shutdown) no longer needs its answer.
    for (reply, result) in finished.into_iter().zip(made.finishes) {
        let _ = reply.send(result);
    }
    for (reply, result) in claimed.into_iter().zip(made.claims) {
        let _ = reply.send(result);
    }
    for (reply, result) in started.into_iter().zip(made.starts) {
        let _ = reply.send(result);
    }
}
