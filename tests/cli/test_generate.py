"""The main job end to end through the CLI: quantize the real stories260K model, generate a story."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _anyquant(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "anyquant", *args], capture_output=True, text=True, timeout=300, env=env
    )


def test_quantize_then_generate_a_story(stories: Path, tmp_path: Path) -> None:
    dst = tmp_path / "w4a16"
    q = _anyquant(
        "quantize",
        str(stories / "hf"),
        str(dst),
        "--format",
        "compressed-tensors",
        "--scheme",
        "W4A16",
        "--group-size",
        "32",
    )
    assert q.returncode == 0, q.stderr
    assert "30 layers quantized" in q.stdout and "5 left unquantized" in q.stdout
    g = _anyquant("generate", str(dst), "--prompt", "Once upon a time", "--max-tokens", "40")
    assert g.returncode == 0, g.stderr
    story = g.stdout.split("\n[")[0]
    assert story.startswith("Once upon a time, there was")
    words = story.split()
    assert len(words) >= 25 and sum(w.strip(".,!\"'").isalpha() for w in words) >= 0.9 * len(words)


def test_generate_reports_errors_without_traceback(tmp_path: Path) -> None:
    g = _anyquant("generate", str(tmp_path), "--prompt", "x")
    assert g.returncode == 2 and "Traceback" not in g.stderr and "config.json" in g.stderr


def test_generate_chat_uses_the_chat_template_file(tmp_path: Path) -> None:
    from anyquant.utils.tiny_model import write_tiny_model

    model = write_tiny_model(tmp_path / "m", "llama")
    template = tmp_path / "mine.jinja"
    template.write_text("{{ raise_exception('rendered by mine.jinja') }}")
    g = _anyquant("generate", str(model), "--prompt", "x", "--chat", "--chat-template", str(template))
    assert g.returncode == 2 and "rendered by mine.jinja" in g.stderr and "Traceback" not in g.stderr
    template.write_text("[{{ messages[0].content }}]")
    g = _anyquant(
        "generate",
        str(model),
        "--prompt",
        "x",
        "--chat",
        "--chat-template",
        str(template),
        "--max-tokens",
        "2",
    )
    assert g.returncode == 0, g.stderr
