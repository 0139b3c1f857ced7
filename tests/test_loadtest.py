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


def inputs(folder: Path) -> list[str]:
    """``--inputs`` for the written documents: the paper, then the images OCR reads."""
    return ["--inputs", *(str(folder / n) for n in ("paper.pdf", "table1.png", "title.png"))]


def read_written(monkeypatch: pytest.MonkeyPatch, module: object, folder: Path) -> None:
    """Point a script without an ``--inputs`` option (soak, overload) at the written
    documents, in place of the shared fixtures folder it reads by default."""
    monkeypatch.setattr(module, "FIXTURES", folder)
    monkeypatch.setattr(module, "PAPER", folder / "paper.pdf")


async def test_layout_run_writes_summary_timeline_and_chart(
    start_server, documents_dir, run_script, tmp_path
):
    server = await start_server()
    url = server.url.replace("http://", "ws://") + "/ws"
    args = ["layout", "--url", url, "--users", "3", "--spawn-rate", "6", "--duration", "3"]
    await asyncio.to_thread(
        run_script.main, [*args, *inputs(documents_dir), "--out", str(tmp_path)]
    )
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
    start_server, documents_dir, run_script, tmp_path
):
    server = await start_server(ocr_line_batch_size=4)
    url = server.url.replace("http://", "ws://") + "/ws"
    args = ["disconnect", "--url", url, "--users", "6", "--spawn-rate", "20", "--duration", "60"]
    args += [*inputs(documents_dir), "--requests", "40", "--cut-tokens", "3"]
    await asyncio.to_thread(run_script.main, [*args, "--out", str(tmp_path)])
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


# --- soak.py and overload.py: each starts a server of its own in a subprocess ------------------


@pytest.fixture(scope="module")
def soak_script():
    return load_script("soak")


@pytest.fixture(scope="module")
def overload_script():
    return load_script("overload")


def test_short_soak_settles_and_reports(soak_script, documents_dir, monkeypatch, tmp_path):
    # The RSS target is not asserted: 15 s says nothing about growth, the 10-minute
    # benchmark does. What a short run does show: every request ended as the client meant it
    # to, and the server gave back every slot, sequence and socket.
    # soak.py builds its payloads with run.py's Inputs, which reads run.py's globals.
    read_written(monkeypatch, sys.modules[soak_script.Inputs.__module__], documents_dir)
    args = ["--minutes", "0.25", "--users", "3", "--sample-s", "1", "--settle-s", "10"]
    cuts = ["--cancel-fraction", "0.2", "--disconnect-fraction", "0.2"]
    soak_script.main([*args, *cuts, "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    requests = summary["requests"]
    assert requests["total"] >= 10 and requests["by_action"]["complete"]["ok"] > 0
    assert set(requests["errors"]) <= {"overloaded"}, requests["errors"]
    assert requests["failures"] == 0 and requests["stray_frames"] == {}
    assert summary["gauges_after"] and not any(summary["gauges_after"].values())
    verdict = summary["verdict"]
    assert {"rss_growth", "gauges_zero", "no_errors", "pass"} <= set(verdict)
    assert verdict["gauges_zero"]["pass"] and verdict["no_errors"]["pass"]
    rss = summary["rss"]
    assert rss["samples"] >= 5 and rss["peak_mib"] >= max(rss["warmup_mib"], rss["end_mib"]) > 0
    samples = json.loads((tmp_path / "samples.json").read_text())
    assert samples[-1]["phase"] == "end" and samples[-1]["requests"] == requests["total"]
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["server"]["exit_code"] == 0  # SIGTERM with nothing in flight: a clean exit


def test_overload_rejects_excess_fast_and_every_rejection_comes_back(
    overload_script, documents_dir, monkeypatch, tmp_path
):
    read_written(monkeypatch, overload_script, documents_dir)
    args = ["--max-concurrent", "2", "--factor", "5", "--duration", "3", "--warmup-s", "1"]
    overload_script.main([*args, "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["max_concurrent"] == 2  # passed through to the spawned server
    assert summary["admitted"] > 0 and summary["rejected"] > 0
    assert set(summary["errors"]) == {"overloaded"} and summary["unanswered"] == 0
    # Every refusal the server counted reached a user, and no other.
    assert summary["rejected_by_server"] == summary["rejected"]
    assert summary["phases"]["overload"]["rejected"] > 0
    assert summary["rejection_ms"]["p50"] is not None
    assert not any(summary["gauges_after"].values())
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("script", ["soak", "overload"])
def test_new_scripts_load_only_loopback_and_keep_server_flags_for_their_own(script, tmp_path):
    main = load_script(script).main
    with pytest.raises(SystemExit, match="loopback"):
        main(["--url", "ws://192.0.2.1:7088/ws", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--port"):
        main(["--out", str(tmp_path), "--", "--port", "7088"])
