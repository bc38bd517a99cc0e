"""Scenario files: parse and validate TOML scenarios, with errors that name the file and the field."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .spec import Scenario, ScenarioError

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib  # type: ignore[no-redef]

#: Scenario files shipped with the repository (top-level ``simulations/``).
REPO_SCENARIO_DIR = Path(__file__).resolve().parents[3] / "simulations"


def _is_tag(part: Any) -> bool:
    """Union-member / validator tags that pydantic puts into error locations."""
    return isinstance(part, str) and ("[" in part or part.startswith(("constrained-", "function-")) or part in ("int", "str", "float", "bool", "list"))


def _format_errors(err: ValidationError) -> str:
    lines: list[str] = []
    errors = [(".".join(str(p) for p in e["loc"] if not _is_tag(p)), e) for e in err.errors()]
    for loc, e in errors:
        # in a union (e.g. ``severity``: int or list of ints) drop the "wrong type" complaint of the
        # branch that does not apply when the other branch reports a real problem
        if e["type"].endswith("_type") and any(
            o is not e and (lo == loc or lo.startswith(loc + ".")) for lo, o in errors
        ):
            continue
        msg = str(e["msg"])
        if e["type"] == "extra_forbidden":
            msg = "unknown field (not allowed)"
        elif e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
            if not loc and ": " in msg:  # model-level checks start their message with the field name
                loc, msg = msg.split(": ", 1)
        elif e["type"] != "missing" and not isinstance(e.get("input"), dict):
            msg += f" (got {e['input']!r})"
        line = f"  {loc or '<scenario>'}: {msg}"
        if line not in lines:
            lines.append(line)
    return "\n".join(lines)


def parse_scenario(data: dict[str, Any], source: str = "<dict>") -> Scenario:
    """Validate a scenario mapping; errors name ``source`` and every bad field."""
    try:
        return Scenario.model_validate(data)
    except ValidationError as err:
        raise ScenarioError(f"invalid scenario {source}:\n{_format_errors(err)}") from None


def load_scenario(path: str | os.PathLike[str]) -> Scenario:
    """Read and validate a scenario TOML file.

    >>> from streamtta.simulations.scenario import REPO_SCENARIO_DIR, load_scenario
    >>> load_scenario(REPO_SCENARIO_DIR / "quickstart.toml").name
    'quickstart'
    """
    p = Path(path)
    if not p.is_file():
        raise ScenarioError(f"scenario file not found: {p}")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ScenarioError(f"invalid TOML in scenario {p}: {err}") from None
    return parse_scenario(data, str(p))


def list_scenarios(directory: str | os.PathLike[str] | None = None) -> list[Path]:
    """Scenario files in ``directory`` (default: the repository's ``simulations/``)."""
    d = Path(directory) if directory is not None else REPO_SCENARIO_DIR
    return sorted(d.glob("*.toml")) if d.is_dir() else []


def find_scenario(name_or_path: str | os.PathLike[str]) -> Scenario:
    """Load a scenario by path, or by name from ``./simulations/`` then the repository's folder (each with its
    ``heldout/`` subfolder: the held-out scenarios, never used for tuning)."""
    p = Path(name_or_path)
    if p.is_file():
        return load_scenario(p)
    stem = p.name[:-5] if p.name.endswith(".toml") else p.name
    for d in (Path.cwd() / "simulations", Path.cwd() / "simulations" / "heldout", REPO_SCENARIO_DIR,
              REPO_SCENARIO_DIR / "heldout"):
        cand = d / f"{stem}.toml"
        if cand.is_file():
            return load_scenario(cand)
    known = sorted({q.stem for q in list_scenarios() + list_scenarios(REPO_SCENARIO_DIR / "heldout")})
    raise ScenarioError(f"no scenario {str(name_or_path)!r}; built-in scenarios: {known}")

