"""A reduced soak (scripts/soak.py): mixed jobs at concurrency through the local endpoint and a
real worker, over rounds; every job final, none lost, duplicated or mixed up."""

from __future__ import annotations

import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow


def test_reduced_soak(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    from soak import run_soak

    lines: list[str] = []
    rounds = run_soak(jobs=60, concurrency=16, rounds=2, malformed_share=0.15,
                      endpoint_args=["--stream-post-delay-ms", "30"],
                      log_path=tmp_path / "endpoint.log", report=lines.append)
    assert len(rounds) == 2
    for r in rounds:
        assert len(r.outcomes) == 60
        assert not r.problems(), "\n".join(lines)
        kinds = {o.kind for o in r.outcomes}
        assert {"native", "native-stream", "openai", "openai-stream", "malformed"} <= kinds
