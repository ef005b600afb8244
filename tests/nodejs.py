"""Node.js for the tests that drive JavaScript clients (tus-js-client under Node, and in
Chromium through playwright-core): `tests/js` with exactly the packages its package.json pins,
installed by `npm ci` when what is installed differs. A missing node or npm fails the test
(it never skips)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

JS_DIR = Path(__file__).resolve().parent / "js"
NPM_TIMEOUT = 180
MIN_NODE_MAJOR = 18


def _versions() -> tuple[dict[str, str], dict[str, str | None]]:
    """(what package.json pins, what node_modules holds) per package."""
    manifest = json.loads((JS_DIR / "package.json").read_text())
    pinned = {**manifest.get("dependencies", {}), **manifest.get("devDependencies", {})}
    installed: dict[str, str | None] = {}
    for name in pinned:
        p = JS_DIR / "node_modules" / name / "package.json"
        installed[name] = str(json.loads(p.read_text())["version"]) if p.exists() else None
    return pinned, installed


def node_with_packages(purpose: str) -> str:
    """The node executable, once `tests/js` holds the pinned packages."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail(f"Node.js (>= {MIN_NODE_MAJOR}) and npm are needed for {purpose}",
                    pytrace=False)  # fmt: skip
    major = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30)
    assert int(major.stdout.strip().lstrip("v").split(".")[0]) >= MIN_NODE_MAJOR, major.stdout
    pinned, installed = _versions()
    if installed != pinned:
        p = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=JS_DIR, capture_output=True, text=True, timeout=NPM_TIMEOUT,
        )  # fmt: skip
        if p.returncode != 0:
            pytest.fail(f"npm ci in {JS_DIR} failed:\n{p.stdout}\n{p.stderr}", pytrace=False)
        pinned, installed = _versions()
    assert installed == pinned
    return node
