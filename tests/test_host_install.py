"""`mtp-mcp install HOST`: merges an mtp-mcp entry into each host's JSON configuration, keeps a backup, refuses to
clobber, leaves invalid files alone. Only temp files: HOME points at a temp dir, so no real configuration is read."""

import json
import sys

import pytest

from mtp_mcp.cli import main
from mtp_mcp.server.host_install import HOSTS


@pytest.fixture(autouse=True)
def temp_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("APPDATA", str(home / "AppData"))
    return home


def entry_of(path, name="mtp-mcp"):
    return json.loads(path.read_text())["mcpServers"][name]


@pytest.mark.parametrize("host", list(HOSTS))
def test_a_new_entry_runs_this_environments_mtp_mcp_with_the_options_given(host, temp_home, tmp_path, capsys):
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")
    assert main(["install", host, "--model", str(model), "--drafter", "ngram", "--num-draft-tokens", "3"]) == 0
    path = HOSTS[host].config_path()
    assert str(path).startswith(str(temp_home))  # the host's own file, for this (temp) user
    entry = entry_of(path)
    args = entry["args"]
    # Options not given (--device, ...) stay out: serve's own defaults apply.
    assert args[args.index("serve"):] == ["serve", "--model", str(model), "--drafter", "ngram", "--num-draft-tokens", "3"]
    assert entry["command"].endswith("/mtp-mcp") or (entry["command"] == sys.executable and args[:2] == ["-m", "mtp_mcp"])
    assert entry.get("type") == ("stdio" if host == "claude-code" else None)
    assert str(path) in capsys.readouterr().out


def test_other_servers_and_settings_stay_and_a_backup_is_kept(tmp_path, capsys):
    config = tmp_path / ".claude.json"
    original = {"numStartups": 7, "projects": {"/x": {"allowedTools": []}},
                "mcpServers": {"other": {"type": "stdio", "command": "other-server", "args": []}}}
    config.write_text(json.dumps(original))
    assert main(["install", "claude-code", "--config", str(config)]) == 0
    written = json.loads(config.read_text())
    assert written["numStartups"] == 7 and written["projects"] == original["projects"]
    assert written["mcpServers"]["other"] == original["mcpServers"]["other"]
    assert written["mcpServers"]["mtp-mcp"]["args"][-1] == "serve"
    (backup,) = tmp_path.glob(".claude.json.*.bak")
    assert json.loads(backup.read_text()) == original
    assert str(backup) in capsys.readouterr().out


def test_an_mtp_mcp_entry_is_updated_and_an_unchanged_one_left_alone(tmp_path, capsys):
    config = tmp_path / "mcp.json"
    assert main(["install", "cursor", "--config", str(config)]) == 0
    assert main(["install", "cursor", "--config", str(config), "--drafter", "none"]) == 0
    assert entry_of(config)["args"][-2:] == ["--drafter", "none"]
    assert "updated" in capsys.readouterr().out
    before = config.read_text()
    assert main(["install", "cursor", "--config", str(config), "--drafter", "none"]) == 0
    assert config.read_text() == before and "nothing changed" in capsys.readouterr().out


def test_another_servers_entry_of_the_same_name_is_kept_unless_forced(tmp_path, capsys):
    config = tmp_path / "claude_desktop_config.json"
    config.write_text(json.dumps({"mcpServers": {"mtp-mcp": {"command": "npx", "args": ["something-else"]}}}))
    before = config.read_text()
    assert main(["install", "claude-desktop", "--config", str(config)]) == 2
    assert "not mtp-mcp" in capsys.readouterr().err and config.read_text() == before
    assert main(["install", "claude-desktop", "--config", str(config), "--name", "mtp-local"]) == 0
    assert entry_of(config, "mtp-mcp")["command"] == "npx" and "mtp-local" in json.loads(config.read_text())["mcpServers"]
    assert main(["install", "claude-desktop", "--config", str(config), "--force"]) == 0
    assert entry_of(config)["command"] != "npx"


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"mcpServers": []}'])
def test_a_file_that_is_not_an_mcp_configuration_is_left_untouched(content, tmp_path, capsys):
    config = tmp_path / "mcp.json"
    config.write_text(content)
    assert main(["install", "cursor", "--config", str(config)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "left untouched" in error
    assert config.read_text() == content and not list(tmp_path.glob("*.bak"))


def test_print_shows_the_entry_and_writes_nothing(temp_home, capsys):
    assert main(["install", "claude-desktop", "--print", "--drafter", "ngram"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["mcpServers"]["mtp-mcp"]["args"][-2:] == ["--drafter", "ngram"]
    assert not any(temp_home.rglob("*.json"))


def test_on_off_options_are_passed_on_as_serve_spells_them(capsys):
    flags = ["--no-prefix-cache", "--no-drafter-memory", "--always-draft"]
    assert main(["install", "claude-desktop", "--print", "--drafter", "suffix", *flags]) == 0
    args = json.loads(capsys.readouterr().out)["mcpServers"]["mtp-mcp"]["args"]
    serve = args[args.index("serve"):]
    assert sorted(serve[3:]) == sorted(flags) and serve[:3] == ["serve", "--drafter", "suffix"]
    from mtp_mcp.cli import build_parser

    assert not build_parser().parse_args(serve).draft_when_it_pays  # serve accepts what install wrote


def test_an_upstream_entry_passes_the_backend_on_and_keeps_the_key_out(capsys, monkeypatch):
    monkeypatch.setenv("MTP_MCP_UPSTREAM_API_KEY", "sk-secret")
    upstream = ["--backend", "openai", "--base-url", "http://gpu-box:8000/v1", "--upstream-model", "qwen"]
    assert main(["install", "claude-desktop", "--print", *upstream]) == 0
    printed = capsys.readouterr().out
    args = json.loads(printed)["mcpServers"]["mtp-mcp"]["args"]
    serve = args[args.index("serve"):]
    assert sorted(serve[1:]) == sorted(upstream) and "sk-secret" not in printed
    from mtp_mcp.cli import build_parser

    assert build_parser().parse_args(serve).base_url == "http://gpu-box:8000/v1"
    assert main(["install", "claude-desktop", "--print", "--backend", "openai"]) == 2
    assert "needs --base-url" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a key is not written into a host's file
        main(["install", "claude-desktop", "--print", *upstream, "--api-key", "sk-secret"])


def test_bad_serve_options_are_refused_before_anything_is_written(tmp_path, capsys):
    config = tmp_path / "mcp.json"
    assert main(["install", "cursor", "--config", str(config), "--model", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err and not config.exists()


def test_a_relative_model_path_is_written_absolute(tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "mcp.json"
    assert main(["install", "cursor", "--config", str(config), "--model", "models/m.gguf"]) == 0
    args = entry_of(config)["args"]
    assert args[args.index("--model") + 1] == str(tmp_path / "models" / "m.gguf")
