"""Settings precedence and validation, and the command line as a user runs it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from ragws.cli import build_parser
from ragws.config import ConfigError, Settings, load_settings, setting_fields

ROOT = Path(__file__).resolve().parents[1]


def test_precedence_file_then_env_then_flags(tmp_path):
    config = tmp_path / "ragws.toml"
    config.write_text('port = 9000\nmax_concurrent = 7\nlayout_batch_size = 4\nhost = "0.0.0.0"\n')
    settings = load_settings(
        {"port": "9100", "host": None},
        config_path=config,
        environ={"RAGWS_PORT": "9050", "RAGWS_MAX_CONCURRENT": "9"},
    )
    assert settings.port == 9100  # flag beats env and file
    assert settings.max_concurrent == 9  # env beats file
    assert settings.layout_batch_size == 4  # file beats default
    assert settings.host == "0.0.0.0"  # a flag left unset does not override
    assert settings.max_pages == Settings().max_pages


def test_default_config_file_is_read_from_cwd(tmp_path, monkeypatch):
    (tmp_path / "config.toml").write_text("max_wait_ms = 3.5\n")
    monkeypatch.chdir(tmp_path)
    assert load_settings({}, environ={}).max_wait_ms == 3.5


def test_repo_config_toml_is_valid_and_matches_defaults(monkeypatch):
    monkeypatch.chdir(ROOT)
    assert load_settings({}, environ={}) == Settings()


@pytest.mark.parametrize(
    ("cli", "env", "needle"),
    [
        ({"max_concurrent": "0"}, {}, "max_concurrent"),
        ({"port": "70000"}, {}, "port"),
        ({}, {"RAGWS_PORT": "eighty"}, "RAGWS_PORT"),
        ({"device": "tpu"}, {}, "device"),
        ({"log_level": "loud"}, {}, "log_level"),
        ({"layout_batch_size": "4", "layout_preferred_batch_size": "8"}, {}, "preferred"),
        ({"layout_model": "/nope/model.onnx"}, {}, "layout_model"),
        ({"layout_model": "yolo11"}, {}, "layout_model"),
        ({"ocr_model": "tesseract"}, {}, "ocr_model"),
        ({"max_wait_ms": "-1"}, {}, "max_wait_ms"),
        ({"max_image_pixels": "10"}, {}, "max_image_pixels"),
    ],
)
def test_invalid_settings_name_the_setting(cli, env, needle):
    with pytest.raises(ConfigError, match=needle):
        load_settings(cli, environ=env)


def test_unknown_and_bad_config_file(tmp_path):
    bad_key = tmp_path / "a.toml"
    bad_key.write_text("max_concurency = 5\n")
    with pytest.raises(ConfigError, match=r"max_concurency.*unknown"):
        load_settings({}, config_path=bad_key, environ={})
    broken = tmp_path / "b.toml"
    broken.write_text("port = = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings({}, config_path=broken, environ={})
    with pytest.raises(ConfigError, match="no such file"):
        load_settings({}, config_path=tmp_path / "missing.toml", environ={})


def test_help_lists_every_setting_with_default_and_env():
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    text = serve.format_help().replace("\n", " ")
    text = " ".join(text.split())
    for f in setting_fields():
        assert "--" + f.name.replace("_", "-") in text
        assert f"env RAGWS_{f.name.upper()}" in text
        assert f"default: {f.default}" in text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_python_m_ragws_serves_and_stops_on_sigterm(tmp_path):
    port = _free_port()
    env = {**os.environ, "RAGWS_LAYOUT_PREFERRED_BATCH_SIZE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ragws", "serve", "--port", str(port), "--log-level", "info"],
        cwd=tmp_path,  # no config.toml here: defaults + env + flags
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        health = None
        while time.monotonic() < deadline and health is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    health = json.load(r)
            except OSError:
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                time.sleep(0.3)
        assert health is not None, "server did not come up within 60 s"
        assert health["status"] == "ok" and health["models"]["layout"] == "embedded"
        assert health["device"] == "cpu"
        proc.terminate()
        output, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, output
        assert f"ready on http://127.0.0.1:{port}" in output
    finally:
        if proc.poll() is None:
            proc.kill()


def test_invalid_flag_fails_at_start_up_naming_it():
    proc = subprocess.run(
        [sys.executable, "-m", "ragws", "serve", "--layout-batch-size", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "layout_batch_size" in proc.stderr


def test_console_script_is_installed():
    proc = subprocess.run(["ragws", "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("ragws ")


def test_json_log_lines_carry_request_fields(capsys):
    import logging

    from ragws.logs import configure_logging

    configure_logging("info", "json")
    try:
        logging.getLogger("ragws.serving.session").info(
            "request layout 'a' on peer: ok in 3.0 ms",
            extra={"event": "request", "request_id": "a", "type": "layout", "outcome": "ok"},
        )
        line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    finally:
        configure_logging("warning", "text")
    assert line["event"] == "request" and line["request_id"] == "a"
    assert line["outcome"] == "ok" and line["level"] == "info"
    assert line["time"].endswith("Z")


def _serve_fails(tmp_path, *flags: str, env: dict[str, str] | None = None) -> tuple[str, float]:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "ragws", "serve", "--port", "0", *flags],
        cwd=tmp_path,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    return proc.stderr, time.monotonic() - started


def test_a_missing_extra_is_named_with_its_install_command(tmp_path):
    # A torch that cannot be imported, as on an install without the extra.
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n"
    )
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    stderr, _ = _serve_fails(tmp_path, "--ocr-model", "got-ocr2", env=env)
    assert "pip install 'ragws[got]'" in stderr and "torch" in stderr


def test_an_unreachable_hub_fails_in_seconds_with_one_message(tmp_path):
    pytest.importorskip("torch")
    # Nothing listens on port 9: the hub is unreachable, and the model is in no cache here.
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    stderr, elapsed = _serve_fails(tmp_path, "--ocr-model", "got-ocr2", env=env)
    assert "cannot be reached" in stderr and "--ocr-model DIR" in stderr, stderr
    assert "Retry" not in stderr and stderr.count("cannot be reached") == 1
    # The check runs before any model loads (the layout model and its batch measurement
    # would take tens of seconds on a loaded machine).
    assert elapsed < 30


@pytest.mark.parametrize("name", ["mineru2.5", "paddleocr-vl", "olmocr-2", "owner/some-ocr_model"])
def test_ocr_model_takes_a_known_name_or_a_hub_id(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "owner/..." is no local path here
    assert Settings(ocr_model=name).ocr_model == name


def test_ocr_model_refuses_a_directory_without_a_checkpoint(tmp_path):
    (tmp_path / "owner" / "model").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"ocr_model.*hub id"):
        Settings(ocr_model=str(tmp_path / "owner" / "model"))


def test_a_known_vlm_with_the_hub_unreachable_fails_naming_its_repository(tmp_path):
    pytest.importorskip("torch")
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    stderr, elapsed = _serve_fails(tmp_path, "--ocr-model", "mineru2.5", env=env)
    assert "opendatalab/MinerU2.5-2509-1.2B" in stderr and "cannot be reached" in stderr, stderr
    assert "huggingface-cli download opendatalab/MinerU2.5-2509-1.2B" in stderr
    # The check runs before any model loads (the layout model and its batch measurement
    # would take tens of seconds on a loaded machine).
    assert elapsed < 30
