//! Helpers for the integration tests: safetensors files written with the `safetensors` crate,
//! the host binary started on a free port, and a minimal HTTP/1.1 client.
#![allow(dead_code)] // each test file uses a different subset
#![allow(clippy::unwrap_used)] // test helpers: a failure is a test failure

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::Duration,
};

use safetensors::{Dtype, tensor::TensorView};
use serde_json::Value;

/// The host binary Cargo built for these tests.
pub fn host_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_modelpool-candle-host"))
}

/// Writes `{dir}/{name}.safetensors` with a few tensors of different dtypes (about 1.2 MiB) and
/// returns the sum of the tensors' bytes.
pub fn write_small_model(dir: &Path, name: &str) -> u64 {
    let f32_matrix: Vec<u8> = (0..256 * 512)
        .flat_map(|i| (i as f32 * 0.5).to_le_bytes())
        .collect();
    let f32_bias: Vec<u8> = (0..512).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let bf16: Vec<u8> = (0..1000 * 64)
        .flat_map(|i| ((i % 65000) as u16).to_le_bytes())
        .collect();
    let i64s: Vec<u8> = (0..33i64).flat_map(i64::to_le_bytes).collect();
    let bytes: Vec<u8> = (0..77u8).collect();
    let tensors = vec![
        (
            "layer.weight",
            TensorView::new(Dtype::F32, vec![256, 512], &f32_matrix).unwrap(),
        ),
        (
            "layer.bias",
            TensorView::new(Dtype::F32, vec![512], &f32_bias).unwrap(),
        ),
        (
            "embed",
            TensorView::new(Dtype::BF16, vec![1000, 64], &bf16).unwrap(),
        ),
        ("ids", TensorView::new(Dtype::I64, vec![33], &i64s).unwrap()),
        (
            "raw",
            TensorView::new(Dtype::U8, vec![7, 11], &bytes).unwrap(),
        ),
    ];
    let total = [&f32_matrix, &f32_bias, &bf16, &i64s, &bytes]
        .iter()
        .map(|b| b.len() as u64)
        .sum();
    safetensors::serialize_to_file(tensors, None, &dir.join(format!("{name}.safetensors")))
        .unwrap();
    total
}

/// Writes `{dir}/{name}.safetensors` holding one F32 tensor of `mib` MiB.
pub fn write_big_model(dir: &Path, name: &str, mib: usize) -> u64 {
    let data: Vec<u8> = (0..mib << 18)
        .flat_map(|i| (i as f32).to_le_bytes())
        .collect();
    let view = TensorView::new(Dtype::F32, vec![mib << 18], &data).unwrap();
    safetensors::serialize_to_file(
        [("w", view)],
        None,
        &dir.join(format!("{name}.safetensors")),
    )
    .unwrap();
    data.len() as u64
}

/// A running host; killed on drop.
pub struct Host {
    child: Child,
    pub addr: SocketAddr,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Host {
    /// Starts the host on `--models-dir dir --listen 127.0.0.1:0` plus `extra` and waits for
    /// its "listening on" line.
    pub fn start(dir: &Path, extra: &[&str]) -> Self {
        let mut child = Command::new(host_bin())
            .arg("--models-dir")
            .arg(dir)
            .args(["--listen", "127.0.0.1:0", "--staging-mib", "1"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let addr: SocketAddr = rest.split_whitespace().next().unwrap().parse().unwrap();
                    let _ = tx.send(addr);
                }
                sink.lock().unwrap().push(line);
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| {
                let _ = child.kill();
                panic!("host did not start: {:?}", log.lock().unwrap())
            });
        Self { child, addr, log }
    }

    /// `METHOD path` → (status, JSON body).
    pub fn call(&self, method: &str, path: &str) -> (u16, Value) {
        request(self.addr, method, path)
    }

    /// The log so far, one string.
    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request with `Connection: close`; the body parsed as JSON.
pub fn request(addr: SocketAddr, method: &str, path: &str) -> (u16, Value) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let text = String::from_utf8(response).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    let json = serde_json::from_str(&body).unwrap_or(Value::String(body));
    (status, json)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
    out
}
