//! Drivers: how the sidecar makes the app load and unload models, chosen by
//! `spec.driver.kind`.
//!
//! ```text
//!  policy engine ── Output::Unload ──► Driver::unload ─┬─ Sdk:  command on the session's stream
//!                                                      │        (GET /v1/sessions/{id}/commands);
//!                                                      │        the app answers POST /v1/unloaded
//!                                                      └─ Http: POST {url}/models/{name}/unload
//!  acquire ── Action::Load ──► Driver::load ───────────┬─ Sdk:  the app loads, reports /v1/loaded
//!                                                      └─ Http: POST {url}/models/{name}/load
//! ```
//!
//! Server drivers (`KServeV2`, `Ollama`, `Vllm`) also *observe*: on the tick the shell asks the
//! server what it holds ([`Driver::observe`]) and the core reconciles its ledger with that
//! (`decide/server.rs`), and unloads are proven on the server's process tree
//! (`measure/tree.rs`), not on its 200.

pub mod http;
pub mod kserve;
pub mod ollama;
pub mod sdk;
pub mod vllm;

use std::collections::BTreeMap;

use futures::future::BoxFuture;
use modelpool_policy::{SessionId, UnloadReason};

use crate::measure::Sizes;

/// Why a driver call failed.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The app's URL is not usable.
    #[error("driver url {url:?} is not supported: {reason}")]
    BadUrl {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The call did not get an answer.
    #[error("failed to call {url}: {reason}")]
    Call {
        /// The URL called.
        url: String,
        /// Why.
        reason: String,
    },
    /// The app answered with an error.
    #[error("{url} answered {status}: {body}")]
    Status {
        /// The URL called.
        url: String,
        /// Its status.
        status: u16,
        /// Its body (truncated).
        body: String,
    },
    /// The session to command is gone.
    #[error("session {0} is gone")]
    SessionGone(u64),
}

/// What a load request led to.
#[derive(Debug, Clone, PartialEq)]
pub enum LoadOutcome {
    /// The app itself loads (Sdk): answer the acquire with `load`.
    AppLoads,
    /// The driver loaded it (Http); the app's own measurement, if it gave one.
    Loaded {
        /// What the app says the model holds.
        reported: Sizes,
        /// How long the call took, seconds.
        seconds: f64,
    },
}

/// What an unload request led to.
#[derive(Debug, Clone, PartialEq)]
pub enum UnloadOutcome {
    /// A command is queued for the app (Sdk); it will report `/v1/unloaded`.
    Queued {
        /// The command id.
        command: u64,
    },
    /// The driver unloaded it (Http).
    Done,
}

/// What a model server says it holds, by model name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServerView {
    /// Every model the server lists (loaded or not).
    pub models: BTreeMap<String, ServerModel>,
}

/// One model as its server lists it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServerModel {
    /// Loaded and serving (holding its memory).
    pub loaded: bool,
    /// The server's own words on its state (`UNAVAILABLE: …`, `sleeping (level 1)`).
    pub reason: Option<String>,
    /// What the server itself says the model holds (Ollama's `size_vram`), if it says.
    pub reported: Sizes,
}

impl ServerView {
    /// Whether `model` is loaded.
    pub fn loaded(&self, model: &str) -> bool {
        self.models.get(model).is_some_and(|m| m.loaded)
    }
}

/// A way to make the app load and unload.
pub trait Driver: Send + Sync + 'static {
    /// `Sdk` or `Http`.
    fn kind(&self) -> &'static str;

    /// Loads `model` in `holder`'s process (or says the app will).
    fn load(
        &self,
        holder: SessionId,
        model: &str,
    ) -> BoxFuture<'static, Result<LoadOutcome, DriverError>>;

    /// Unloads generation `generation` of `model` from `holder`'s process (or queues the
    /// command for that instance).
    fn unload(
        &self,
        holder: SessionId,
        model: &str,
        generation: u64,
        reason: UnloadReason,
    ) -> BoxFuture<'static, Result<UnloadOutcome, DriverError>>;

    /// Whether the sidecar itself performs loads (and so answers acquires with `use`).
    fn loads_itself(&self) -> bool;

    /// Whether the driver observes a model server (`KServeV2`, `Ollama`, `Vllm`).
    fn observes(&self) -> bool {
        false
    }

    /// Server drivers: whether one server holds every model (its process gone: everything
    /// it held is gone), rather than one server per model (`Vllm`).
    fn single_server(&self) -> bool {
        true
    }

    /// Server drivers: what the server holds now. `None`: the driver does not observe.
    fn observe(&self) -> Option<BoxFuture<'static, Result<ServerView, DriverError>>> {
        None
    }

    /// Server drivers: the port the server listens on (to find its process when no command
    /// line match is given).
    fn server_port(&self) -> Option<u16> {
        None
    }
}
