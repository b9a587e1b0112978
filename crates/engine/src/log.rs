//! An operation's log as it is written: lines are buffered and flushed to the store in
//! batches (every 100 ms, and before any status change), so a chatty build does not cost a
//! write per line and the log is always complete up to the last recorded status.

use std::sync::{Arc, Mutex};

use hefring_store::{NewLogLine, Store};

use crate::time::now_ms;

#[derive(Clone)]
pub struct OperationLog {
    store: Arc<dyn Store>,
    operation: String,
    attempt: i64,
    buffer: Arc<Mutex<Vec<NewLogLine>>>,
    task: Arc<Mutex<String>>,
}

impl OperationLog {
    pub fn new(store: Arc<dyn Store>, operation: &str, attempt: i64) -> Self {
        OperationLog {
            store,
            operation: operation.to_string(),
            attempt,
            buffer: Arc::default(),
            task: Arc::new(Mutex::new("-".into())),
        }
    }

    pub fn set_task(&self, task: &str) {
        *self.task.lock().unwrap() = task.to_string();
    }

    pub fn line(&self, stream: &str, text: impl Into<String>) {
        let task = self.task.lock().unwrap().clone();
        let text: String = text.into();
        let mut buffer = self.buffer.lock().unwrap();
        for part in text.split('\n') {
            buffer.push(NewLogLine {
                attempt: self.attempt,
                at: now_ms(),
                task: task.clone(),
                stream: stream.to_string(),
                text: part.to_string(),
            });
        }
    }

    /// A line from Hefring itself (not from a command).
    pub fn info(&self, text: impl Into<String>) {
        self.line("hefring", text);
    }

    pub async fn flush(&self) {
        let lines = std::mem::take(&mut *self.buffer.lock().unwrap());
        if lines.is_empty() {
            return;
        }
        if let Err(e) = self.store.append_logs(&self.operation, &lines).await {
            tracing::warn!(operation = %self.operation, error = %e, "could not write log lines");
        }
    }
}
