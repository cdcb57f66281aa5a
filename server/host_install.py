"""`mtp-mcp install HOST`: add this server to an MCP host's configuration, the way `fastmcp install` does.

Each host keeps its servers under "mcpServers" in a JSON file: name -> {command, args, env}. The entry written
starts this environment's own `mtp-mcp` by absolute path (hosts do not run with the user's shell PATH or venv) with
`serve` and the engine options given here. The file is merged, never replaced: other keys and other servers stay as
they were, a backup of the previous file is kept beside it, and the write is atomic. An entry of the same name that
is not an mtp-mcp server is left alone unless --force; a file that is not valid JSON is left untouched.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mtp_mcp.engine.errors import InvalidRequestError
from mtp_mcp.engine.options import EngineOptions
from mtp_mcp.server.cli import add_upstream_arguments, checked_backend_options

DEFAULT_SERVER_NAME = "mtp-mcp"
# Options of `install` that are about the installing, not passed on to `serve`.
_INSTALL_ONLY = {"host", "config", "name", "print", "force", "run", "command", "flag_options"}


@dataclass(frozen=True, slots=True)
class Host:
    name: str
    description: str
    config_path: Callable[[], Path]
    entry_type: str | None = None  # Claude Code wants "type": "stdio" in each entry


def _claude_desktop_config() -> Path:
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "Claude" / "claude_desktop_config.json"
    if sys.platform == "win32":
        return Path(os.environ.get("APPDATA", Path.home() / "AppData" / "Roaming")) / "Claude" / \
            "claude_desktop_config.json"
    return Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "Claude" / "claude_desktop_config.json"


HOSTS = {
    host.name: host for host in (
        Host("claude-desktop", "Claude Desktop (restart it afterwards)", _claude_desktop_config),
        Host("claude-code", "Claude Code, user scope (~/.claude.json; a project's .mcp.json with --config)",
             lambda: Path.home() / ".claude.json", entry_type="stdio"),
        Host("cursor", "Cursor, all projects (~/.cursor/mcp.json; a project's .cursor/mcp.json with --config)",
             lambda: Path.home() / ".cursor" / "mcp.json"),
    )
}


def add_install_arguments(commands: argparse._SubParsersAction,
                          add_engine_options: Callable[[argparse.ArgumentParser], None]) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "install", help="add this server to an MCP host's configuration",
        description="Writes (or updates) an mtp-mcp entry in the host's MCP configuration: this environment's "
        "mtp-mcp, run as `mtp-mcp serve` with the engine options given here. Other entries and settings stay; the "
        "previous file is kept as a backup beside it.",
    )
    parser.add_argument("host", choices=list(HOSTS), help="; ".join(f"{h.name}: {h.description}" for h in HOSTS.values()))
    parser.add_argument("--config", type=Path, metavar="PATH", help="the configuration file to change (default: the "
                        "host's own, for this user)")
    parser.add_argument("--name", default=DEFAULT_SERVER_NAME, help=f"the server's name in the host "
                        f"(default: {DEFAULT_SERVER_NAME})")
    parser.add_argument("--print", action="store_true", help="print the entry as JSON instead of writing it")
    parser.add_argument("--force", action="store_true", help="replace an entry of the same name even when it is "
                        "not an mtp-mcp server")
    parser.add_argument("--max-queued-requests", type=int, help="passed on to `mtp-mcp serve`")
    add_engine_options(parser)
    add_upstream_arguments(parser, with_key=False)  # the key stays in the environment, not in the host's file
    # Options not given stay None and out of the entry: serve's own defaults stay serve's, so that a later
    # version's better default reaches this entry too.
    # How to pass each on/off option given (--no-prefix-cache, --always-draft ...) back to serve.
    flags = {action.dest: action.option_strings[0] for action in parser._actions
             if isinstance(action, argparse._StoreFalseAction | argparse._StoreTrueAction)
             and action.dest not in _INSTALL_ONLY}
    parser.set_defaults(**{action.dest: None for action in parser._actions
                           if action.dest not in _INSTALL_ONLY and action.dest != "help"})
    parser.set_defaults(run=run_install, flag_options=flags)
    return parser


def run_install(args: argparse.Namespace) -> int:
    host = HOSTS[args.host]
    # An entry that cannot start is worse than none: the host would show a failed server.
    engine = EngineOptions(**{field: getattr(args, field) for field in EngineOptions.__slots__
                              if getattr(args, field, None) is not None})
    checked_backend_options(args, engine)
    entry = server_entry(_serve_arguments(args), host)
    if args.print:
        json.dump({"mcpServers": {args.name: entry}}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    path = (args.config or host.config_path()).expanduser()
    outcome = install_entry(path, args.name, entry, force=args.force)
    print(f"mtp-mcp: {outcome}")
    return 0


def server_entry(serve_arguments: list[str], host: Host) -> dict:
    """The host's entry that runs `mtp-mcp serve` of this environment with `serve_arguments`."""
    script = Path(sysconfig.get_path("scripts")) / ("mtp-mcp.exe" if sys.platform == "win32" else "mtp-mcp")
    if script.is_file():
        command, args = str(script), ["serve", *serve_arguments]
    else:  # run from a checkout without the console script: the same through this interpreter
        command, args = sys.executable, ["-m", "mtp_mcp", "serve", *serve_arguments]
    entry = {"command": command, "args": args, "env": {}}
    return {"type": host.entry_type, **entry} if host.entry_type else entry


def install_entry(path: Path, name: str, entry: dict, *, force: bool) -> str:
    """Merges `entry` into the configuration at `path` under mcpServers[name]; returns the sentence that says what
    was done. Raises InvalidRequestError, with the file untouched, when it cannot be merged safely."""
    config: dict = {}
    if path.exists():
        try:
            config = json.loads(path.read_text(encoding="utf-8") or "{}")
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise InvalidRequestError(f"{path} is not valid JSON ({error}); it was left untouched: fix or move it, "
                                      "or pass --config to write another file") from None
        if not isinstance(config, dict) or not isinstance(config.get("mcpServers", {}), dict):
            raise InvalidRequestError(f"{path} is JSON but not an MCP configuration (an object whose \"mcpServers\" is "
                                      "an object); it was left untouched")
    servers = config.setdefault("mcpServers", {})
    existing = servers.get(name)
    if existing == entry:
        return f"{path} already has this '{name}' entry; nothing changed"
    if existing is not None and not force and not _is_mtp_mcp_entry(existing):
        raise InvalidRequestError(f"{path} already has a server named '{name}' that is not mtp-mcp; choose another "
                                  "--name, or pass --force to replace it")
    servers[name] = entry
    backup = _write(path, config)
    action = "updated" if existing is not None else "added"
    kept = f"; the previous file is kept as {backup}" if backup else ""
    return f"{action} the '{name}' server in {path}{kept}"


def _serve_arguments(args: argparse.Namespace) -> list[str]:
    """The options given to `install` that `serve` takes; a local model path is made absolute, since hosts start
    servers from a directory of their own."""
    serve_arguments = []
    for option, value in vars(args).items():
        if option in _INSTALL_ONLY or value is None:
            continue
        if isinstance(value, bool):  # an on/off option that was given
            serve_arguments.append(args.flag_options[option])
            continue
        if option in ("model", "draft_model") and Path(value).expanduser().exists():
            value = str(Path(value).expanduser().resolve())
        serve_arguments += [f"--{option.replace('_', '-')}", str(value)]
    return serve_arguments


def _is_mtp_mcp_entry(entry: object) -> bool:
    if not isinstance(entry, dict):
        return False
    command = Path(str(entry.get("command", ""))).name.removesuffix(".exe")
    args = entry.get("args") or []
    return command == "mtp-mcp" or (isinstance(args, list) and args[:2] == ["-m", "mtp_mcp"])


def _write(path: Path, config: dict) -> Path | None:
    """Writes `config` to `path` atomically (a crash leaves the old file or the new, never half of one), with the old
    file's permissions; returns the backup of the old file, if there was one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    backup = None
    if path.exists():
        stamp = time.strftime("%Y%m%d-%H%M%S")
        backup = path.with_name(f"{path.name}.{stamp}.bak")
        number = 1
        while backup.exists():  # two installs within a second: keep both earlier versions
            number += 1
            backup = path.with_name(f"{path.name}.{stamp}-{number}.bak")
        shutil.copy2(path, backup)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.",
                                     delete=False) as temporary:
        json.dump(config, temporary, indent=2)
        temporary.write("\n")
    if backup is not None:
        shutil.copymode(backup, temporary.name)
    os.replace(temporary.name, path)
    return backup
