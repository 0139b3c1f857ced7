"""The benchmark suite the README quotes: every comparison, each side by side in one run.

Runs, one after another, each in its own process (so one's memory and threads never touch the
next), on this machine:

1. **layout** — ``layout_bench.py``: the server's dynamic batching vs. batch size 1 vs. the
   in-process sequential loop (the fixture paper's pages, 16 clients);
2. **ocr** — ``ocr_bench.py``: GOT-OCR2 continuous batching vs. transformers' ``generate``
   one request at a time and on a static batch of 16 (random weights; ``mid`` size on a CPU,
   ``real`` on a GPU);
3. **parse** — ``parse_bench.py``: the parse pipeline vs. RapidOCR's pipeline plus the layout
   model page by page (the 16-page paper, ``text: "ocr"``);
4. **parse_quality** — ``parse_quality.py``: parse output against ground truth (Overall of NID,
   TEDS, MHS) for ragws, pymupdf4llm and opendataloader-pdf, per layout of its own corpus;
5. **fairness** — ``fairness_bench.py``: a bystander's latency next to one client holding 6
   requests in flight, clients served in turn vs. by arrival (layout, line OCR, GOT engine);
6. **openai** — ``openai_bench.py``: GOT-OCR2 tokens/s for 16 streaming clients through
   ``/v1/chat/completions`` vs. the same through the WebSocket.

Prints one table of the headline ratios and writes it to ``--out`` as ``bench.json`` (with each
benchmark's full results) and ``bench.md`` (the table, the machine, the commands).

Example::

    python loadtest/bench.py                          # all six, ~36 minutes on 2 CPU cores
    python loadtest/bench.py --only ocr,parse --out /tmp/bench
    python loadtest/bench.py --device cuda            # GPU: real-size GOT-OCR2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import cpu_name, log  # noqa: E402

BENCHES = ("layout", "ocr", "parse", "parse_quality", "fairness", "openai")


def commands(args: argparse.Namespace, out: Path) -> dict[str, list[str]]:
    py = sys.executable
    gpu = args.device == "cuda"
    ocr = [py, str(HERE / "ocr_bench.py"), "--json", str(out / "ocr.json")]
    if gpu:
        ocr += ["--device", "cuda", "--size", "real"]
    layout = [py, str(HERE / "layout_bench.py"), "--clients", "16"]
    return {
        "layout": [*layout, "--json", str(out / "layout.json")],
        "ocr": ocr,
        "parse": [py, str(HERE / "parse_bench.py"), "--json", str(out / "parse.json")],
        "parse_quality": [py, str(HERE / "parse_quality.py"), "--out", str(out)],
        "fairness": [py, str(HERE / "fairness_bench.py"), "--json", str(out / "fairness.json")],
        "openai": [py, str(HERE / "openai_bench.py"), "--json", str(out / "openai.json")],
    }


def headline(name: str, result: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of the summary table for one benchmark's JSON."""
    if name == "layout":
        reference = result["sequential_reference_pages_per_s"]
        rows = [{"comparison": "layout: sequential loop", "value": reference, "unit": "pages/s"}]
        for run in result["results"]:
            if run["clients"] is None:
                continue
            rows.append(
                {
                    "comparison": f"layout: server, {run['config']}, {run['clients']} clients",
                    "value": run["pages_per_s"],
                    "unit": "pages/s",
                    "ratio": run["ratio_vs_sequential"],
                    "vs": "sequential loop",
                }
            )
        return rows
    if name == "ocr":
        seq, static = result["hf_sequential"], result["hf_static_batch"]
        rows = [
            {"comparison": "ocr: HF generate, sequential", "value": seq, "unit": "tok/s"},
            {"comparison": "ocr: HF generate, static batch", "value": static, "unit": "tok/s"},
        ]
        for run in result["ragws"]:
            rows.append(
                {
                    "comparison": f"ocr: ragws, {run['streams']} streams",
                    "value": run["tokens_per_s"],
                    "unit": "tok/s",
                    "ratio": run["tokens_per_s"] / seq,
                    "vs": "HF sequential",
                    "ratio_static": run["tokens_per_s"] / static,
                    "ttft_p50_ms": run["ttft_p50_ms"],
                }
            )
        return rows
    if name == "openai":
        ws, api = result["tokens_per_s"]["websocket"], result["tokens_per_s"]["openai_api"]
        streams = f"{result['streams']} streams"
        return [
            {"comparison": f"OpenAI API: WebSocket, {streams}", "value": ws, "unit": "tok/s"},
            {
                "comparison": f"OpenAI API: /v1/chat/completions, {streams}",
                "value": api,
                "unit": "tok/s",
                "ratio": result["ratio"],
                "vs": "WebSocket",
            },
        ]
    if name == "fairness":
        rows = []
        for queue in result["results"]:
            for way in queue["ways"]:
                if way["way"] == "alone":
                    continue
                policy = "in turn" if way["way"] == "fair" else "by arrival"
                rows.append(
                    {
                        "comparison": f"fair share: {queue['queue']} bystander, "
                        f"{queue['flood']} in flight elsewhere, {policy}",
                        "value": way["median_s"],
                        "unit": "s",
                        "ratio": way["ratio_vs_alone"],
                        "vs": "bystander alone",
                    }
                )
        return rows
    if name == "parse_quality":
        rows = []
        for layout, engines in result["layouts"].items():
            peer = engines.get("pymupdf4llm", {}).get("overall")
            for engine, row in engines.items():
                entry = {
                    "comparison": f"parse quality: {engine}, {layout}",
                    "value": row["overall"],
                    "unit": "Overall",
                }
                if engine != "pymupdf4llm" and peer and row["overall"] is not None:
                    entry |= {"ratio": row["overall"] / peer, "vs": "pymupdf4llm"}
                rows.append(entry)
        return rows
    base, ours = result["baseline"], result["ragws"]
    return [
        {
            "comparison": "parse: RapidOCR + layout, page by page",
            "value": base["pages_per_s"],
            "unit": "pages/s",
        },
        {
            "comparison": "parse: ragws, text=ocr",
            "value": ours["pages_per_s"],
            "unit": "pages/s",
            "ratio": result["ratio"],
            "vs": "RapidOCR + layout",
        },
    ]


def fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(rows: list[dict[str, Any]], machine: str, cmds: dict[str, list[str]]) -> str:
    lines = [
        f"Machine: {machine}. Ratios compare runs made side by side in this invocation and carry",
        "across machines; absolute values are this machine's only.",
        "",
        "| comparison | value | ratio | against |",
        "|---|---|---|---|",
    ]
    for row in rows:
        ratio = fmt(row.get("ratio"))
        if "ratio_static" in row:
            ratio += f" ({fmt(row['ratio_static'])} vs static batch)"
        lines.append(
            f"| {row['comparison']} | {fmt(row['value'])} {row['unit']} | {ratio} "
            f"| {row.get('vs', '')} |"
        )
    lines += ["", "Commands:", ""]
    lines += [
        f"    {' '.join(Path(c).name if i < 2 else c for i, c in enumerate(cmd))}"
        for cmd in cmds.values()
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument(
        "--only",
        type=lambda s: [b for b in s.split(",") if b],
        default=list(BENCHES),
        help="comma-separated subset of " + ",".join(BENCHES),
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args(argv)
    unknown = set(args.only) - set(BENCHES)
    if unknown:
        parser.error(f"--only: unknown benchmark(s) {', '.join(sorted(unknown))}")
    args.out.mkdir(parents=True, exist_ok=True)
    cmds = {name: cmd for name, cmd in commands(args, args.out).items() if name in args.only}
    results: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    for name, cmd in cmds.items():
        log(f"== {name}: {' '.join(cmd[1:])}")
        started = time.perf_counter()
        subprocess.run(cmd, check=True)
        log(f"== {name} done in {time.perf_counter() - started:.0f} s")
        results[name] = json.loads((args.out / f"{name}.json").read_text())
        rows += headline(name, results[name])
    machine = cpu_name() if args.device == "cpu" else results.get("ocr", {}).get("device", "GPU")
    table = markdown(rows, machine, cmds)
    (args.out / "bench.md").write_text(table)
    (args.out / "bench.json").write_text(
        json.dumps({"machine": machine, "rows": rows, "results": results}, indent=2)
    )
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
