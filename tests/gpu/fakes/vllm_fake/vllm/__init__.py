"""A FAKE vLLM for the GPU check's dry run (tests/gpu/fakes/README.md): not vLLM."""

__version__ = "0.0.0-fake"
