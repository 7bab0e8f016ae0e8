"""``sidecar/api/openapi.yaml`` is a valid OpenAPI 3.0 document, checked by a real validator
(openapi-spec-validator, pinned in requirements-dev.txt); the Rust test ``sidecar/tests/openapi.rs``
checks the running server against it."""

from __future__ import annotations

import os

from openapi_spec_validator import validate
from openapi_spec_validator.readers import read_from_filename

SPEC = os.path.join(os.path.dirname(__file__), "..", "..", "..", "sidecar", "api", "openapi.yaml")


def test_the_sidecar_api_document_is_valid_openapi() -> None:
    document, _ = read_from_filename(SPEC)
    validate(document)
    assert document["openapi"].startswith("3.0")
    # The instance protocol is in the document: commands and acknowledgements name generations.
    schemas = document["components"]["schemas"]
    assert "generation" in schemas["Command"]["required"]
    assert "generation" in schemas["Unloaded"]["required"]
