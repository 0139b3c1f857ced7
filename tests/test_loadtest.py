"""The load script against a real server on loopback: bounded runs, summaries, charts."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """Import a script from loadtest/ (not a package) under a private module name."""
    module_name = f"_ragws_loadtest_{name}"
    spec = importlib.util.spec_from_file_location(module_name, ROOT / "loadtest" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.fixture(scope="module")
def run_script():
    return load_script("run")


async def test_layout_run_writes_summary_timeline_and_chart(
    start_server, paper_pdf, run_script, tmp_path
):
    server = await start_server()
    url = server.url.replace("http://", "ws://") + "/ws"
    args = ["layout", "--url", url, "--users", "3", "--spawn-rate", "6", "--duration", "3"]
    await asyncio.to_thread(run_script.main, [*args, "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["failures"] == 0 and summary["requests"] >= 3
    assert summary["p50_ms"] <= summary["p95_ms"] <= summary["p99_ms"]
    assert summary["rps"] > 0
    served = await server.metric("ragws_requests_total", {"type": "layout", "outcome": "ok"})
    assert served == summary["requests"]
    timeline = json.loads((tmp_path / "timeline.json").read_text())
    assert sum(row["rps"] for row in timeline) == summary["requests"]
    assert max(row["users"] for row in timeline) == 3
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


async def test_disconnect_run_leaves_nothing_in_flight(
    start_server, paper_pdf, run_script, tmp_path
):
    # paper_pdf: the run reads the shared fixtures, so it skips (with a reason) without them.
    server = await start_server(ocr_line_batch_size=4)
    url = server.url.replace("http://", "ws://") + "/ws"
    args = ["disconnect", "--url", url, "--users", "6", "--spawn-rate", "20", "--duration", "60"]
    await asyncio.to_thread(
        run_script.main, [*args, "--requests", "40", "--cut-tokens", "3", "--out", str(tmp_path)]
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["requests"] == 40
    after = summary["server_after"]
    assert after["ragws_inflight_requests"] == 0 and after["ragws_ocr_running"] == 0
    assert after["ragws_kv_slots_used"] == 0
    cancelled = await server.metric("ragws_requests_total", {"type": "ocr", "outcome": "cancelled"})
    assert cancelled > 0  # sockets really closed mid-stream


def test_only_loopback_is_loaded(run_script, tmp_path):
    with pytest.raises(SystemExit, match="loopback"):
        run_script.main(["layout", "--url", "ws://192.0.2.1:7088/ws", "--out", str(tmp_path)])
