"""The distribution installs one top-level package, mtp_mcp; the layers import downward only; the command line and
the server's MCP side import no torch."""

import ast
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w",
                    str(out), str(REPO)], check=True, cwd=out)
    (built,) = out.glob("mtp_mcp-*.whl")
    return built


def test_the_wheel_holds_only_the_mtp_mcp_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {"mtp_mcp", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}
    for expected in ("mtp_mcp/cli.py", "mtp_mcp/engine/engine.py", "mtp_mcp/engine/drafters/base.py",
                     "mtp_mcp/server/app.py", "mtp_mcp/benchmarks/llama_cpp_runner.mjs",
                     "mtp_mcp/benchmarks/workloads/code/queue.py"):
        assert expected in names


def test_the_wheel_installs_into_a_fresh_venv_and_imports_only_under_its_namespace(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--quiet",
                    str(wheel)], check=True)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True).stdout.strip())
    assert not {"engine", "server", "benchmarks"} & {entry.name for entry in site.iterdir()}

    # The dependencies (torch, transformers, ...) come from the test environment's site-packages; a PYTHONPATH entry
    # does not run .pth files, so this checkout's editable install is not visible there.
    env = os.environ | {"PYTHONPATH": sysconfig.get_path("purelib")}
    check = (
        "import importlib.util, mtp_mcp, mtp_mcp.server.app, mtp_mcp.engine.engine, mtp_mcp.benchmarks.bench\n"
        f"assert mtp_mcp.__file__.startswith({str(site)!r}), mtp_mcp.__file__\n"
        "assert all(importlib.util.find_spec(name) is None for name in ('engine', 'server', 'benchmarks'))\n"
    )
    subprocess.run([str(python), "-c", check], check=True, cwd=tmp_path, env=env)
    for command in ([str(venv / "bin" / "mtp-mcp"), "--help"], [str(python), "-m", "mtp_mcp", "serve", "--help"]):
        run = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env)
        assert run.returncode == 0 and "usage: mtp-mcp" in run.stdout, run.stderr


def test_the_command_line_the_mcp_side_and_the_upstream_backend_do_not_import_torch():
    check = (
        "import sys, mtp_mcp.cli, mtp_mcp.server.app, mtp_mcp.engine, mtp_mcp.engine.openai_upstream\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", check], check=True, cwd=REPO.parent)


# From the bottom: engine, server (the MCP tools over the engine), benchmarks (which replay agent traces through the
# server), the command line.
@pytest.mark.parametrize(("layer", "must_not_import"), [
    ("engine", ("mtp_mcp.server", "mtp_mcp.benchmarks", "mtp_mcp.cli")),
    ("server", ("mtp_mcp.benchmarks", "mtp_mcp.cli")),
    ("benchmarks", ("mtp_mcp.cli",)),
])
def test_layers_import_downward_only(layer, must_not_import):
    for source in (REPO / layer).rglob("*.py"):
        if "workloads" in source.parts:
            continue
        for node in ast.walk(ast.parse(source.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert not name.startswith(must_not_import), f"{source.relative_to(REPO)} imports {name}"
