"""The seed's examples (the usage examples of the in-process memory manager ModelPool grew out of), unchanged apart from the import.

The lines between the `# --- seed` markers are the seed's code; what is around them sets the
scene (models that hold real memory) and prints what a test checks, as JSON on the last line.
"""

import json
import logging
import sys

import numpy as np

from modelpool import get_memory_manager  # the seed: from memory_manager import get_memory_manager
from modelpool import ModelUnloadedError, rss_bytes  # for the checks below only

logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")

MIB = 1024 * 1024


class Upscaler:
    """Stands in for Real-ESRGAN: 160 MiB of weights, a real matmul per frame."""

    def __init__(self) -> None:
        self.weights = [np.full((1024, 1024), 0.001, dtype=np.float32) for _ in range(40)]

    def process(self, frames):
        out = frames.reshape(len(frames), -1)[:, :1024]
        for w in self.weights[:4]:
            out = np.tanh(out @ w)
        return np.kron(out.reshape(-1, 32, 32), np.ones((2, 2), dtype=np.float32))


class FrameInterpolator:
    """Stands in for RIFE: 96 MiB of weights."""

    def __init__(self) -> None:
        self.weights = [np.full((1024, 1024), 0.001, dtype=np.float32) for _ in range(24)]

    def process(self, frames):
        mids = (frames[1:] + frames[:-1]) / 2
        out = np.empty((len(frames) + len(mids),) + frames.shape[1:], dtype=np.float32)
        out[0::2], out[1::2] = frames, mids
        return out


def _load_upscale_model():
    logging.info("Loading upscaling model (Real-ESRGAN)...")
    model = Upscaler()
    logging.info("Upscaling model loaded successfully.")
    return model


def _load_frame_interpolation_model():
    return FrameInterpolator()


def generate_video():
    with memory_manager.load_model("frame_interpolation") as model:
        return model.process(np.ones((4, 32, 32), dtype=np.float32)).shape


np.ones((64, 64)) @ np.ones((64, 64))  # warm numpy (and BLAS) up: part of the app's baseline
data = np.ones((4, 32, 32), dtype=np.float32)
report = {}

# --- seed: "Configuração" and "Registro de Modelos"
memory_manager = get_memory_manager(aggressive_cleanup=True)
memory_manager.register_model_loader("upscale", _load_upscale_model)
memory_manager.register_model_loader("frame_interpolation", _load_frame_interpolation_model)
# --- end seed
report["baseline"] = rss_bytes()

# --- seed: "Uso com Context Manager"
with memory_manager.load_model("upscale") as model:
    result = model.process(data)
# Modelo automaticamente DESCARREGADO aqui ✅
# --- end seed
report["after_use"] = rss_bytes()
report["loaded_after_use"] = list(memory_manager.loaded_models.keys())
report["result_shape"] = list(result.shape)
try:
    model.process(data)
    report["use_after_block"] = None
except ModelUnloadedError as error:
    report["use_after_block"] = str(error)

data = "a corrupted frame"  # makes the next block fail inside model.process
# --- seed: "Tratamento de Erros"
try:
    with memory_manager.load_model("upscale") as model:
        result = model.process(data)
except Exception as e:
    # Modelo AINDA É DESCARREGADO mesmo com erro ✅
    memory_manager.force_cleanup()
# --- end seed
    report["error"] = type(e).__name__
    report["in_except"] = rss_bytes()
report["after_error"] = rss_bytes()
report["loaded_after_error"] = list(memory_manager.loaded_models.keys())

# --- seed: "Operações Temporárias"
with memory_manager.temporary_operation("video_generation"):
    generate_video()
# Memória automaticamente LIMPA aqui ✅
# --- end seed

# --- seed: "Verificar Memória Antes de Operação"
if memory_manager.check_memory_available(required_vram_gb=10.0):
    # Há memória suficiente
    generate_video()
else:
    # Pouca memória, fazer limpeza primeiro
    memory_manager.force_cleanup()
    generate_video()
# --- end seed

# --- seed: "Monitoramento"
stats = memory_manager.get_memory_stats()

print(f"RAM: {stats['ram_used_gb']:.1f}/{stats['ram_total_gb']:.1f}GB ({stats['ram_percent']:.1f}%)")
print(f"VRAM: {stats['vram_allocated_gb']:.1f}/{stats['vram_total_gb']:.1f}GB ({stats['vram_percent']:.1f}%)")
# --- end seed

# --- seed: "Limpeza por Threshold" and "Ver Modelos Carregados"
memory_manager.auto_cleanup_if_needed(threshold_percent=80.0)
print(list(memory_manager.loaded_models.keys()))
# --- end seed

report["after_all"] = rss_bytes()
report["loaded_after_all"] = list(memory_manager.loaded_models.keys())
report["mode"] = memory_manager.mode
report["stats_keys"] = sorted(k for k in stats if not isinstance(stats[k], (dict, list)))
print(json.dumps(report))
