"""The README's Python section runs as written."""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks(section: str) -> list[str]:
    text = README.read_text()
    start = text.index(f"## {section}")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end if end > 0 else None], re.S)


def test_use_it_from_python_section_runs(capsys):
    blocks = python_blocks("Use it from Python")
    assert len(blocks) == 3
    ns: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), ns)
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) >= 6
    assert ns["acc"] > 0.6  # adapted predictions on severe noise beat chance by far
    assert ns["res"].predictions.shape == (1,) and len(ns["pipe"].classes) == 3
    assert ns["per_stream"].batch_index == 1 and ns["template"].batch_index == 0


def fenced_blocks(section: str) -> list[tuple[str, str]]:
    """``(language, code)`` of the section's python and bash blocks, in order."""
    text = README.read_text()
    start = text.index(f"## {section}")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```(python|bash)\n(.*?)```", text[start:end if end > 0 else None], re.S)


def test_bring_your_own_model_recipe_runs(embedded_broker, unique_name, tmp_path, monkeypatch, capsys):
    """Every block of the recipe, in order, in a fresh folder: `# name.py` blocks are written as files,
    python blocks run as a script there, `streamtta ...` lines run as commands against the embedded broker
    (stopping at the end of the topic, and writing their run folders under runs/)."""
    import json
    import shlex
    import sys

    import numpy as np
    import torch

    from streamtta import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # as `python script.py` run in that folder
    bs = embedded_broker.bootstrap_servers

    def local(code: str) -> str:
        return code.replace("localhost:9092", bs).replace('"sensors"', repr(unique_name)).replace(
            "--topic sensors", f"--topic {unique_name}").replace("--group-id sensors", f"--group-id {unique_name}")

    ns: dict = {}
    results: dict[str, int] = {}
    try:
        for lang, code in fenced_blocks("Bring your own model"):
            first = code.splitlines()[0]
            if lang == "python" and first.startswith("# ") and first.endswith(".py"):
                (tmp_path / first[2:]).write_text(code)
            elif lang == "python":
                exec(compile(local(code), str(README), "exec"), ns)
            else:
                for line in local(code).splitlines():
                    argv = shlex.split(line)
                    assert argv[0] == "streamtta", line
                    extra = ["--set", "kafka.stop_at_end=true", "--output-dir", "runs"] if argv[1] == "run" else []
                    results[line] = cli.main([*argv[1:], *extra, "--no-progress"])
    finally:
        sys.modules.pop("sensor", None)
    out = " ".join(capsys.readouterr().out.split())
    assert set(results.values()) == {0} and len(results) == 3
    assert "labelled" in out and (tmp_path / "sensor.calib.npz").is_file()
    x, y = ns["x_stream"], ns["y_stream"]
    known = y < 3
    with torch.no_grad():
        source_acc = 100 * float((ns["net"](torch.from_numpy(x)).argmax(1).numpy() == y)[known].mean())
    run_dirs = sorted((tmp_path / "runs").iterdir(), key=lambda d: (d / "manifest.json").stat().st_mtime)
    assert len(run_dirs) == 2
    figures = []
    for run_dir in run_dirs:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        s, calibration = metrics["summary"], metrics["stats"]["calibration"]
        assert metrics["stats"]["samples"] == len(x) and "1000 samples" in calibration and "labelled" in calibration
        assert s["acc"] >= source_acc, (run_dir, s["acc"], source_acc)  # adapted: at least the source model
        figures.append(s["auroc"])
    assert "sensor.calib.npz" in json.loads((run_dirs[0] / "metrics.json").read_text())["stats"]["calibration"]
    assert figures[0] >= 85.0  # the factory model tells the unknown machine state apart
    assert np.asarray(ns["res"].predictions).shape == (64,)  # the Python façade, same model and calibration
    assert figures[1] >= 85.0  # the TorchScript model too (on its exported forward_features)
