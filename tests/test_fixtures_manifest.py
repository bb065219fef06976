"""The repo's MXNet-written fixtures have the layout of the reference fixture set.

Both sets were written by MXNet 1.9.1, but from different synthetic images, so JPEG bytes differ; what the readers
depend on must agree: keys, labels, header and identity records, payload sizes of the chunked records, pair counts.
`REFERENCE_LAYOUT.json` is the reference set's manifest less its per-image JPEG hashes and lengths (`_layout`),
recorded once, so the comparison needs nothing outside the repo.
"""
from __future__ import annotations

import json

from conftest import FIXTURES

REFERENCE_LAYOUT = FIXTURES / "REFERENCE_LAYOUT.json"


def _layout(manifest: dict) -> dict:
    """A manifest less the per-image JPEG hashes and lengths (continuation payloads keep their lengths)."""
    def record(r: dict) -> dict:
        return {k: v for k, v in r.items() if not k.startswith("jpeg_") and k != "payload_md5"}

    out = {}
    for name, section in manifest.items():
        out[name] = {k: v for k, v in section.items() if k not in ("records", "first_jpeg_md5")}
        if "records" in section:
            out[name]["records"] = [record(r) for r in section["records"]]
    return out


def test_repo_fixtures_match_reference_layout():
    ours = json.loads((FIXTURES / "MANIFEST.json").read_text())
    assert _layout(ours) == json.loads(REFERENCE_LAYOUT.read_text())
