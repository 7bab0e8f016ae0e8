"""An MLServer runtime for the KServeV2 driver's tests (sidecar/tests/kserve.rs): a model that
really holds its bytes while loaded.

model-settings.json: {"name": "a", "implementation": "hog_runtime.Hog",
                      "parameters": {"extra": {"mib": 128}}}
The file sits next to each model-settings.json (MLServer imports it from the model's folder).
"""

from mlserver import MLModel
from mlserver.codecs import StringCodec
from mlserver.types import InferenceResponse


class Hog(MLModel):
    async def load(self) -> bool:
        params = self.settings.parameters
        extra = (params.extra if params else None) or {}
        mib = int(extra.get("mib", 64))
        # Written, not just reserved: every page is resident.
        self._block = bytearray(b"\x01") * (mib << 20)
        return True

    async def unload(self) -> bool:
        self._block = None
        return True

    async def predict(self, payload):
        # The bytes it holds, as one string output (what the proxy test checks).
        held = str(len(self._block or b""))
        return InferenceResponse(
            model_name=self.name,
            outputs=[StringCodec.encode_output("held", [held], use_bytes=False)],
        )
