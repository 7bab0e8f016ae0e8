//! The `Vllm` driver: vLLM's sleep mode, one vLLM server per model (`driver.servers`), each
//! started with `--enable-sleep-mode` and `VLLM_SERVER_DEV_MODE=1` (the endpoints exist only
//! then).
//!
//! ```text
//!  load    POST {server}/wake_up                 the weights come back (from host RAM or disk)
//!  unload  POST {server}/sleep?level=1|2         1: weights offloaded to host RAM, 2: dropped
//!  observe GET  {server}/is_sleeping  {"is_sleeping": bool}   awake = loaded, per model
//! ```
//!
//! A model whose server does not answer is listed as not loaded (with why); the pool's server
//! is down only when none answers. A restarted vLLM server starts awake: the poll sees it
//! loaded behind the sidecar's back and adopts it (or puts it to sleep if it does not fit).

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use futures::{FutureExt, future::BoxFuture, future::join_all};
use modelpool_policy::{SessionId, UnloadReason};
use serde::Deserialize;

use super::{
    Driver, DriverError, LoadOutcome, ServerModel, ServerView, UnloadOutcome, http::Endpoint,
};
use crate::measure::Sizes;

/// How the driver's view words a model whose server is asleep (`ServerModel::reason`).
pub const SLEEPING: &str = "sleeping";

/// The `Vllm` driver.
#[derive(Debug, Clone)]
pub struct VllmDriver {
    servers: BTreeMap<String, Endpoint>,
    level: u8,
}

#[derive(Debug, Deserialize)]
struct Sleeping {
    is_sleeping: bool,
}

impl VllmDriver {
    /// A driver for `servers` (model → its server's URL), unloading at sleep `level`.
    pub fn new(
        servers: &BTreeMap<String, String>,
        level: u8,
        timeout: Duration,
    ) -> Result<Self, DriverError> {
        if !(1..=2).contains(&level) {
            return Err(DriverError::BadUrl {
                url: format!("sleepLevel {level}"),
                reason: "vLLM's sleep levels are 1 and 2".to_owned(),
            });
        }
        let servers = servers
            .iter()
            .map(|(model, url)| Ok((model.clone(), Endpoint::new(url, timeout)?)))
            .collect::<Result<_, DriverError>>()?;
        Ok(Self { servers, level })
    }

    fn server(&self, model: &str) -> Result<Endpoint, DriverError> {
        self.servers
            .get(model)
            .cloned()
            .ok_or_else(|| DriverError::BadUrl {
                url: String::new(),
                reason: format!("driver.servers names no vLLM server for model {model:?}"),
            })
    }

    async fn sleeping(endpoint: &Endpoint) -> Result<bool, DriverError> {
        let path = "/is_sleeping";
        let answer = endpoint.send(hyper::Method::GET, path, None).await?;
        if answer.status != 200 {
            return Err(DriverError::Status {
                url: endpoint.url(path),
                status: answer.status,
                body: answer.text(),
            });
        }
        let sleeping: Sleeping =
            serde_json::from_slice(&answer.body).map_err(|e| DriverError::Call {
                url: endpoint.url(path),
                reason: format!("not {{\"is_sleeping\": bool}}: {e}: {}", answer.text()),
            })?;
        Ok(sleeping.is_sleeping)
    }
}

impl Driver for VllmDriver {
    fn kind(&self) -> &'static str {
        "Vllm"
    }

    fn load(
        &self,
        _holder: SessionId,
        model: &str,
    ) -> BoxFuture<'static, Result<LoadOutcome, DriverError>> {
        let server = self.server(model);
        async move {
            let endpoint = server?;
            let started = Instant::now();
            endpoint.post_ok("/wake_up", None).await?;
            Ok(LoadOutcome::Loaded {
                reported: Sizes::default(),
                seconds: started.elapsed().as_secs_f64(),
            })
        }
        .boxed()
    }

    fn unload(
        &self,
        _holder: SessionId,
        model: &str,
        _generation: u64,
        _reason: UnloadReason,
    ) -> BoxFuture<'static, Result<UnloadOutcome, DriverError>> {
        let server = self.server(model);
        let path = format!("/sleep?level={}", self.level);
        async move {
            let endpoint = server?;
            endpoint.post_ok(&path, None).await?;
            Ok(UnloadOutcome::Done)
        }
        .boxed()
    }

    fn loads_itself(&self) -> bool {
        true
    }

    fn observes(&self) -> bool {
        true
    }

    fn single_server(&self) -> bool {
        false
    }

    fn observe(&self) -> Option<BoxFuture<'static, Result<ServerView, DriverError>>> {
        let servers = self.servers.clone();
        Some(
            async move {
                let answers = join_all(servers.iter().map(|(model, endpoint)| async move {
                    (model.clone(), Self::sleeping(endpoint).await)
                }))
                .await;
                let mut view = ServerView::default();
                let mut errors = Vec::new();
                for (model, answer) in answers {
                    let entry = match answer {
                        Ok(sleeping) => ServerModel {
                            loaded: !sleeping,
                            reason: sleeping.then(|| SLEEPING.to_owned()),
                            reported: Sizes::default(),
                        },
                        Err(error) => {
                            errors.push(error.to_string());
                            ServerModel {
                                loaded: false,
                                reason: Some(format!("its server does not answer: {error}")),
                                reported: Sizes::default(),
                            }
                        }
                    };
                    view.models.insert(model, entry);
                }
                if !view.models.is_empty() && errors.len() == view.models.len() {
                    return Err(DriverError::Call {
                        url: "every vLLM server".to_owned(),
                        reason: errors.join("; "),
                    });
                }
                Ok(view)
            }
            .boxed(),
        )
    }

    fn server_port(&self) -> Option<u16> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_and_levels() {
        let servers = BTreeMap::from([("a".to_owned(), "http://127.0.0.1:8001".to_owned())]);
        let driver = VllmDriver::new(&servers, 2, Duration::from_secs(1)).unwrap();
        assert!(driver.server("a").is_ok());
        let error = driver.server("b").unwrap_err().to_string();
        assert!(error.contains("no vLLM server for model \"b\""), "{error}");
        assert!(VllmDriver::new(&servers, 3, Duration::from_secs(1)).is_err());
        let bad = BTreeMap::from([("a".to_owned(), "https://x".to_owned())]);
        assert!(VllmDriver::new(&bad, 1, Duration::from_secs(1)).is_err());
    }
}
