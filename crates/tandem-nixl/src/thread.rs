//! [`NixlThread`]: an [`Agent`] on its own OS thread, driven by jobs from async code.
//!
//! NIXL's calls are synchronous and polled; running them on tokio workers would stall every task
//! sharing the worker. The thread runs one job at a time (a READ is posted and polled to
//! completion inside its job) and, between jobs, polls incoming notifications every
//! [`NOTIF_POLL`] when a receiver for them was given.

use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::{Agent, Layout, NixlFailure};

/// How often an idle thread looks for notifications.
const NOTIF_POLL: Duration = Duration::from_millis(2);

type Job = Box<dyn FnOnce(&mut Agent) + Send>;

/// What the agent is, fixed at start: what the handshake advertises.
#[derive(Debug, Clone)]
pub struct AgentInfo {
    pub name: String,
    /// `get_local_md` after the region was registered.
    pub metadata: Vec<u8>,
    pub base_addrs: Vec<u64>,
    pub layout: Layout,
    /// The UCX backend's parameters as NIXL reports them.
    pub backend_params: Vec<(String, String)>,
}

/// A cheap handle to the agent thread; the thread ends when the last handle is dropped.
#[derive(Clone, Debug)]
pub struct NixlThread {
    tx: std_mpsc::Sender<Job>,
    info: Arc<AgentInfo>,
}

impl NixlThread {
    /// Starts the thread with a new agent `name` over a region of `layout`. Notifications
    /// received, as (sender agent, message), go to `notifs` when given.
    pub async fn start(
        name: &str,
        layout: Layout,
        notifs: Option<mpsc::UnboundedSender<(String, String)>>,
    ) -> Result<Self, NixlFailure> {
        crate::check_library()?;
        let (tx, rx) = std_mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = oneshot::channel();
        let name = name.to_string();
        std::thread::Builder::new()
            .name("nixl-agent".into())
            .spawn(move || {
                let started = Agent::new(&name, layout).and_then(|a| {
                    let info = AgentInfo {
                        name: a.name(),
                        metadata: a.local_md()?,
                        base_addrs: a.base_addrs(),
                        layout: a.layout(),
                        backend_params: a.backend_params().to_vec(),
                    };
                    Ok((a, info))
                });
                let mut agent = match started {
                    Ok((a, info)) => {
                        let _ = ready_tx.send(Ok(info));
                        a
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                run(&mut agent, rx, notifs);
            })
            .map_err(|e| NixlFailure::Nixl {
                what: "spawn agent thread",
                error: e.to_string(),
            })?;
        let info = ready_rx.await.map_err(|_| NixlFailure::Stopped)??;
        Ok(NixlThread {
            tx,
            info: Arc::new(info),
        })
    }

    pub fn info(&self) -> &AgentInfo {
        &self.info
    }

    /// Runs `f` on the agent thread and returns its result.
    pub async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Agent) -> T + Send + 'static,
    ) -> Result<T, NixlFailure> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Box::new(move |a| {
                let _ = tx.send(f(a));
            }))
            .map_err(|_| NixlFailure::Stopped)?;
        rx.await.map_err(|_| NixlFailure::Stopped)
    }

    /// Queues `f` without waiting; jobs run in the order queued, so a later [`Self::call`]
    /// sees its effect.
    pub fn submit(&self, f: impl FnOnce(&mut Agent) + Send + 'static) {
        if self.tx.send(Box::new(f)).is_err() {
            tracing::debug!("NIXL agent thread has stopped; job dropped");
        }
    }
}

fn run(
    agent: &mut Agent,
    rx: std_mpsc::Receiver<Job>,
    notifs: Option<mpsc::UnboundedSender<(String, String)>>,
) {
    loop {
        let job = match &notifs {
            None => match rx.recv() {
                Ok(j) => Some(j),
                Err(_) => return,
            },
            Some(_) => match rx.recv_timeout(NOTIF_POLL) {
                Ok(j) => Some(j),
                Err(std_mpsc::RecvTimeoutError::Timeout) => None,
                Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
            },
        };
        if let Some(job) = job {
            job(agent);
        }
        if let Some(out) = &notifs {
            match agent.take_notifs() {
                Ok(list) => {
                    for n in list {
                        if out.send(n).is_err() {
                            return;
                        }
                    }
                }
                Err(e) => tracing::warn!("NIXL notifications: {e}"),
            }
        }
    }
}
