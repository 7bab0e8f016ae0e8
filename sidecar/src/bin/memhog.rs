//! `modelpool-memhog`: a test app that holds real memory per "model" (an anonymous mmap with
//! every page written, so it shows in RSS at once and goes back to the OS at once on munmap).
//!
//! SDK mode (`--socket PATH`): opens a session, heartbeats, long-polls the command stream and
//! obeys unload commands; the test drives it with lines on stdin and reads one JSON line per
//! command (`{"type":"reply",...}`) and per event (`{"type":"event",...}`) on stdout:
//!
//! ```text
//! acquire MODEL MIB [nowait]   acquire; on "load" map+touch MIB and report /v1/loaded
//! release LEASE                release; when told to unload, free and report /v1/unloaded
//!                              (only a command for the instance it holds: model + generation)
//! acquire MODEL MIB vram=MIB   the same, also reporting MIB of VRAM (only reported)
//! unload MODEL [keep]          free and report /v1/unloaded (`keep`: report without freeing)
//! readings USED TOTAL          send device VRAM readings (bytes) on every heartbeat
//! stop-heartbeat               stop heartbeating (a hung app)
//! rss                          this process's VmRSS
//! close                        free every model, then DELETE the session
//! quit
//! ```
//!
//! Http app mode (`--serve-http ADDR --size NAME=MIB ...`): serves
//! `POST /models/{name}/load|unload` for the sidecar's `Http` driver.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use memmap2::MmapMut;
use modelpool_sidecar::client::Client;
use serde_json::{Value, json};

const PAGE: usize = 4096;

type Models = Arc<Mutex<HashMap<String, MmapMut>>>;

fn allocate(mib: u64) -> anyhow::Result<MmapMut> {
    let bytes = usize::try_from(mib << 20).context("size too large")?;
    let mut map = MmapMut::map_anon(bytes.max(PAGE)).context("mmap failed")?;
    // Write every page so it is resident (and counted in RSS) now.
    for offset in (0..map.len()).step_by(PAGE) {
        map[offset] = 0xA5;
    }
    Ok(map)
}

fn out(value: &Value) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{value}");
    let _ = stdout.flush();
}

fn reply(value: Value) {
    let mut value = value;
    value["type"] = json!("reply");
    out(&value);
}

fn event(value: Value) {
    let mut value = value;
    value["type"] = json!("event");
    out(&value);
}

fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

fn response_json(status: u16, body: Value) -> Value {
    json!({"status": status, "body": body})
}

struct Args {
    socket: Option<PathBuf>,
    serve_http: Option<String>,
    sizes: HashMap<String, u64>,
    app: String,
    models: Vec<String>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        socket: None,
        serve_http: None,
        sizes: HashMap::new(),
        app: "memhog".to_owned(),
        models: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--socket" => args.socket = Some(PathBuf::from(value()?)),
            "--serve-http" => args.serve_http = Some(value()?),
            "--app" => args.app = value()?,
            "--models" => {
                args.models = value()?
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect();
            }
            "--size" => {
                let v = value()?;
                let (name, mib) = v.split_once('=').context("--size NAME=MIB")?;
                args.sizes.insert(name.to_owned(), mib.parse()?);
            }
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(args)
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    if let Some(addr) = &args.serve_http {
        return serve_http(addr, &args.sizes);
    }
    let socket = args
        .socket
        .context("--socket or --serve-http is required")?;
    sdk_mode(socket, &args.app, &args.models)
}

fn sdk_mode(socket: PathBuf, app: &str, models_list: &[String]) -> anyhow::Result<()> {
    let client = Client::unix(&socket).with_timeout(Duration::from_secs(120));
    let created = client.post(
        "/v1/sessions",
        &json!({"pid": std::process::id(), "app": app, "models": models_list}),
    )?;
    if created.status != 201 {
        bail!("session refused: {} {}", created.status, created.text());
    }
    let body = created.json();
    let session = body["session"]
        .as_str()
        .context("no session id")?
        .to_owned();
    let heartbeat_ms = body["heartbeat_ms"].as_u64().unwrap_or(2000);
    event(json!({"event": "session", "session": session, "pid": std::process::id(), "rss": rss()}));

    let models: Models = Arc::new(Mutex::new(HashMap::new()));
    // The generation of the instance of each model this process holds (from its acquire).
    let generations: Arc<Mutex<HashMap<String, u64>>> = Arc::new(Mutex::new(HashMap::new()));
    let heartbeating = Arc::new(AtomicBool::new(true));
    let stopping = Arc::new(AtomicBool::new(false));
    let readings: Arc<Mutex<Option<Value>>> = Arc::new(Mutex::new(None));

    {
        let (client, session, heartbeating, stopping, readings) = (
            client.clone(),
            session.clone(),
            Arc::clone(&heartbeating),
            Arc::clone(&stopping),
            Arc::clone(&readings),
        );
        std::thread::spawn(move || {
            // Twice per interval, so a slow scheduler does not make us miss two in a row.
            let every = Duration::from_millis((heartbeat_ms / 2).max(10));
            while !stopping.load(Ordering::Relaxed) {
                if heartbeating.load(Ordering::Relaxed) {
                    let body = match readings.lock().ok().and_then(|r| r.clone()) {
                        Some(r) => json!({"readings": r}),
                        None => json!({}),
                    };
                    let _ = client.post(&format!("/v1/sessions/{session}/heartbeat"), &body);
                }
                std::thread::sleep(every);
            }
        });
    }
    {
        let (client, session, models, generations, stopping) = (
            client.clone(),
            session.clone(),
            Arc::clone(&models),
            Arc::clone(&generations),
            Arc::clone(&stopping),
        );
        std::thread::spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                let Ok(polled) =
                    client.get(&format!("/v1/sessions/{session}/commands?wait_ms=2000"))
                else {
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                };
                if polled.status == 404 {
                    return;
                }
                let commands = polled.json()["commands"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                for command in commands {
                    let model = command["model"].as_str().unwrap_or_default().to_owned();
                    let generation = command["generation"].as_u64().unwrap_or(0);
                    // Only the instance the command names: a stale command (for an instance
                    // already gone) must not free a later load of the same model.
                    let mine = generations
                        .lock()
                        .map(|mut g| {
                            let held = g.get(&model) == Some(&generation);
                            if held {
                                g.remove(&model);
                            }
                            held
                        })
                        .unwrap_or(false);
                    if !mine {
                        event(json!({
                            "event": "stale_command", "model": model,
                            "generation": generation, "command": command["id"],
                        }));
                        continue;
                    }
                    let freed = models.lock().map(|mut m| m.remove(&model)).ok().flatten();
                    drop(freed);
                    let answer = client.post(
                        "/v1/unloaded",
                        &json!({"session": session, "model": model,
                                "generation": generation, "command": command["id"]}),
                    );
                    event(json!({
                        "event": "unloaded",
                        "model": model,
                        "reason": command["reason"],
                        "command": command["id"],
                        "status": answer.map(|r| r.status).unwrap_or(0),
                        "rss": rss(),
                    }));
                }
            }
        });
    }

    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let line = line?;
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["acquire", model, mib, rest @ ..] => {
                let mib: u64 = mib.parse()?;
                let wait = !rest.contains(&"nowait");
                // `vram=MIB`: VRAM the app reports holding (no GPU needed: it is only reported).
                let vram_mib: u64 = rest
                    .iter()
                    .find_map(|w| w.strip_prefix("vram="))
                    .map(str::parse)
                    .transpose()?
                    .unwrap_or(0);
                let started = Instant::now();
                let answer = client.post(
                    "/v1/acquire",
                    &json!({"session": session, "model": model, "wait": wait}),
                )?;
                let body = answer.json();
                if answer.status == 200
                    && let Some(generation) = body["generation"].as_u64()
                {
                    generations
                        .lock()
                        .map_err(|_| anyhow::anyhow!("poisoned"))?
                        .insert((*model).to_owned(), generation);
                }
                if answer.status == 200 && body["decision"] == "load" {
                    let before = rss();
                    let map = allocate(mib)?;
                    let after = rss();
                    models
                        .lock()
                        .map_err(|_| anyhow::anyhow!("poisoned"))?
                        .insert((*model).to_owned(), map);
                    let loaded = client.post(
                        "/v1/loaded",
                        &json!({
                            "session": session, "lease": body["lease"], "ok": true,
                            "load_seconds": started.elapsed().as_secs_f64(),
                            "ram_bytes": mib << 20, "vram_bytes": vram_mib << 20,
                        }),
                    )?;
                    reply(json!({
                        "status": answer.status, "body": body, "loaded_status": loaded.status,
                        "rss_before": before, "rss_after": after,
                    }));
                } else {
                    reply(response_json(answer.status, body));
                }
            }
            ["release", lease] => {
                let answer =
                    client.post("/v1/release", &json!({"session": session, "lease": lease}))?;
                let body = answer.json();
                reply(response_json(answer.status, body));
            }
            ["unload", model, rest @ ..] => {
                // `keep`: report the unload but keep the memory (a leaking app).
                if !rest.contains(&"keep") {
                    let freed = models.lock().map(|mut m| m.remove(*model)).ok().flatten();
                    drop(freed);
                }
                let generation = generations
                    .lock()
                    .map_err(|_| anyhow::anyhow!("poisoned"))?
                    .remove(*model)
                    .unwrap_or(0);
                let answer = client.post(
                    "/v1/unloaded",
                    &json!({"session": session, "model": model, "generation": generation}),
                )?;
                reply(json!({"status": answer.status, "body": answer.json(), "rss": rss()}));
            }
            ["readings", used, total] => {
                let value = json!({
                    "source": "torch",
                    "device_vram_used_bytes": used.parse::<u64>()?,
                    "device_vram_total_bytes": total.parse::<u64>()?,
                });
                *readings.lock().map_err(|_| anyhow::anyhow!("poisoned"))? = Some(value.clone());
                let answer = client.post(
                    &format!("/v1/sessions/{session}/heartbeat"),
                    &json!({"readings": value}),
                )?;
                reply(response_json(answer.status, answer.json()));
            }
            ["stop-heartbeat"] => {
                heartbeating.store(false, Ordering::Relaxed);
                reply(json!({"status": 0}));
            }
            ["rss"] => {
                let held: u64 = models
                    .lock()
                    .map(|m| m.values().map(|v| v.len() as u64).sum())
                    .unwrap_or(0);
                reply(json!({"rss": rss(), "held": held}));
            }
            ["close"] => {
                // Like the SDK: drop every model, then close the session.
                if let Ok(mut held) = models.lock() {
                    held.clear();
                }
                let answer = client.delete(&format!("/v1/sessions/{session}"))?;
                reply(json!({"status": answer.status}));
            }
            ["quit"] => break,
            _ => reply(json!({"status": 0, "error": format!("unknown command {line:?}")})),
        }
    }
    stopping.store(true, Ordering::Relaxed);
    Ok(())
}

fn serve_http(addr: &str, sizes: &HashMap<String, u64>) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr).with_context(|| format!("bind {addr}"))?;
    event(
        json!({"event": "listening", "addr": listener.local_addr()?.to_string(), "pid": std::process::id()}),
    );
    let models: Models = Arc::new(Mutex::new(HashMap::new()));
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let models = Arc::clone(&models);
        let sizes = sizes.clone();
        std::thread::spawn(move || {
            if let Err(error) = handle_http(stream, &models, &sizes) {
                event(json!({"event": "error", "message": error.to_string()}));
            }
        });
    }
    Ok(())
}

fn handle_http(
    mut stream: TcpStream,
    models: &Models,
    sizes: &HashMap<String, u64>,
) -> anyhow::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        if line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    let path = request_line.split_whitespace().nth(1).unwrap_or("/");
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (status, answer) = match parts.as_slice() {
        ["models", name, "load"] => match sizes.get(*name) {
            Some(&mib) => {
                let map = allocate(mib)?;
                models
                    .lock()
                    .map_err(|_| anyhow::anyhow!("poisoned"))?
                    .insert((*name).to_owned(), map);
                event(json!({"event": "http_loaded", "model": name, "rss": rss()}));
                (200, json!({"vram_bytes": 0, "ram_bytes": mib << 20}))
            }
            None => (404, json!({"error": format!("no model {name}")})),
        },
        ["models", name, "unload"] => {
            let freed = models.lock().map(|mut m| m.remove(*name)).ok().flatten();
            let had = freed.is_some();
            drop(freed);
            event(json!({"event": "http_unloaded", "model": name, "had": had, "rss": rss()}));
            (200, json!({}))
        }
        _ => (404, json!({"error": "not found"})),
    };
    let text = answer.to_string();
    write!(
        stream,
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    )?;
    stream.flush()?;
    Ok(())
}
