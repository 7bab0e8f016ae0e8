"""The seed's video pipeline as a real app on the ModelPool SDK.

text-to-video (CogVideoX) -> upscale (Real-ESRGAN) -> frame interpolation (RIFE), each model a
safetensors file that this demo writes on first run (``--cache-dir``, sizes scaled by
``--scale``) and loads for real: numpy through ``safetensors.numpy``, or PyTorch (CPU or CUDA)
through ``safetensors.torch`` when torch is installed. Every step does real work on the tensors
(matmuls over the frames). Memory is measured, not estimated: the process's RSS from /proc (peak
through VmHWM) and, on CUDA, torch's allocator. At the end it prints the seed's table (Idle /
Generating / After use) and, with ``--check``, fails unless RAM is back within 10 % of idle.

    python examples/pipeline/pipeline.py --scale 1 --check       # with $MODELPOOL_SOCKET, or local
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

import modelpool
from modelpool import memory

log = logging.getLogger("pipeline")

HERE = Path(__file__).resolve().parent
DIM = 1024  # every weight block is DIM x DIM float32 (4 MiB); a frame is 32x32 (latent) or 64x64
BLOCK_BYTES = DIM * DIM * 4

# The seed's three models, sized (at --scale 1) 64 + 160 + 96 = 320 MiB of weights, in the
# seed's proportions of RAM (t2v is light on the host, the upscaler heaviest).
MODELS = {"t2v": 16, "upscale": 40, "frame_interpolation": 24}


# --- the weights: safetensors files written once ------------------------------------------------


def blocks_for(name: str, scale: float) -> int:
    return max(1, round(MODELS[name] * scale))


def write_weights(path: Path, name: str, blocks: int) -> None:
    """Writes a safetensors file block by block (never the whole model in memory)."""
    header: Dict[str, Any] = {"__metadata__": {"model": name, "blocks": str(blocks), "format": "np"}}
    for i in range(blocks):
        header[f"blocks.{i}.weight"] = {
            "dtype": "F32",
            "shape": [DIM, DIM],
            "data_offsets": [i * BLOCK_BYTES, (i + 1) * BLOCK_BYTES],
        }
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    seed = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)
    rng = np.random.default_rng(seed)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)))
        handle.write(raw)
        for _ in range(blocks):
            block = rng.standard_normal((DIM, DIM), dtype=np.float32) * np.float32(1.0 / np.sqrt(DIM))
            handle.write(block.tobytes())
            del block
    os.replace(tmp, path)


def ensure_weights(cache_dir: Path, scale: float) -> Dict[str, Path]:
    cache_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in MODELS:
        blocks = blocks_for(name, scale)
        path = cache_dir / f"{name}-{blocks}x{DIM}.safetensors"
        if not path.exists():
            log.info("Writing %s weights: %d blocks, %s -> %s", name, blocks, memory.format_bytes(blocks * BLOCK_BYTES), path)
            write_weights(path, name, blocks)
        paths[name] = path
    return paths


# --- the tensor backend: numpy, or torch on CPU / CUDA --------------------------------------------


class Backend:
    """The few operations the models need, on numpy or torch."""

    def __init__(self, kind: str, device: str) -> None:
        self.kind = kind
        self.device = device
        # import the loaders now: the runtime is part of the app's idle footprint
        if kind == "torch":
            import torch
            from safetensors.torch import load_file as load_torch

            self.torch = torch
            self._load = lambda path: load_torch(str(path), device=self.device)
        else:
            from safetensors.numpy import load_file as load_numpy

            self._load = lambda path: load_numpy(str(path))

    def load(self, path: Path) -> Dict[str, Any]:
        return self._load(path)

    def noise(self, seed: int, shape: Tuple[int, ...]) -> Any:
        if self.kind == "torch":
            gen = self.torch.Generator(device="cpu").manual_seed(seed)
            return self.torch.randn(shape, generator=gen).to(self.device)
        return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)

    def tanh(self, x: Any) -> Any:
        return self.torch.tanh(x) if self.kind == "torch" else np.tanh(x)

    def upsample2(self, frames: Any) -> Any:
        """Nearest-neighbour 2x: [F, H, W] -> [F, 2H, 2W]."""
        if self.kind == "torch":
            return frames.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
        return frames.repeat(2, axis=1).repeat(2, axis=2)

    def interleave(self, frames: Any, mids: Any) -> Any:
        if self.kind == "torch":
            out = self.torch.empty((frames.shape[0] + mids.shape[0],) + tuple(frames.shape[1:]), device=self.device)
        else:
            out = np.empty((frames.shape[0] + mids.shape[0],) + frames.shape[1:], dtype=np.float32)
        out[0::2] = frames
        out[1::2] = mids
        return out

    def to_numpy(self, x: Any) -> np.ndarray:
        return x.detach().cpu().numpy() if self.kind == "torch" else x

    def sync(self) -> None:
        if self.kind == "torch" and self.device.startswith("cuda"):
            self.torch.cuda.synchronize()


class Model:
    def __init__(self, backend: Backend, tensors: Dict[str, Any]) -> None:
        self.backend = backend
        self.blocks = [tensors[f"blocks.{i}.weight"] for i in range(len(tensors))]

    def _mix(self, x: Any) -> Any:
        for w in self.blocks:
            x = self.backend.tanh(x @ w) + x * 0.5
        return x


class TextToVideo(Model):
    """Stands in for CogVideoX: a prompt-seeded latent pushed through every block, per frame."""

    def generate(self, prompt: str, frames: int) -> Any:
        seed = int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16)
        x = self._mix(self.backend.noise(seed, (frames, DIM)))
        return x.reshape(frames, 32, 32)


class Upscaler(Model):
    """Stands in for Real-ESRGAN: 2x nearest upsample plus a learned residual, 32x32 -> 64x64."""

    def process(self, frames: Any) -> Any:
        n = frames.shape[0]
        detail = self._mix(frames.reshape(n, DIM)).reshape(n, 32, 32)
        return self.backend.upsample2(frames) + 0.1 * self.backend.upsample2(detail)


class FrameInterpolator(Model):
    """Stands in for RIFE: a frame between each pair, from their mean through the blocks."""

    def process(self, frames: Any) -> Any:
        n, h, w = frames.shape
        mids = (frames[1:] + frames[:-1]) * 0.5
        rows = mids.reshape((n - 1) * h * w // DIM, DIM)
        refined = self._mix(rows).reshape(n - 1, h, w)
        return self.backend.interleave(frames, 0.5 * mids + 0.5 * refined)


# --- measuring --------------------------------------------------------------------------------


class Meter:
    """Process RSS (and torch's CUDA allocator) at each step, plus the peak over the job."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.steps: List[Tuple[str, int, Optional[int]]] = []
        self.peak_rss = 0
        self.peak_vram: Optional[int] = None
        self._sampling = threading.Event()

    def cuda(self) -> Any:
        if self.backend.kind == "torch" and self.backend.device.startswith("cuda"):
            return self.backend.torch
        return None

    def vram(self) -> Optional[int]:
        torch = self.cuda()
        return int(torch.cuda.memory_allocated()) if torch is not None else None

    def mark(self, step: str) -> None:
        self.backend.sync()
        rss, vram = memory.rss_bytes(), self.vram()
        self.steps.append((step, rss, vram))
        self.peak_rss = max(self.peak_rss, rss)
        log.info("step %-26s RSS %10s  VRAM %s", step, memory.format_bytes(rss), memory.format_bytes(vram) if vram is not None else "n/a")

    def start_job(self) -> None:
        memory.reset_peak_rss()
        torch = self.cuda()
        if torch is not None:
            torch.cuda.reset_peak_memory_stats()
        self._sampling.set()
        threading.Thread(target=self._sample, daemon=True).start()

    def end_job(self) -> None:
        self._sampling.clear()
        self.peak_rss = max(self.peak_rss, memory.peak_rss_bytes())
        torch = self.cuda()
        if torch is not None:
            self.peak_vram = int(torch.cuda.max_memory_allocated())

    def _sample(self) -> None:
        while self._sampling.is_set():
            self.peak_rss = max(self.peak_rss, memory.rss_bytes())
            time.sleep(0.02)


# --- the app ----------------------------------------------------------------------------------


def choose_backend(kind: str, device: str) -> Backend:
    if kind in ("auto", "torch"):
        try:
            import torch
        except ImportError:
            if kind == "torch":
                raise SystemExit("--backend torch: torch is not installed") from None
        else:
            if device == "auto":
                device = "cuda" if torch.cuda.is_available() else "cpu"
            return Backend("torch", device)
    if device == "cuda":
        raise SystemExit("--device cuda needs torch")
    return Backend("numpy", "cpu")


def save_video(frames: np.ndarray, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    lo, hi = float(frames.min()), float(frames.max())
    video = ((frames - lo) / (hi - lo + 1e-9) * 255).astype(np.uint8)
    path = out_dir / "video.npy"
    np.save(path, video)
    n, h, w = video.shape  # also a contact sheet of the first frames, as a PGM image
    strip = np.concatenate(list(video[: min(n, 8)]), axis=1)
    with open(out_dir / "frames.pgm", "wb") as handle:
        handle.write(f"P5 {strip.shape[1]} {strip.shape[0]} 255\n".encode())
        handle.write(strip.tobytes())
    return path


def run(args: argparse.Namespace) -> int:
    backend = choose_backend(args.backend, args.device)
    paths = ensure_weights(Path(args.cache_dir), args.scale)
    meter = Meter(backend)

    memory_manager = modelpool.get_memory_manager(aggressive_cleanup=None if args.mode == "pool" else args.mode == "aggressive")
    memory_manager.register_model_loader("t2v", lambda: TextToVideo(backend, backend.load(paths["t2v"])))
    memory_manager.register_model_loader("upscale", lambda: Upscaler(backend, backend.load(paths["upscale"])))
    memory_manager.register_model_loader(
        "frame_interpolation", lambda: FrameInterpolator(backend, backend.load(paths["frame_interpolation"]))
    )
    memory_manager.connect()
    # warm the runtime up (BLAS threads, CUDA context): part of the app's idle footprint, as in the seed
    warm = backend.noise(0, (args.frames, DIM))
    _ = backend.to_numpy(backend.tanh(warm @ backend.noise(1, (DIM, DIM))))
    del warm, _
    memory.release_memory()
    log.info(
        "ModelPool %s mode, backend %s on %s, weights %s",
        memory_manager.mode,
        backend.kind,
        backend.device,
        memory.format_bytes(sum(p.stat().st_size for p in paths.values())),
    )

    meter.mark("1. idle")
    idle_rss, idle_vram = meter.steps[-1][1], meter.steps[-1][2]
    meter.start_job()
    for _job in range(args.jobs):
        with memory_manager.temporary_operation("video_generation"):
            with memory_manager.load_model("t2v") as t2v:
                meter.mark("2. t2v loaded")
                frames = t2v.generate(args.prompt, args.frames)
                meter.mark("3. video generated")
                with memory_manager.load_model("upscale") as upscale:
                    meter.mark("4. upscale loaded")
                    frames = upscale.process(frames)
                    meter.mark("5. upscaled")
                meter.mark("6. upscale unloaded")
                with memory_manager.load_model("frame_interpolation") as interpolate:
                    meter.mark("7. interpolation loaded")
                    frames = interpolate.process(frames)
                    meter.mark("8. interpolated")
                meter.mark("9. interpolation unloaded")
            video = backend.to_numpy(frames)
            del frames
            path = save_video(video, Path(args.out))
            log.info("Saved %d frames of %dx%d to %s", video.shape[0], video.shape[1], video.shape[2], path)
            del video
            meter.mark("10. video saved")
    meter.end_job()
    memory.release_memory()
    meter.mark("11. after use")
    after_rss, after_vram = meter.steps[-1][1], meter.steps[-1][2]

    sidecar_note = ""
    if memory_manager.mode == "sidecar":
        try:
            state = memory_manager.get_memory_stats().get("sidecar") or {}
            held = state.get("held_bytes") or {}
            sidecar_note = (
                f"sidecar ledger after use: {len(state.get('models') or [])} model(s), "
                f"RAM {memory.format_bytes(held.get('ram', 0))}, VRAM {memory.format_bytes(held.get('vram', 0))} held"
            )
        except Exception as error:  # the table is still worth printing
            sidecar_note = f"sidecar state unavailable: {error}"

    def vram_cell(value: Optional[int]) -> str:
        return memory.format_bytes(value) if value is not None else "n/a (no GPU)"

    rows = [
        ("Idle", memory.format_bytes(idle_rss), vram_cell(idle_vram), "only the base"),
        ("Generating", memory.format_bytes(meter.peak_rss), vram_cell(meter.peak_vram), "loaded on demand (peak)"),
        ("After use", memory.format_bytes(after_rss), vram_cell(after_vram), "unloaded automatically"),
    ]
    growth = (after_rss - idle_rss) / idle_rss if idle_rss else 0.0
    ok = growth <= 0.10
    print()
    print(f"ModelPool pipeline demo: {args.jobs} job(s), {args.frames} frames, --scale {args.scale}, "
          f"{memory_manager.mode} mode, {backend.kind} on {backend.device} (app process, measured)")
    print()
    print("| Scenario   | RAM        | VRAM         | Status                  |")
    print("|------------|------------|--------------|-------------------------|")
    for row in rows:
        print(f"| {row[0]:<10} | {row[1]:>10} | {row[2]:>12} | {row[3]:<23} |")
    print()
    print("Flow (the seed's 'Fluxo de Execução', measured):")
    for step, rss, vram in meter.steps:
        print(f"  {step:<26} RAM {memory.format_bytes(rss):>10}   VRAM {vram_cell(vram)}")
    if sidecar_note:
        print(sidecar_note)
    verdict = "OK" if ok else "FAIL"
    print(f"{verdict}: RAM after use {memory.format_bytes(after_rss)} vs idle {memory.format_bytes(idle_rss)} "
          f"({growth:+.1%}, limit +10%)")
    if args.report:
        Path(args.report).write_text(json.dumps({
            "mode": memory_manager.mode, "backend": backend.kind, "device": backend.device, "scale": args.scale,
            "idle_rss": idle_rss, "peak_rss": meter.peak_rss, "after_rss": after_rss,
            "idle_vram": idle_vram, "peak_vram": meter.peak_vram, "after_vram": after_vram,
            "steps": meter.steps, "ok": ok,
        }, indent=2))
    return 0 if ok or not args.check else 1


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="model sizes: 1 = 64 + 160 + 96 MiB of weights")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--jobs", type=int, default=1, help="videos to generate, one after the other")
    parser.add_argument("--prompt", default="a cat playing the piano, cinematic lighting")
    parser.add_argument("--cache-dir", default=str(HERE / ".models"), help="where the weights are written")
    parser.add_argument("--out", default=os.path.join("target", "demo-out"), help="where the video goes")
    parser.add_argument("--backend", choices=("auto", "numpy", "torch"), default="auto")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--mode", choices=("pool", "aggressive", "cache"), default="pool",
                        help="aggressive_cleanup: follow the pool (default), True, or False")
    parser.add_argument("--check", action="store_true", help="exit 1 unless RAM ends within 10%% of idle")
    parser.add_argument("--report", help="write the measurements as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
