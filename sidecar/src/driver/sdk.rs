//! The `Sdk` driver: commands for an app go on its session's command stream, which the SDK
//! long-polls (`GET /v1/sessions/{id}/commands`); the app loads on its own after an acquire
//! answered `load`.
//!
//! A command stays pending until the app answers it with `/v1/unloaded` (or the session ends);
//! a pending command already delivered is delivered again once `redeliver` has passed.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use futures::{FutureExt, future::BoxFuture};
use modelpool_policy::{SessionId, UnloadReason};
use tokio::sync::watch;

use super::{Driver, DriverError, LoadOutcome, UnloadOutcome};
use crate::api::wire::{Command, CommandKind};

#[derive(Debug)]
struct Pending {
    command: Command,
    delivered: Option<Instant>,
}

#[derive(Debug, Default)]
struct Hub {
    next_id: u64,
    queues: BTreeMap<SessionId, Vec<Pending>>,
}

/// The command streams of all sessions.
#[derive(Debug)]
pub struct CommandHub {
    inner: Mutex<Hub>,
    changed: watch::Sender<u64>,
    redeliver: Duration,
}

/// A batch taken for one poll.
#[derive(Debug)]
pub struct Taken {
    /// Commands to send now.
    pub commands: Vec<Command>,
    /// When an already delivered command becomes due again.
    pub next_due: Option<Instant>,
}

impl CommandHub {
    /// A hub that redelivers unanswered commands after `redeliver`.
    pub fn new(redeliver: Duration) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Hub::default()),
            changed: watch::Sender::new(0),
            redeliver,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Hub> {
        // A panic while holding this lock leaves plain data behind; keep serving.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|generation| *generation += 1);
    }

    /// Wakes every long poll (a session closed, shutdown).
    pub fn wake(&self) {
        self.bump();
    }

    /// Subscribes to changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Opens a session's stream.
    pub fn open(&self, session: SessionId) {
        self.lock().queues.entry(session).or_default();
    }

    /// Closes a session's stream; its pending commands are dropped.
    pub fn close(&self, session: SessionId) {
        self.lock().queues.remove(&session);
        self.bump();
    }

    /// Queues `unload` of one instance (model + generation) for a session; an unload of the
    /// same instance already pending keeps its id, one of an earlier instance of the model is
    /// replaced. `None` when the session has no stream.
    pub fn push_unload(
        &self,
        session: SessionId,
        model: &str,
        generation: u64,
        reason: UnloadReason,
    ) -> Option<u64> {
        let mut hub = self.lock();
        let id = hub.next_id + 1;
        let queue = hub.queues.get_mut(&session)?;
        if let Some(existing) = queue
            .iter()
            .find(|p| p.command.model == model && p.command.generation == generation)
        {
            return Some(existing.command.id);
        }
        queue.retain(|p| p.command.model != model);
        queue.push(Pending {
            command: Command {
                id,
                kind: CommandKind::Unload,
                model: model.to_owned(),
                generation,
                reason,
            },
            delivered: None,
        });
        hub.next_id = id;
        drop(hub);
        self.bump();
        Some(id)
    }

    /// The app answered: drop the pending unload of that instance.
    pub fn answered(&self, session: SessionId, model: &str, generation: u64) {
        if let Some(queue) = self.lock().queues.get_mut(&session) {
            queue.retain(|p| !(p.command.model == model && p.command.generation == generation));
        }
    }

    /// Drops pending commands `keep` says are obsolete.
    pub fn retain(&self, session: SessionId, mut keep: impl FnMut(&Command) -> bool) {
        if let Some(queue) = self.lock().queues.get_mut(&session) {
            queue.retain(|p| keep(&p.command));
        }
    }

    /// Takes what is due for a poll: new commands and those delivered more than `redeliver`
    /// ago. `None` when the session has no stream.
    pub fn take(&self, session: SessionId, now: Instant) -> Option<Taken> {
        let redeliver = self.redeliver;
        let mut hub = self.lock();
        let queue = hub.queues.get_mut(&session)?;
        let mut commands = Vec::new();
        let mut next_due: Option<Instant> = None;
        for pending in queue.iter_mut() {
            match pending.delivered {
                Some(at) if now < at + redeliver => {
                    let due = at + redeliver;
                    next_due = Some(next_due.map_or(due, |d| d.min(due)));
                }
                _ => {
                    pending.delivered = Some(now);
                    commands.push(pending.command.clone());
                }
            }
        }
        Some(Taken { commands, next_due })
    }

    /// Pending commands of every session (for state views).
    pub fn pending_all(&self) -> BTreeMap<SessionId, Vec<Command>> {
        self.lock()
            .queues
            .iter()
            .map(|(id, q)| (*id, q.iter().map(|p| p.command.clone()).collect()))
            .collect()
    }

    /// Pending commands of a session (for state views).
    pub fn pending(&self, session: SessionId) -> Vec<Command> {
        self.lock()
            .queues
            .get(&session)
            .map(|q| q.iter().map(|p| p.command.clone()).collect())
            .unwrap_or_default()
    }
}

/// The `Sdk` driver.
#[derive(Debug, Clone)]
pub struct SdkDriver {
    hub: Arc<CommandHub>,
}

impl SdkDriver {
    /// A driver that queues commands on `hub`.
    pub fn new(hub: Arc<CommandHub>) -> Self {
        Self { hub }
    }
}

impl Driver for SdkDriver {
    fn kind(&self) -> &'static str {
        "Sdk"
    }

    fn load(
        &self,
        _holder: SessionId,
        _model: &str,
    ) -> BoxFuture<'static, Result<LoadOutcome, DriverError>> {
        async { Ok(LoadOutcome::AppLoads) }.boxed()
    }

    fn unload(
        &self,
        holder: SessionId,
        model: &str,
        generation: u64,
        reason: UnloadReason,
    ) -> BoxFuture<'static, Result<UnloadOutcome, DriverError>> {
        let result = self
            .hub
            .push_unload(holder, model, generation, reason)
            .map(|command| UnloadOutcome::Queued { command })
            .ok_or(DriverError::SessionGone(holder.0));
        async move { result }.boxed()
    }

    fn loads_itself(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redelivers_unanswered_commands_after_the_interval() {
        let hub = CommandHub::new(Duration::from_secs(5));
        let s = SessionId(1);
        hub.open(s);
        let id = hub
            .push_unload(s, "t2v", 1, UnloadReason::Released)
            .unwrap();
        assert_eq!(
            hub.push_unload(s, "t2v", 1, UnloadReason::Evicted),
            Some(id)
        );
        let t0 = Instant::now();
        let first = hub.take(s, t0).unwrap();
        assert_eq!(first.commands.len(), 1);
        let again = hub.take(s, t0 + Duration::from_secs(1)).unwrap();
        assert!(again.commands.is_empty());
        assert_eq!(again.next_due, Some(t0 + Duration::from_secs(5)));
        let later = hub.take(s, t0 + Duration::from_secs(6)).unwrap();
        assert_eq!(later.commands[0].id, id);
        hub.answered(s, "t2v", 1);
        assert!(
            hub.take(s, t0 + Duration::from_secs(20))
                .unwrap()
                .commands
                .is_empty()
        );
        hub.close(s);
        assert!(hub.take(s, t0).is_none());
        assert!(
            hub.push_unload(s, "t2v", 1, UnloadReason::Released)
                .is_none()
        );
    }

    #[test]
    fn a_command_names_its_instance_and_a_later_one_replaces_it() {
        let hub = CommandHub::new(Duration::from_secs(5));
        let s = SessionId(1);
        hub.open(s);
        let first = hub
            .push_unload(s, "t2v", 1, UnloadReason::Released)
            .unwrap();
        let second = hub.push_unload(s, "t2v", 2, UnloadReason::Evicted).unwrap();
        assert_ne!(first, second);
        let pending = hub.pending(s);
        assert_eq!(pending.len(), 1);
        assert_eq!((pending[0].id, pending[0].generation), (second, 2));
        // An answer for the earlier instance leaves the later command pending.
        hub.answered(s, "t2v", 1);
        assert_eq!(hub.pending(s).len(), 1);
        hub.answered(s, "t2v", 2);
        assert!(hub.pending(s).is_empty());
    }
}
