"""A STAND-IN for a vLLM server, not vLLM: the Vllm driver's tests (sidecar/tests/vllm.rs) run
against it because vLLM cannot run on these machines (the CPU build on PyPI needs a torch that
PyPI does not serve, and sleep mode is refused on the CPU platform: is_sleep_mode_available()
is CUDA/ROCm/XPU only). It follows the endpoints vLLM documents for sleep mode, which exist when
the server runs with --enable-sleep-mode and VLLM_SERVER_DEV_MODE=1:

    POST /sleep?level=1|2   200, empty body. Level 1 offloads the weights to host RAM (here
                            they stay in this process's RSS), level 2 discards them.
    POST /wake_up           200, empty body. The weights come back (level 2: "reloaded").
    GET  /is_sleeping       200, {"is_sleeping": bool}
    GET  /health            200
    GET  /v1/models         200, {"object": "list", "data": [{"id": MODEL, ...}]}
    POST /v1/completions, /v1/chat/completions
                            200, an OpenAI completion naming MODEL (text "hi from MODEL"); a body
                            naming another model gets vLLM's 404 NotFoundError; asleep, 503
                            (a stand-in's choice: the serving proxy's test checks that requests
                            reach the right server, awake).

It starts awake, as vLLM does, holding --mib MiB of "weights" (written, so resident).
The real-vLLM check of the driver is in the GPU script (tests/gpu/run_gpu.py, phase vllm, check
vllm_sleep_reclaims; SKIP where vLLM is not installed).

Usage: python standin.py --port PORT --model NAME --mib N
"""

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse


class State:
    def __init__(self, model: str, mib: int):
        self.model = model
        self.mib = mib
        self.lock = threading.Lock()
        self.sleeping = False
        self.level = 0
        self.weights = self.allocate()

    def allocate(self) -> bytearray:
        return bytearray(b"\x01") * (self.mib << 20)


def handler(state: State):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def reply(self, status: int, body=None):
            data = b"" if body is None else json.dumps(body).encode()
            self.send_response(status)
            if body is not None:
                self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            path = urlparse(self.path).path
            if path == "/is_sleeping":
                with state.lock:
                    self.reply(200, {"is_sleeping": state.sleeping})
            elif path == "/health":
                self.reply(200)
            elif path == "/v1/models":
                self.reply(200, {"object": "list", "data": [{"id": state.model, "object": "model"}]})
            else:
                self.reply(404, {"detail": "Not Found"})

        def do_POST(self):
            url = urlparse(self.path)
            length = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(length) if length else b""
            if url.path in ("/v1/completions", "/v1/chat/completions"):
                try:
                    named = json.loads(raw or b"{}").get("model")
                except ValueError:
                    named = None
                if named != state.model:
                    self.reply(404, {"object": "error", "message": f"The model `{named}` does not exist.",
                                     "type": "NotFoundError", "param": None, "code": 404})
                    return
                with state.lock:
                    asleep = state.sleeping
                if asleep:
                    self.reply(503, {"detail": f"{state.model} is sleeping"})
                    return
                self.reply(200, {"id": "cmpl-standin", "object": "text_completion", "model": state.model,
                                 "choices": [{"index": 0, "text": f"hi from {state.model}", "finish_reason": "stop"}]})
            elif url.path == "/sleep":
                level = int(parse_qs(url.query).get("level", ["1"])[0])
                if level not in (1, 2):
                    self.reply(400, {"detail": f"level {level}: must be 1 or 2"})
                    return
                with state.lock:
                    if not state.sleeping:
                        state.sleeping, state.level = True, level
                        if level == 2:
                            state.weights = None
                self.reply(200)
            elif url.path == "/wake_up":
                with state.lock:
                    if state.sleeping:
                        if state.weights is None:
                            state.weights = state.allocate()
                        state.sleeping, state.level = False, 0
                self.reply(200)
            else:
                self.reply(404, {"detail": "Not Found"})

    return Handler


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--mib", type=int, default=64)
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), handler(State(args.model, args.mib)))
    server.serve_forever()


if __name__ == "__main__":
    main()
