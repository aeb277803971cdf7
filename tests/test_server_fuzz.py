"""Schema-driven fuzzing (schemathesis) of the server's OpenAPI schema on 127.0.0.1: no request gets a 5xx.

Bounded: a fixed number of examples per operation and a time budget, so it fits CI; the schema's request bodies
(edge/server/openapi.py) are what makes the generated requests reach the handlers at all.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("schemathesis")

from tests.live_server import HardenedServer  # noqa: E402

EXAMPLES_PER_OPERATION = 25
TIME_BUDGET_S = 150  # the whole run (schemathesis --max-time); a full run here took 241 s with 40 examples


@pytest.mark.slow
def test_fuzz_openapi_no_server_errors(golden_bundle, tmp_path):
    from edge.server.settings import ServerSettings

    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or shutil.which("schemathesis")
    if cli is None:
        pytest.skip("the schemathesis command is not installed (pip install -e '.[dev]')")
    srv = HardenedServer(ServerSettings(bundle=str(golden_bundle.root), max_tokens=8, max_queue=64))
    try:
        r = subprocess.run([cli, "run", f"{srv.url}/openapi.json", "--checks", "not_a_server_error",
                            "--max-examples", str(EXAMPLES_PER_OPERATION), "--max-time", str(TIME_BUDGET_S),
                            "--workers", "1", "--seed", "19", "--request-timeout", "120", "--no-color"],
                           capture_output=True, text=True, timeout=TIME_BUDGET_S + 300, cwd=tmp_path)
    finally:
        srv.stop()
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    import re

    assert re.search(r"Selected: 6/6\s+Tested: 6", out), out[-3000:]  # every operation, the 3 POSTs included
    m = re.search(r"(\d+) generated, (\d+) passed", out)
    assert m and int(m.group(1)) == int(m.group(2)) >= 100, out[-3000:]
