//! `modelpool-sidecar`: the per-pod authority over models. It admits loads within the pool's
//! ceilings (through the policy engine, `modelpool-policy`), drives the app to unload, measures
//! what the device, the pod and each app process really hold, and exports it.
//!
//! ```text
//!  app (SDK) ──UDS/TCP /v1──► api ──► shell::Shared ──(one lock)──► decide::Core ──► Engine
//!                                        │   ▲ ticker: measure → Core::tick (sessions, reclaims)
//!                                        ▼   │
//!          driver::{Sdk, Http, KServeV2, Ollama, Vllm}  measure::{nvml, cuda, cgroup, proc, tree}
//!  model server ◄── poll (server drivers) ──► decide::server reconcile
//!  Prometheus ──► /metrics (metrics.rs)   pool file ──(mtime poll)──► pool::load → update
//! ```

pub mod api;
pub mod args;
pub mod client;
pub mod cluster;
pub mod decide;
pub mod driver;
pub mod exposition;
pub mod learned;
pub mod measure;
pub mod metrics;
pub mod pool;
pub mod proxy;
pub mod shell;
pub mod status;
pub mod telemetry;
pub mod validate;

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use modelpool_crds::v1alpha1::DriverKind;
use tokio::{sync::watch, task::JoinHandle};

use crate::{
    api::listen,
    args::ServeArgs,
    driver::{
        Driver, DriverError,
        http::HttpDriver,
        kserve::KServeDriver,
        ollama::OllamaDriver,
        sdk::{CommandHub, SdkDriver},
        vllm::VllmDriver,
    },
    measure::SystemMeter,
    metrics::{Metrics, MetricsError},
    pool::{PoolError, PoolFile},
    shell::{Settings, Shared},
};

/// Why the sidecar could not run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Invalid flags.
    #[error(transparent)]
    Args(#[from] args::ArgsError),
    /// The pool file is unusable at startup.
    #[error("failed to load the pool: {0}")]
    Pool(#[from] PoolError),
    /// The driver cannot be built.
    #[error("failed to set up the driver: {0}")]
    Driver(#[from] DriverError),
    /// Metrics registration failed.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// A listener failed.
    #[error(transparent)]
    Listen(#[from] api::http::ListenError),
    /// Cluster mode could not start.
    #[error(transparent)]
    Cluster(#[from] cluster::ClusterError),
    /// The serving proxy could not start.
    #[error("failed to start the serving proxy: {0}")]
    Proxy(#[from] proxy::SetupError),
    /// Signal handlers could not be installed.
    #[error("failed to install signal handlers: {0}")]
    Signal(#[source] std::io::Error),
}

fn make_driver(
    kind: DriverKind,
    pool: &pool::PoolInfo,
    hub: &Arc<CommandHub>,
    timeout: Duration,
) -> Result<Arc<dyn Driver>, DriverError> {
    let url = pool.driver_url.as_deref();
    Ok(match kind {
        DriverKind::Sdk => Arc::new(SdkDriver::new(Arc::clone(hub))),
        DriverKind::Http => Arc::new(HttpDriver::new(url.unwrap_or_default(), timeout)?),
        DriverKind::KServeV2 => Arc::new(KServeDriver::new(url.unwrap_or_default(), timeout)?),
        DriverKind::Ollama => Arc::new(OllamaDriver::new(url.unwrap_or_default(), timeout)?),
        DriverKind::Vllm => Arc::new(VllmDriver::new(
            &pool.driver_servers,
            pool.sleep_level.unwrap_or(2),
            timeout,
        )?),
    })
}

/// Runs the sidecar until SIGTERM/SIGINT, then shuts down gracefully.
pub async fn run(args: ServeArgs) -> Result<(), Error> {
    args.validate()?;
    // Listening from the start: a stop signal during start-up is acted on once serving.
    let mut signals = StopSignals::new().map_err(Error::Signal)?;
    let ServeArgs {
        pool: pool_path,
        learned_file,
        socket,
        socket_group,
        listen,
        api_token,
        metrics_listen,
        max_connections,
        metrics_max_connections,
        max_sessions,
        header_timeout_ms,
        body_timeout_ms,
        log_format: _,
        log_level: _,
        heartbeat_ms: _,
        reclaim_timeout_ms: _,
        tick_ms: _,
        pool_poll_ms,
        shutdown_grace_ms,
        driver_timeout_ms,
        no_nvml,
        cuda_fallback,
        pool_name,
        pod_name,
        pod_namespace,
        report_interval_ms,
        proxy_listen,
        upstream,
        proxy_body_limit,
        proxy_max_queue,
        proxy_model_concurrency,
        proxy_max_connections,
        proxy_threads,
        driver_url: default_driver_url,
        process_match: default_process_match,
    } = args.clone();
    let settings = Settings {
        heartbeat: args.heartbeat(),
        tick: args.tick(),
        reclaim_timeout: args.reclaim_timeout(),
        // Standalone only: in cluster mode the pool file is not ours to write beside.
        learned_file: match (&learned_file, &pool_path) {
            (Some(path), _) if path.as_os_str() == "none" => None,
            (Some(path), _) => Some(path.clone()),
            (None, Some(pool)) => Some(learned::beside(pool)),
            (None, None) => None,
        },
        driver_defaults: pool::DriverDefaults {
            url: default_driver_url,
            process_match: default_process_match,
        },
    };

    // Standalone: the pool is a file. Cluster mode: it is read from the API by name.
    let (loaded, cluster_mode) = match (pool_path.clone(), pool_name) {
        (Some(path), _) => (pool::load(&path, settings.reclaim_timeout)?, None),
        (None, Some(pool)) => {
            let placement = cluster::Placement {
                pool,
                pod: pod_name.ok_or(args::ArgsError::NoPlacement("--pod-name (POD_NAME)"))?,
                namespace: pod_namespace.ok_or(args::ArgsError::NoPlacement(
                    "--pod-namespace (POD_NAMESPACE)",
                ))?,
            };
            let client = cluster::client().await?;
            let loaded = cluster::first_pool(
                &client,
                &placement,
                settings.reclaim_timeout,
                Duration::from_secs(120),
            )
            .await?;
            (loaded, Some((client, placement)))
        }
        (None, None) => return Err(args::ArgsError::NoPool.into()),
    };
    let loaded = loaded.with_driver_defaults(&settings.driver_defaults);
    let driver_timeout = Duration::from_millis(driver_timeout_ms);
    let hub = CommandHub::new(settings.heartbeat);
    let driver = make_driver(loaded.driver, &loaded.info, &hub, driver_timeout)?;
    let driver_kind = loaded.driver;
    let driver_url = loaded.info.driver_url.clone();
    let driver_servers = loaded.info.driver_servers.clone();
    let metrics = Metrics::new()?;
    let meter = Arc::new(SystemMeter::init(!no_nvml, cuda_fallback));
    tracing::info!(
        pool = loaded.info.name,
        source = %pool_path.as_ref().map_or_else(|| "the API (cluster mode)".to_owned(), |p| p.display().to_string()),
        mode = loaded.info.mode.as_str(),
        driver = loaded.info.driver.as_str(),
        url = loaded.info.driver_url.as_deref().unwrap_or(""),
        process_match = loaded.info.process_match.as_deref().unwrap_or(""),
        models = loaded.info.models.len(),
        "pool loaded"
    );
    let shared = Shared::new(loaded, driver, hub, meter, metrics, settings.clone());

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut servers: Vec<JoinHandle<()>> = Vec::new();
    // Each listener has its own cap and accept task; together they stay under the fd limit.
    let mut caps = vec![max_connections as usize, metrics_max_connections as usize];
    if listen.is_some() {
        caps.push(max_connections as usize);
    }
    // A proxied request holds two descriptors: the client's connection and the server's.
    let proxy_cap = proxy_listen.map(|_| {
        caps.push(2 * proxy_max_connections as usize);
        caps.len() - 1
    });
    if let Some(fd_limit) = listen::fit_to_fd_limit(&mut caps) {
        tracing::warn!(
            fd_limit,
            api = caps[0],
            ops = caps[1],
            proxy = proxy_cap.map(|i| (caps[i] / 2).max(1)),
            "the open-file limit cannot hold every listener's connection cap: caps lowered to fit"
        );
    }
    if let Some(i) = proxy_cap {
        caps[i] = (caps[i] / 2).max(1);
    }
    let limits = |max_connections: usize| listen::ListenLimits {
        max_connections,
        header_timeout: Duration::from_millis(header_timeout_ms),
        body_timeout: Duration::from_millis(body_timeout_ms),
    };
    let conn_metrics = shared.metrics.connections.clone();
    let caps_api = api::limits::ApiLimits {
        max_sessions: max_sessions as usize,
    };
    let unix = api::http::bind_unix(&socket, socket_group)?;
    let socket_watch = api::socket::SocketWatch::new(&socket, socket_group);
    let api_router = api::router_with(Arc::clone(&shared), caps_api);
    servers.push(listen::serve(
        unix,
        api_router.clone(),
        limits(caps[0]),
        conn_metrics.clone(),
        stop_rx.clone(),
        "api",
    ));
    let socket_watcher = api::socket::spawn_watcher(
        Arc::clone(&socket_watch),
        api_router,
        limits(caps[0]),
        conn_metrics.clone(),
        Duration::from_secs(1),
        stop_rx.clone(),
    );
    tracing::info!(socket = %socket.display(), mode = "0660", group = socket_group, max_connections = caps[0], "API listening on the Unix socket");
    if let Some(addr) = listen {
        let tcp = api::http::bind_tcp(addr).await?;
        let router =
            api::http::with_token(api::router_with(Arc::clone(&shared), caps_api), api_token);
        servers.push(listen::serve(
            tcp,
            router,
            limits(caps[2]),
            conn_metrics.clone(),
            stop_rx.clone(),
            "api_tcp",
        ));
        tracing::info!(%addr, max_connections = caps[2], "API listening on TCP");
    }
    let mut proxy_task = None;
    // Kept to the end of `run`; dropped, it shuts down in the background.
    let mut proxy_runtime = None;
    if let Some(listen) = proxy_listen {
        let config = proxy::ProxyConfig {
            listen,
            // Vllm pools have no driver url: requests naming a model go to that model's
            // server, the rest to the first one listed.
            upstream: upstream
                .or(driver_url)
                .or_else(|| driver_servers.values().next().cloned())
                .ok_or(proxy::SetupError::NoUpstream)?,
            body_limit: proxy_body_limit,
            max_queue: proxy_max_queue,
            model_concurrency: proxy_model_concurrency,
            body_timeout: Duration::from_millis(body_timeout_ms),
        };
        let upstream = config.upstream.clone();
        let proxy = proxy::Proxy::new(Arc::clone(&shared), config)?;
        let runtime = proxy::runtime(proxy_threads)?;
        let cap = proxy_cap.map_or(proxy_max_connections as usize, |i| caps[i]);
        let router = proxy::router(Arc::clone(&proxy));
        let (limits, metrics, stop) = (limits(cap), conn_metrics.clone(), stop_rx.clone());
        // Bound and served on the proxy's runtime: a listener belongs to the reactor of the
        // runtime that binds it, and the connections' tasks go where the accept loop runs.
        let (addr, server) = runtime
            .handle()
            .spawn(async move {
                let tcp = api::http::bind_tcp(listen).await?;
                let addr = tcp.local_addr().map_or(listen, |a| a);
                // Streams are many small writes: without TCP_NODELAY each waits for the
                // client's delayed ACK (40 ms).
                let tcp = axum::serve::ListenerExt::tap_io(tcp, |stream| {
                    let _ = stream.set_nodelay(true);
                });
                let server = listen::serve_worded(
                    tcp,
                    router,
                    limits,
                    metrics,
                    stop,
                    "proxy",
                    listen::Wording {
                        cap_flag: "--proxy-max-connections",
                        body: proxy::reply::http_layer_body,
                    },
                );
                Ok::<_, api::http::ListenError>((addr, server))
            })
            .await
            .map_err(|error| proxy::SetupError::Runtime(std::io::Error::other(error)))??;
        servers.push(server);
        proxy_runtime = Some(runtime);
        proxy_task = Some(tokio::spawn(proxy.heartbeat_loop(stop_rx.clone())));
        tracing::info!(%addr, upstream, max_connections = cap, "serving proxy listening");
    }
    let ops = api::http::bind_tcp(metrics_listen).await?;
    let ops_addr = ops.local_addr().map_or(metrics_listen, |a| a);
    servers.push(listen::serve(
        ops,
        api::ops_router(Arc::clone(&shared)).layer(axum::Extension(socket_watch)),
        limits(caps[1]),
        conn_metrics,
        stop_rx.clone(),
        "ops",
    ));
    tracing::info!(addr = %ops_addr, max_connections = caps[1], "metrics, healthz and readyz listening");
    shared.ready.store(true, Ordering::Relaxed);
    tracing::info!("Memory at start: {}", shared.memory_line());

    let trimmer = listen::spawn_trimmer(Duration::from_secs(2), stop_rx.clone());
    let ticker = tokio::spawn(tick_loop(Arc::clone(&shared), stop_rx.clone()));
    let poller = tokio::spawn(poll_loop(Arc::clone(&shared), stop_rx.clone()));
    let mut followers: Vec<JoinHandle<()>> = Vec::new();
    match (&cluster_mode, pool_path) {
        (Some((client, placement)), _) => {
            followers.push(tokio::spawn(cluster::follow_pool(
                Arc::clone(&shared),
                client.clone(),
                placement.clone(),
                stop_rx.clone(),
            )));
            followers.push(tokio::spawn(cluster::report_loop(
                Arc::clone(&shared),
                client.clone(),
                placement.clone(),
                Duration::from_millis(report_interval_ms),
                stop_rx.clone(),
            )));
        }
        (None, Some(path)) => followers.push(tokio::spawn(watch_pool(
            Arc::clone(&shared),
            PoolFile::new(path),
            Duration::from_millis(pool_poll_ms),
            driver_kind,
            stop_rx.clone(),
        ))),
        (None, None) => {}
    }

    SERVING.store(true, Ordering::SeqCst);
    signals.recv().await;
    tracing::info!(
        "stop signal received: admitting nothing new, asking apps to unload idle models"
    );
    shared.begin_shutdown();
    let grace = Duration::from_millis(shutdown_grace_ms);
    let deadline = Instant::now() + grace;
    let mut changes = shared.subscribe();
    loop {
        let in_flight = shared.unloads_in_flight();
        if in_flight == 0 {
            break;
        }
        if Instant::now() >= deadline {
            tracing::warn!(
                in_flight,
                grace_ms = shutdown_grace_ms,
                "shutdown grace over with unloads still under way"
            );
            break;
        }
        let _ = tokio::time::timeout(settings.tick, changes.changed()).await;
    }
    tracing::info!("Memory at shutdown: {}", shared.memory_line());
    let _ = stop_tx.send(true);
    shared.hub.wake();
    ticker.abort();
    poller.abort();
    if let Some(task) = proxy_task {
        task.abort();
    }
    trimmer.abort();
    socket_watcher.abort();
    for follower in followers {
        // The reporter sends a last report when it stops; give it a moment.
        if tokio::time::timeout(Duration::from_secs(3), follower)
            .await
            .is_err()
        {
            tracing::debug!("a follower did not stop within 3 s");
        }
    }
    for server in servers {
        // Long polls end at their deadline; do not wait for them.
        if tokio::time::timeout(Duration::from_secs(2), server)
            .await
            .is_err()
        {
            tracing::debug!("a server did not stop within 2 s");
        }
    }
    drop(proxy_runtime);
    let _ = std::fs::remove_file(&socket);
    tracing::info!("sidecar stopped");
    Ok(())
}

async fn tick_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut interval = tokio::time::interval(shared.settings.tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        // Off the runtime's thread: the readings are blocking system calls (NVML can take
        // milliseconds) and the API must not wait behind them.
        let shared = Arc::clone(&shared);
        if let Err(error) = tokio::task::spawn_blocking(move || shared.tick()).await {
            tracing::error!(%error, "tick failed");
        }
    }
}

/// Server drivers: polls the model server every tick (a no-op for the others).
async fn poll_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut interval = tokio::time::interval(shared.settings.tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        shared.poll_server().await;
    }
}

async fn watch_pool(
    shared: Arc<Shared>,
    mut file: PoolFile,
    every: Duration,
    driver_kind: DriverKind,
    mut stop: watch::Receiver<bool>,
) {
    let mut interval = tokio::time::interval(every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if !file.changed() {
            continue;
        }
        // Off the runtime's workers: a read that never returns (a FIFO swapped in between the
        // check and the open) ties up one blocking thread, never the runtime or shutdown.
        let path = file.path().to_owned();
        let reclaim_timeout = shared.settings.reclaim_timeout;
        let read = tokio::task::spawn_blocking(move || pool::load(&path, reclaim_timeout));
        let result = tokio::select! {
            result = read => result,
            _ = stop.wait_for(|s| *s) => return,
        };
        let Ok(result) = result else {
            tracing::error!(file = %file.path().display(), "reading the pool file failed (the reading task ended abnormally); the previous pool stays in force");
            continue;
        };
        match result {
            Ok(loaded) => {
                if loaded.driver != driver_kind {
                    tracing::warn!(
                        file = %file.path().display(),
                        "the pool's driver kind changed; a driver change takes effect on restart (the rest of the pool is applied now)"
                    );
                }
                tracing::info!(
                    file = %file.path().display(),
                    pool = loaded.info.name,
                    mode = loaded.info.mode.as_str(),
                    models = loaded.info.models.len(),
                    "pool file changed: new pool in force"
                );
                shared.metrics.pool_reloads.with_label_values(&["ok"]).inc();
                shared.update_pool(loaded);
            }
            Err(error) => {
                shared
                    .metrics
                    .pool_reloads
                    .with_label_values(&["invalid"])
                    .inc();
                tracing::error!(file = %file.path().display(), %error, "pool file changed but is invalid: refused, the previous pool stays in force");
            }
        }
    }
}

/// Makes sure the process ends after SIGTERM/SIGINT even if a task is stuck: on its own
/// thread and runtime (so a wedged main runtime cannot hold it up), it waits for the signal,
/// then for `limit`, then exits with status 1.
pub fn spawn_shutdown_watchdog(limit: Duration) {
    let spawned = std::thread::Builder::new()
        .name("shutdown-watchdog".into())
        .spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .enable_time()
                .build()
            else {
                return;
            };
            runtime.block_on(async {
                if wait_for_signal().await.is_ok() {
                    if !SERVING.load(Ordering::SeqCst) {
                        // Still starting (cluster mode waits up to 120 s for its pool):
                        // nothing is admitted yet, so stop now, as before the watchdog.
                        tracing::info!("stop signal during start-up: exiting");
                        std::process::exit(0);
                    }
                    tokio::time::sleep(limit).await;
                } else {
                    std::future::pending::<()>().await;
                }
            });
            tracing::error!(
                limit_ms = limit.as_millis() as u64,
                "shutdown did not finish in time after the stop signal: exiting now"
            );
            std::process::exit(1);
        });
    if let Err(error) = spawned {
        tracing::warn!(%error, "failed to start the shutdown watchdog");
    }
}

/// SIGTERM and SIGINT, listened to from the moment this is made (one that arrives during
/// start-up is not lost).
struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

async fn wait_for_signal() -> std::io::Result<()> {
    StopSignals::new()?.recv().await;
    Ok(())
}

/// Whether the sidecar is serving (start-up done): a stop signal before that ends the process
/// at once (nothing to hand back yet), after it the graceful shutdown runs.
static SERVING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
