"""A FAKE vLLM OpenAI server for the GPU check's dry run, not vLLM: it takes the arguments
``gpulib.vllm_server_argv`` gives and answers the sleep-mode endpoints vLLM documents
(``/sleep?level=``, ``/wake_up``, ``/is_sleeping``, ``/health``) on the simulated device of
``fakegpu``: awake it holds ``--gpu-memory-utilization`` of the device; asleep only a CUDA
context; at level 1 the weights (their size from the model's config.json) move to host RAM, so
its RSS grows by them, as vLLM's does. Needs ``VLLM_SERVER_DEV_MODE=1`` like vLLM."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.abspath(os.path.join(HERE, "..", "..", "..", "..")))  # fakes/
sys.path.insert(0, os.path.abspath(os.path.join(HERE, "..", "..", "..", "..", "..")))  # tests/gpu/
import fakegpu  # noqa: E402
import gpulib  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--enable-sleep-mode", action="store_true")
    args, _rest = parser.parse_known_args()
    if not args.enable_sleep_mode or os.environ.get("VLLM_SERVER_DEV_MODE") != "1":
        sys.exit("fake vllm: the sleep endpoints need --enable-sleep-mode and VLLM_SERVER_DEV_MODE=1")
    with open(os.path.join(args.model, "config.json")) as handle:
        weights = gpulib.llama_weights_bytes(json.load(handle))
    awake_bytes = int(fakegpu.TOTAL * args.gpu_memory_utilization)
    state = {"sleeping": False, "host": None}
    lock = threading.Lock()
    fakegpu.set_usage(os.getpid(), awake_bytes)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_args: object) -> None:
            pass

        def reply(self, status: int, body: object = None) -> None:
            data = b"" if body is None else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            path = urlparse(self.path).path
            if path == "/health":
                self.reply(200)
            elif path == "/is_sleeping":
                with lock:
                    self.reply(200, {"is_sleeping": state["sleeping"]})
            else:
                self.reply(404, {"detail": "Not Found"})

        def do_POST(self) -> None:
            url = urlparse(self.path)
            if url.path == "/sleep":
                level = int(parse_qs(url.query).get("level", ["1"])[0])
                with lock:
                    if not state["sleeping"]:
                        state["sleeping"] = True
                        if level == 1:
                            state["host"] = bytearray(b"\x01") * weights
                        fakegpu.set_usage(os.getpid(), fakegpu.CONTEXT)
                self.reply(200)
            elif url.path == "/wake_up":
                with lock:
                    if state["sleeping"]:
                        state["sleeping"], state["host"] = False, None
                        fakegpu.set_usage(os.getpid(), awake_bytes)
                self.reply(200)
            else:
                self.reply(404, {"detail": "Not Found"})

    ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
