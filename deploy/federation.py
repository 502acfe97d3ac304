"""A real Flower deployment on this machine: one TLS SuperLink with SuperNode authentication and
one SuperNode per site, all on loopback, driven through Flower's own executables and CLI. The
SuperNodes run only apps signed by the federation's publisher key (``--trusted-entities``).

Used by ``fedglioma demo`` and the integration tests. Every process runs in its own process group
with its log in ``<workdir>/logs/<name>.log``; :class:`LocalFederation` is a context manager that
stops everything it started on exit (also on exceptions and Ctrl-C). Every process it starts, and
everything those start (Flower's SuperExec and app processes, some in sessions of their own),
carries the federation's and the process's tag in its environment (:data:`FEDERATION_TAG_ENV`,
:data:`PROCESS_TAG_ENV`), so what a killed SuperNode or SuperLink leaves behind is found and
stopped (:meth:`LocalFederation.reap`) although it is no longer anyone's child. Layout of ``workdir``::

    flwr-home/config.toml       the `flwr` CLI's connection (FLWR_HOME), named ``fedglioma-local``
    superlink/state.db          SuperLink state (SQLite, mode 0600; runs, registered nodes, model weights)
    superlink/nodes.json        site -> node id of the keys this launcher registered
    supernodes/<site>/          working directory of each SuperNode
    run-configs/run-*.toml      the run-config overrides passed to each ``flwr run``
    logs/<name>.log             stdout+stderr of superlink, supernode-<site>

Flower 1.41 facts this relies on (checked with ``--help`` and on loopback): the SuperLink serves
Fleet, Control and Runtime APIs on one HTTPS port and answers ``GET /health``; it starts
``flower-superexec`` from ``PATH`` (so the venv's ``bin`` must be on it); ``flwr run`` exits 0 even
when the run fails, so the final status comes from ``flwr ls``; ``flwr supernode register`` exits 0
even when registration fails, so its JSON output is checked.

Signed apps (flwr 1.41 source). ``flower-supernode --trusted-entities FILE`` refuses every FAB
whose ``verifications`` lack ``valid_license`` ("App verification is not supported by the
connected SuperLink") or carry no Ed25519 signature by a listed key over ``signed_at`` (8 bytes,
big-endian) + SHA-256 of the FAB (``supernode/start_client_internal.py``: ``_verify_fab``).
A FAB that ``flwr run APP_DIR`` uploads always has empty verifications: the SuperLink fills them
only for a Hub app (``flwr run @publisher/app==x.y.z``), from the answer of
``$FLWR_SUPERGRID_API_URL/hub/fetch-fab`` (``superlink/servicer/control/control_handlers.py``:
``_get_remote_fab``, ``_format_verification``). :class:`AppHub` answers that request on loopback
with FABs the coordinator signed itself, so no FAB reaches a site unsigned; the SuperNodes check
the signature, so the hub itself need not be trusted.
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import hashlib
import json
import math
import os
import re
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any

import tomli_w
from flwr.cli.build import build_fab_from_disk
from flwr.common.config import get_fab_config, get_metadata_from_config
from flwr.supercore.primitives.asymmetric_ed25519 import create_message_to_sign, sign_message

from deploy.certs import Credentials, CredentialsError, load_publisher_key, publisher_key_id
from server.errors import FederationError

CONNECTION = "fedglioma-local"
Scalar = bool | int | float | str

#: environment of every Flower process: no telemetry or update checks, and never `uv sync` app
#: dependencies at run time (the app runs in this venv; a sync would need network access)
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
#: the SuperLink asks ``$FLWR_SUPERGRID_API_URL/hub/fetch-fab`` for a Hub app's FAB and signatures
HUB_URL_ENV = "FLWR_SUPERGRID_API_URL"
#: where deploy/start-superlink.sh points it by default (FEDGLIOMA_APP_HUB_URL), and where
#: ``python -m deploy.federation`` serves the FAB it signed while ``flwr run`` starts the run
DEFAULT_HUB_PORT = 8100
#: files the SuperLink and the apps create (state.db with model weights, run outputs, the sites'
#: caches of patient data) are readable by their owner only
PRIVATE_UMASK = 0o077
#: environment variables marking the processes of one :class:`LocalFederation` and of one
#: :class:`ManagedProcess` (inherited by every process Flower starts under it)
FEDERATION_TAG_ENV = "FEDGLIOMA_FEDERATION"
PROCESS_TAG_ENV = "FEDGLIOMA_PROCESS"
#: Flower's Grid polls the SuperLink for replies every 3 s (flwr/superlink/grid/http_grid.py)
GRID_POLL_S = 3.0
#: a SuperNode is online until 2 x its 30-s heartbeat interval after its last heartbeat
#: (HEARTBEAT_PATIENCE x HEARTBEAT_DEFAULT_INTERVAL); a killed one stays "online" that long
HEARTBEAT_PATIENCE_S = 60.0
#: while a ServerApp process runs, :meth:`LocalFederation.wait` asks the SuperLink for the run's
#: status (a ``flwr ls`` process: ~2 s of a core) only this often; a run finishes when its
#: ServerApp exits, which /proc shows at each (cheap) poll
STATUS_REFRESH_S = 60.0
#: seconds between looks at a dead SuperNode's node, which stays online up to HEARTBEAT_PATIENCE_S
RELEASE_POLL_S = 4.0
#: what ``flower-supernode`` logs once the SuperLink activated it (supernode/start_client_internal.py)
NODE_ACTIVATED = "SuperNode ID: "
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_CONFIG_KEY = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")


def flower_bin(name: str) -> Path:
    """A Flower executable from the venv of the running interpreter (not whatever is on PATH)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise FederationError(f"{path} not found: install flwr into the environment of {sys.executable}")
    return path


def free_port(host: str = "127.0.0.1", exclude: set[int] | frozenset[int] = frozenset()) -> int:
    """A TCP port nobody listens on right now (the OS picks; ``exclude`` skips ones handed out
    already but not bound yet)."""
    while True:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in exclude:
            return port


def toml_string(value: str) -> str:
    """``value`` as a TOML basic string, escaped so Flower's ``key=value`` parser reads it back."""
    if any(ord(c) < 0x20 or c == "\x7f" for c in value):
        raise ValueError(f"config value {value!r} contains control characters (newline, tab, ...); remove them")
    if '"' in value:
        # Flower splits `--node-config` with the regex "[^"]*", so a double quote cannot be escaped
        if "'" in value:
            raise ValueError(f"config value {value!r} contains both ' and \"; Flower's --node-config cannot express it")
        return f"'{value}'"  # TOML literal string: no escapes, no double quotes needed
    return '"' + value.replace("\\", "\\\\") + '"'


def format_config(config: Mapping[str, Scalar]) -> str:
    """``{"data-path": "/a b", "partition-id": 0}`` -> ``data-path="/a b" partition-id=0``, the
    space-separated TOML ``key=value`` form of ``--node-config`` / ``--run-config``."""
    parts = []
    for key, value in config.items():
        if not _CONFIG_KEY.match(key):
            raise ValueError(f"config key {key!r}: use letters, digits, '_', '-' and '.' only")
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value) if value == value else "nan"  # repr gives TOML-valid 1e-05, inf
        elif isinstance(value, str):
            text = toml_string(value)
        else:
            raise TypeError(f"config value for {key!r} is a {type(value).__name__}; Flower accepts bool/int/float/str")
        parts.append(f"{key}={text}")
    return " ".join(parts)


def _strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def _tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return f"(no log at {path})"
    text = _strip_ansi(path.read_text(errors="replace")).rstrip().splitlines()
    return "\n".join(text[-lines:])


def _parse_json_output(stdout: str) -> dict[str, Any]:
    """The JSON object a ``flwr ... --format json`` call printed (anything before it skipped)."""
    start = stdout.find("{")
    if start < 0:
        raise ValueError("no JSON object in the output")
    return json.loads(stdout[start:])


# ---- process bookkeeping ------------------------------------------------------------------------


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """``(state, parent pid, start time in clock ticks after boot)`` of ``pid`` from /proc, or
    None when it does not exist. The start time tells a process from a later one reusing its id."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1]), int(fields[19])


def descendant_processes(root: int) -> dict[int, int]:
    """``{pid: start_time}`` of every live descendant of ``root`` (Linux /proc; empty elsewhere).

    Flower starts ``flower-superexec`` in a new session, so it escapes the process group of the
    SuperLink/SuperNode that spawned it; this finds it (and the app processes under it)."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        stat = proc_stat(int(entry.name))
        if stat is not None and stat[0] != "Z":  # zombies are dead already, only not reaped
            children.setdefault(stat[1], []).append((int(entry.name), stat[2]))
    found: dict[int, int] = {}
    stack = list(children.get(root, []))
    while stack:
        pid, start = stack.pop()
        found[pid] = start
        stack.extend(children.get(pid, []))
    return found


def tagged_processes(name: str, *values: str) -> dict[int, int]:
    """``{pid: start_time}`` of every live process (of this user; Linux /proc, empty elsewhere)
    whose environment sets ``name`` to one of ``values``, wherever it sits in the process tree."""
    wanted = {f"{name}={value}".encode() for value in values}
    found: dict[int, int] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone meanwhile, or another user's
            continue
        if wanted.intersection(environ.split(b"\0")):
            stat = proc_stat(int(entry.name))
            if stat is not None and stat[0] != "Z":
                found[int(entry.name)] = stat[2]
    return found


def command_line(pid: int) -> list[str]:
    """The arguments of ``pid``'s command line (Linux /proc); empty when it is gone or another
    user's. argv[0] is the interpreter for console scripts, so a program's name is one of the
    first two (see :func:`runs_program`)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []
    return [os.fsdecode(arg) for arg in argv if arg]


def runs_program(argv: list[str], *names: str) -> bool:
    """Whether the command line ``argv`` (:func:`command_line`) runs one of the programs ``names``."""
    return any(Path(arg).name in names for arg in argv[:2])


def _alive(pid: int, start_time: int) -> bool:
    """Whether the process ``pid`` that started at ``start_time`` still runs (zombies count as gone)."""
    stat = proc_stat(pid)
    return stat is not None and stat[0] != "Z" and stat[2] == start_time


def _die_with_parent() -> None:
    """Child-side (preexec): ask Linux to SIGTERM this process when the launcher dies, so a killed
    ``fedglioma demo`` leaves no SuperLink behind. Best effort: a no-op where prctl is missing."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


@dataclass
class ManagedProcess:
    """One long-running Flower process this launcher started."""

    name: str
    command: list[str]
    popen: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]
    tag: str  # the value of PROCESS_TAG_ENV in its environment and its processes'

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def members(self) -> dict[int, int]:
        """``{pid: start_time}`` of its live processes: itself while it runs, and what it started
        (also after it died and they were re-parented)."""
        return tagged_processes(PROCESS_TAG_ENV, self.tag)

    def flush_log(self) -> None:
        if not self.log_file.closed:  # closed once the process was stopped
            self.log_file.flush()

    def log_tail(self, lines: int = 40) -> str:
        self.flush_log()
        return _tail(self.log_path, lines)


# ---- signed apps --------------------------------------------------------------------------------


def sign_fab(fab: bytes, publisher_key: Path, signed_at: int | None = None) -> dict[str, str | int]:
    """One verification record of ``fab`` as Flower Hub hands it to the SuperLink: the key id, the
    Ed25519 signature (base64url, unpadded) of ``signed_at`` + SHA-256(fab), and ``signed_at``
    (Unix seconds). Signed with Flower's own message format, as ``flwr app review`` signs."""
    key = load_publisher_key(publisher_key)
    when = int(time.time()) if signed_at is None else signed_at
    signature = sign_message(key, create_message_to_sign(hashlib.sha256(fab).digest(), when))
    return {
        "public_key_id": publisher_key_id(key.public_key()),
        "signature": base64.urlsafe_b64encode(signature).rstrip(b"=").decode("ascii"),
        "signed_at": when,
    }


class AppHub:
    """A loopback stand-in for Flower Hub's FAB download: :meth:`publish` builds an app's FAB the way
    ``flwr run`` does, signs it, and returns its spec ``@publisher/name==version``; the SuperLink
    (started with ``FLWR_SUPERGRID_API_URL=`` :attr:`url`) fetches FAB and signature from here when
    that spec is run. Serves HTTP from a thread of this process until :meth:`stop`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._apps: dict[tuple[str, str], tuple[bytes, dict[str, str | int]]] = {}
        self._fabs: dict[str, bytes] = {}
        self._lock = threading.Lock()
        #: ``(app id, version)`` of every FAB the SuperLink downloaded, in order
        self.downloads: list[tuple[str, str]] = []
        self._server = ThreadingHTTPServer((host, port), self._handler())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The value of ``FLWR_SUPERGRID_API_URL`` (and FEDGLIOMA_APP_HUB_URL) for the SuperLink."""
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> AppHub:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._server.serve_forever, name="app-hub", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()

    def publish(self, app_dir: Path, publisher_key: Path) -> str:
        """Build ``app_dir``'s FAB, sign it with ``publisher_key`` and serve it; returns the spec for
        ``flwr run``. Publishing the same name and version again replaces the FAB."""
        fab = build_fab_from_disk(Path(app_dir))
        fab_id, version = get_metadata_from_config(get_fab_config(fab))
        verification = sign_fab(fab, publisher_key)
        with self._lock:
            self._apps[(f"@{fab_id}", version)] = (fab, verification)
            self._fabs[hashlib.sha256(fab).hexdigest()] = fab
        return f"@{fab_id}=={version}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
                pass  # the SuperLink's log records every run; no second log on stderr

            def _reply(self, code: int, body: bytes, content_type: str = "application/json") -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                if self.path != "/v1/hub/fetch-fab":
                    return self._reply(404, b'{"detail": "not found"}')
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                key = (str(request.get("app_id")), str(request.get("app_version")))
                with hub._lock:
                    found = hub._apps.get(key)
                if found is None:
                    detail = f"{key[0]}=={key[1]} was not published to this hub; run it with python -m deploy.federation"
                    return self._reply(404, json.dumps({"detail": detail}).encode())
                fab, verification = found
                hub.downloads.append(key)
                url = f"{hub.url}/fabs/{hashlib.sha256(fab).hexdigest()}"
                self._reply(200, json.dumps({"fab_url": url, "verifications": [verification]}).encode())

            def do_GET(self) -> None:  # noqa: N802
                with hub._lock:
                    fab = hub._fabs.get(self.path.rsplit("/", 1)[-1]) if self.path.startswith("/v1/fabs/") else None
                if fab is None:
                    return self._reply(404, b'{"detail": "not found"}')
                self._reply(200, fab, "application/octet-stream")

        return Handler


# ---- the federation -----------------------------------------------------------------------------


class LocalFederation:
    """A TLS SuperLink with SuperNode authentication plus SuperNodes, all on loopback. With
    ``verify_apps`` (the default) the SuperNodes run with ``--trusted-entities`` and :meth:`run`
    signs each app with the credentials' publisher key and serves it through an :class:`AppHub`.

    >>> creds = ensure_credentials(workdir / "certs", ["site-a", "site-b"])
    >>> with LocalFederation(workdir, creds) as fed:
    ...     fed.start_superlink()
    ...     for site in ("site-a", "site-b"):
    ...         fed.register_site(site, creds.site_public_key(site))
    ...         fed.start_supernode(site, creds.site_private_key(site), {"data-path": f"/data/{site}"})
    ...     status = fed.wait(fed.run(app_dir, {"federation.rounds": 2}), timeout_s=600)
    """

    def __init__(
        self,
        workdir: Path,
        credentials: Credentials,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        connection: str = CONNECTION,
        stop_timeout_s: float = 15.0,
        verify_apps: bool = True,
    ) -> None:
        self.workdir = Path(workdir).expanduser().resolve()
        self.credentials = credentials
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.connection = connection
        self.stop_timeout_s = stop_timeout_s
        self.flwr_home = self.workdir / "flwr-home"
        self.log_dir = self.workdir / "logs"
        self.superlink: ManagedProcess | None = None
        self.supernodes: dict[str, ManagedProcess] = {}
        self._started: list[ManagedProcess] = []  # every process spawned, in start order
        self._local_ports: set[int] = {self.port}
        self._registry_path = self.workdir / "superlink" / "nodes.json"
        #: FEDERATION_TAG_ENV of every process it starts (see :meth:`leftover_processes`)
        self.tag = f"{os.getpid()}-{secrets.token_hex(8)}"
        needed = [credentials.ca_cert, credentials.server_cert, credentials.server_key]
        if verify_apps:
            needed += [credentials.publisher_key, credentials.trusted_entities]
        for path in needed:
            if not path.exists():
                raise FileNotFoundError(f"{path} is missing; create it with `fedglioma certs {credentials.directory}`")
        self.app_hub: AppHub | None = AppHub() if verify_apps else None

    # -- context manager --------------------------------------------------------------------------

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- addresses and environment ----------------------------------------------------------------

    @property
    def address(self) -> str:
        """``host:port`` that SuperNodes and the CLI dial (a wildcard bind is dialled on loopback)."""
        dial = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        return f"[{dial}]:{self.port}" if ":" in dial else f"{dial}:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """Environment of every Flower process and CLI call."""
        env = dict(os.environ)
        env.update(FLOWER_ENV)
        env["FLWR_HOME"] = str(self.flwr_home)
        env[FEDERATION_TAG_ENV] = self.tag
        # the SuperLink/SuperNode start `flower-superexec`, which start `flwr-serverapp`/`flwr-clientapp`,
        # by name: this venv's bin must come first on PATH or they are not found (or the wrong ones are)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        # the CLI's HTTP client honours proxy variables; loopback must never go through a proxy
        no_proxy = [v for v in env.get("NO_PROXY", env.get("no_proxy", "")).split(",") if v]
        env["NO_PROXY"] = env["no_proxy"] = ",".join([*no_proxy, "127.0.0.1", "localhost", "::1"])
        return env

    # -- processes --------------------------------------------------------------------------------

    def spawn(
        self, name: str, command: list[str], cwd: Path, extra_env: Mapping[str, str] | None = None
    ) -> ManagedProcess:
        """Start ``command`` in ``cwd`` as a managed process: its own process group, output in
        ``logs/<name>.log``, this federation's environment plus ``extra_env``, stopped by
        :meth:`stop`. (For what the ``start_*`` methods do not cover: a proxy, a deploy script.)
        The process runs with umask 077 (:data:`PRIVATE_UMASK`): what it creates is owner-only."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        cwd.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        if log_path.exists():  # keep the previous log (a crash's, say) one generation back
            log_path.replace(log_path.with_name(f"{name}.log.1"))
        log_file = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        log_file.write(f"$ {subprocess.list2cmdline(command)}\n".encode())
        log_file.flush()
        tag = f"{self.tag}/{name}/{len(self._started)}"
        popen = subprocess.Popen(
            command, cwd=cwd, env={**self.env, **(extra_env or {}), PROCESS_TAG_ENV: tag}, stdin=subprocess.DEVNULL,
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,  # own process group, no terminal signals
            umask=PRIVATE_UMASK,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        proc = ManagedProcess(name, command, popen, log_path, log_file, tag)
        self._started.append(proc)
        return proc

    def superlink_command(self) -> list[str]:
        """The exact ``flower-superlink`` command line this launcher runs."""
        c = self.credentials
        return [
            str(flower_bin("flower-superlink")),
            "--ssl-ca-certfile", str(c.ca_cert),
            "--ssl-certfile", str(c.server_cert),
            "--ssl-keyfile", str(c.server_key),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            "--database", str(self.workdir / "superlink" / "state.db"),
            "--host", self.host,
            "--port", str(self.port),
        ]

    def start_superlink(
        self,
        timeout_s: float = 90.0,
        *,
        command: list[str] | None = None,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        """Start the SuperLink and wait until ``GET https://ADDRESS/health`` answers 200 over TLS
        verified with the CA; write the ``flwr`` connection into ``$FLWR_HOME/config.toml``.

        ``command`` replaces :meth:`superlink_command` (e.g. ``deploy/start-superlink.sh``); it
        must serve :attr:`address` with the credentials' server certificate. With ``verify_apps``
        the :class:`AppHub` starts and the SuperLink's environment points at it (``FLWR_SUPERGRID_API_URL``
        and, for the deploy script, ``FEDGLIOMA_APP_HUB_URL``).

        Called again after the SuperLink died (a crash, ``kill -9``), it first stops what the dead
        one left (its SuperExec, a ServerApp), then starts the same command on the same port and
        database, and stops the runs the database still has unfinished (:meth:`stop_orphaned_runs`).
        SuperNodes that kept running reconnect by themselves (Flower retries without limit)."""
        previous = self.superlink
        if previous is not None and previous.returncode is None:
            raise FederationError(f"the SuperLink of {self.workdir} is already running (port {self.port})")
        if previous is not None:
            terminate([previous], self.stop_timeout_s)  # nothing of the dead one may talk to the new one
        state_db = self.workdir / "superlink" / "state.db"
        had_state = state_db.exists()
        if had_state:
            state_db.chmod(0o600)  # made by an older version with the default umask
        env = dict(extra_env or {})
        if self.app_hub is not None:
            self.app_hub.start()
            env = {HUB_URL_ENV: self.app_hub.url, "FEDGLIOMA_APP_HUB_URL": self.app_hub.url, **env}
        if command is None:
            command = previous.command if previous is not None else self.superlink_command()
        self.superlink = self.spawn("superlink", command, self.workdir / "superlink", env)
        self._wait_healthy(self.superlink, timeout_s)
        self.write_connection()
        if had_state:
            self.stop_orphaned_runs()

    def stop_orphaned_runs(self) -> list[int]:
        """Stop every run the SuperLink lists as unfinished, right after it started on an existing
        database; returns their ids. Their ServerApp died with the previous SuperLink (Flower 1.41
        resumes no run), but the new one keeps them "running" until their task misses its
        heartbeat (about a minute) and meanwhile hands their queued instructions to the
        SuperNodes, which then train for a dead run before the next one's messages.
        ``flwr stop`` finishes them and deletes those messages. (A run is resumed by starting it
        again with ``federation.resume=true``: :mod:`server.run_folder`.)"""
        stopped = []
        for run in self._flwr_json("ls", self.connection)["runs"]:
            if str(run["status"]).startswith("finished"):
                continue
            run_id = int(run["run-id"])
            try:
                self._flwr_json("stop", str(run_id), self.connection)
            except FederationError:
                if not self.status(run_id).startswith("finished"):  # it may have expired meanwhile
                    raise
            stopped.append(run_id)
        return stopped

    def _wait_healthy(self, proc: ManagedProcess, timeout_s: float) -> None:
        url = f"https://{self.address}/health"
        context = ssl.create_default_context(cafile=str(self.credentials.ca_cert))
        opener = urllib.request.build_opener(  # no proxies: this is a loopback health check
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
        )
        deadline = time.monotonic() + timeout_s
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise FederationError(
                    f"the SuperLink exited with code {proc.returncode} before it became healthy "
                    f"(log {proc.log_path}):\n{proc.log_tail()}"
                )
            try:
                with opener.open(url, timeout=2) as response:
                    if response.status == 200:
                        return
                    last_error = f"HTTP {response.status}"
            except (urllib.error.URLError, OSError) as err:
                last_error = str(getattr(err, "reason", err))
                if isinstance(getattr(err, "reason", None), ssl.SSLCertVerificationError):
                    raise FederationError(
                        f"the SuperLink's certificate does not verify against {self.credentials.ca_cert} "
                        f"for {self.address}: {last_error}. Re-run `fedglioma certs` (it re-issues the "
                        "certificate) or add the address with --san"
                    ) from err
            time.sleep(0.2)
        raise FederationError(
            f"the SuperLink did not answer {url} within {timeout_s:.0f} s (last error: {last_error}); "
            f"log {proc.log_path}:\n{proc.log_tail()}"
        )

    def write_connection(self) -> Path:
        """Write (or update) connection ``self.connection`` in ``$FLWR_HOME/config.toml`` and make it
        the default; other connections in the file are kept."""
        path = self.flwr_home / "config.toml"
        config: dict[str, Any] = tomllib.loads(path.read_text()) if path.exists() else {}
        superlink = config.setdefault("superlink", {})
        superlink["default"] = self.connection
        superlink[self.connection] = {
            "address": self.address,
            "root-certificates": str(self.credentials.ca_cert),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(tomli_w.dumps(config))
        return path

    # -- CLI --------------------------------------------------------------------------------------

    def flwr(self, *args: str, timeout_s: float = 120.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``flwr ARGS`` with this federation's environment; raise with the output when it
        exits non-zero (and ``check``)."""
        command = [str(flower_bin("flwr")), *args]
        try:
            done = subprocess.run(
                command, env=self.env, cwd=self.workdir, capture_output=True, text=True, timeout=timeout_s,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as err:
            raise FederationError(f"`{subprocess.list2cmdline(command)}` did not finish within {timeout_s:.0f} s") from err
        if check and done.returncode != 0:
            raise FederationError(
                f"`{subprocess.list2cmdline(command)}` exited with code {done.returncode}:\n"
                f"{_strip_ansi(done.stdout + done.stderr).strip()}"
            )
        return done

    def _flwr_json(self, *args: str, timeout_s: float = 120.0) -> dict[str, Any]:
        """``flwr ARGS --format json``; the CLI exits 0 on most failures, so ``success`` is checked."""
        done = self.flwr(*args, "--format", "json", timeout_s=timeout_s)
        try:
            reply = _parse_json_output(done.stdout)
        except ValueError as err:
            raise FederationError(f"`flwr {' '.join(args)}` printed no JSON: {_strip_ansi(done.stdout + done.stderr)}") from err
        if not reply.get("success", False):
            raise FederationError(f"`flwr {' '.join(args)}` failed: {reply.get('error-message', reply)}")
        return reply

    # -- nodes ------------------------------------------------------------------------------------

    def _registry(self) -> dict[str, dict[str, Any]]:
        return json.loads(self._registry_path.read_text()) if self._registry_path.exists() else {}

    def register_site(self, site: str, public_key: Path) -> int:
        """Register ``public_key`` (OpenSSH) under ``--name site``; returns the node id.

        A key already registered in this workdir's persistent SuperLink database (a re-run) keeps
        its node id, looked up in ``superlink/nodes.json``."""
        public_key = Path(public_key).resolve()
        key_body = public_key.read_text().split()[:2]
        try:
            reply = self._flwr_json("supernode", "register", str(public_key), self.connection, "--name", site)
        except FederationError as err:
            known = self._registry().get(site)
            if "already in use" in str(err) and known and known["key"] == key_body:
                return int(known["node_id"])
            if "already in use" in str(err):
                raise FederationError(
                    f"the key {public_key} is registered already, but not by this launcher for site {site!r}; "
                    f"unregister it (`flwr supernode list` / `flwr supernode unregister NODE_ID {self.connection}` "
                    f"with FLWR_HOME={self.flwr_home}) or delete {self.workdir / 'superlink'}"
                ) from err
            raise
        node_id = int(reply["node-id"])
        registry = self._registry()
        registry[site] = {"node_id": node_id, "key": key_body}
        self._registry_path.write_text(json.dumps(registry, indent=2))
        return node_id

    def nodes(self) -> list[dict[str, Any]]:
        """``flwr supernode list`` as dicts (``node-id`` (str), ``status`` registered/online/offline, ...)."""
        return list(self._flwr_json("supernode", "list", self.connection)["nodes"])

    def supernode_command(
        self, private_key: Path, node_config: Mapping[str, Scalar], local_port: int
    ) -> list[str]:
        """The exact ``flower-supernode`` command line for one site."""
        command = [
            str(flower_bin("flower-supernode")),
            "--superlink", self.address,
            "--root-certificates", str(self.credentials.ca_cert),
            "--auth-supernode-private-key", str(Path(private_key).resolve()),
            "--port", str(local_port),
        ]
        if self.app_hub is not None:
            command += ["--trusted-entities", str(self.credentials.trusted_entities)]
        if node_config:
            command += ["--node-config", format_config(node_config)]
        return command

    def start_supernode(
        self,
        site: str,
        private_key: Path,
        node_config: Mapping[str, Scalar] | None = None,
        local_port: int | None = None,
        *,
        release_timeout_s: float = HEARTBEAT_PATIENCE_S + 30.0,
    ) -> ManagedProcess:
        """Start the SuperNode of ``site`` (does not wait for it to connect; see
        :meth:`wait_for_nodes`). Each SuperNode gets its own free local Runtime API port.

        When the SuperLink still lists the site's node online, although no SuperNode of this
        launcher serves it (one that was killed, or died with a previous SuperLink on this
        database), Flower refuses to activate the node until that entry expires: this waits for
        it (:meth:`wait_node_released`)."""
        if self.superlink is None:
            raise FederationError("start_superlink() first: a SuperNode needs the SuperLink's address")
        running = self.supernodes.get(site)
        if running is not None and running.returncode is None:
            raise FederationError(f"the SuperNode of {site!r} is already running (log {running.log_path})")
        if not Path(private_key).exists():
            raise FileNotFoundError(f"{private_key} (private key of {site!r}) is missing; create it with `fedglioma certs`")
        port = local_port if local_port is not None else free_port("127.0.0.1", self._local_ports)
        self._local_ports.add(port)
        return self._launch_supernode(site, self.supernode_command(private_key, node_config or {}, port), release_timeout_s)

    def restart_supernode(self, site: str, release_timeout_s: float = HEARTBEAT_PATIENCE_S + 30.0) -> ManagedProcess:
        """Start the SuperNode of ``site`` again with the same command line (same key, hence the same
        node id, same node config and port). A running one is stopped first; what a dead one left
        behind is stopped; the start waits until the SuperLink releases the node
        (:meth:`wait_node_released`: up to a minute after a SIGKILL)."""
        previous = self.supernodes.get(site)
        if previous is None:
            raise FederationError(f"no SuperNode of {site!r} was started; use start_supernode()")
        return self._launch_supernode(site, previous.command, release_timeout_s)

    def _launch_supernode(self, site: str, command: list[str], release_timeout_s: float) -> ManagedProcess:
        previous = self.supernodes.get(site)
        if previous is not None:
            terminate([previous], self.stop_timeout_s)  # and what it left behind; closes its log
        self.wait_node_released(site, release_timeout_s)
        proc = self.spawn(f"supernode-{site}", command, self.workdir / "supernodes" / site)
        self.supernodes[site] = proc
        return proc

    def wait_node_released(self, site: str, timeout_s: float = HEARTBEAT_PATIENCE_S + 30.0) -> float:
        """Wait until the SuperLink no longer lists the node of ``site`` as online; returns the
        seconds waited (0 when it was not online). For a site not registered by this launcher it
        returns at once.

        A SuperNode that dies without deactivating (SIGKILL, a crash, its SuperLink killed with it)
        stays "online" until 2 heartbeat intervals after its last heartbeat (up to 60 s), and
        Flower refuses to activate a node that is online: a SuperNode started before would exit
        with "could not be activated". Once the node is offline this waits one more poll of the
        Grid, so the ServerApp receives the SuperLink's NODE_UNAVAILABLE answer to an instruction
        the dead SuperNode had taken before the node is back (a node back before that poll leaves
        the instruction unanswered until the round times out)."""
        node = self._registry().get(site)
        if node is None:
            return 0.0
        node_id = str(node["node_id"])
        start = time.monotonic()
        while any(n["node-id"] == node_id and n.get("status") == "online" for n in self.nodes()):
            if time.monotonic() - start > timeout_s:
                raise FederationError(
                    f"node {node_id} of site {site!r} is still online {timeout_s:.0f} s after its SuperNode of this "
                    f"launcher stopped: another SuperNode uses its key; stop that one, or unregister the key "
                    f"(`flwr supernode unregister {node_id} {self.connection}` with FLWR_HOME={self.flwr_home})"
                )
            # each look is a `flwr` process (~2 s of a core) and the wait is up to a minute: a few
            # looks, each at most RELEASE_POLL_S late
            time.sleep(RELEASE_POLL_S)
        waited = time.monotonic() - start
        if waited > 0.5:
            time.sleep(GRID_POLL_S + 1.0)
        return waited

    def wait_for_nodes(self, sites: list[str] | None = None, timeout_s: float = 60.0) -> list[dict[str, Any]]:
        """Wait until the registered nodes of ``sites`` (default: every started SuperNode) are
        online and return :meth:`nodes` as last seen; raise with the log tail when one of their
        processes exits first.

        "Online" in the SuperLink's database is not enough for a SuperNode this launcher started:
        a node whose SuperNode died stays online there for up to a minute, also across a SuperLink
        restart. Such a node counts only once the running process has logged its activation
        (:data:`NODE_ACTIVATED`)."""
        sites = list(self.supernodes) if sites is None else sites
        registry = self._registry()
        missing = [s for s in sites if s not in registry]
        if missing:
            raise FederationError(f"site(s) {missing} were not registered by this launcher (register_site first)")
        wanted = {str(registry[s]["node_id"]): s for s in sites}
        deadline = time.monotonic() + timeout_s
        while True:
            for site in sites:
                proc = self.supernodes.get(site)
                if proc is not None and proc.returncode is not None:
                    raise FederationError(
                        f"the SuperNode of {site!r} exited with code {proc.returncode} (log {proc.log_path}):\n{proc.log_tail()}"
                    )
            activated = {n for n, site in wanted.items() if self._activated(site)}
            # the SuperLink is asked (a `flwr` process, ~2 s of a core) once every SuperNode this
            # launcher runs has logged its activation; until then its answer cannot be "all ready"
            nodes = self.nodes() if activated == set(wanted) else []
            online = {n["node-id"] for n in nodes if n.get("status") == "online"}
            ready = online & activated
            if set(wanted) <= ready:
                return nodes
            if time.monotonic() > deadline:
                offline = sorted(wanted[n] for n in set(wanted) - ready)
                raise FederationError(f"SuperNode(s) {offline} not online after {timeout_s:.0f} s; see {self.log_dir}")
            time.sleep(0.5)

    def _activated(self, site: str) -> bool:
        """Whether the SuperNode this launcher runs for ``site`` logged that the SuperLink activated
        it (True for a site whose SuperNode runs elsewhere: then the SuperLink's word is all there is)."""
        proc = self.supernodes.get(site)
        if proc is None:
            return True
        proc.flush_log()
        with open(proc.log_path, "rb") as log:
            return NODE_ACTIVATED.encode() in log.read(1 << 16)

    # -- runs -------------------------------------------------------------------------------------

    def run(
        self, app_dir: Path, run_config: Mapping[str, Scalar] | None = None, *, publisher_key: Path | None = None
    ) -> int:
        """Start ``app_dir`` on the SuperLink; returns the run id. With ``verify_apps``: sign its FAB
        with ``publisher_key`` (default: the credentials') in the :class:`AppHub` and
        ``flwr run @publisher/name==version CONNECTION``; without: ``flwr run APP_DIR CONNECTION``.

        The overrides go through a TOML file (written by tomli_w, kept in ``run-configs/``) rather
        than the inline ``k=v`` form: Flower's inline parser splits on a regex that cannot carry
        every string, a file carries any value exactly."""
        app = str(Path(app_dir).resolve())
        if self.app_hub is not None:
            app = self.app_hub.publish(Path(app_dir), publisher_key or self.credentials.publisher_key)
        args = ["run", app, self.connection]
        if run_config:
            args += ["--run-config", str(self._write_run_config(run_config))]
        reply = self._flwr_json(*args, timeout_s=300.0)
        return int(reply["run-id"])

    def _write_run_config(self, run_config: Mapping[str, Scalar]) -> Path:
        for key, value in run_config.items():
            if not _CONFIG_KEY.match(key):
                raise ValueError(f"run-config key {key!r}: use letters, digits, '_', '-' and '.' only")
            if not isinstance(value, (bool, int, float, str)):
                raise TypeError(f"run-config value for {key!r} is a {type(value).__name__}; Flower accepts bool/int/float/str")
        folder = self.workdir / "run-configs"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{time.monotonic_ns() % 10**6:06d}.toml"
        # quoted keys ("model.lr" = ...) stay flat: Flower flattens the file to the same dotted keys
        path.write_text(tomli_w.dumps(dict(run_config)))
        return path

    def status(self, run_id: int) -> str:
        """The run's status from ``flwr ls --run-id``: ``pending``, ``starting``, ``running``,
        ``finished:completed``, ``finished:failed`` or ``finished:stopped``."""
        runs = self._flwr_json("ls", self.connection, "--run-id", str(run_id))["runs"]
        if not runs:
            raise FederationError(f"the SuperLink at {self.address} knows no run {run_id}")
        return str(runs[0]["status"])

    def wait(
        self,
        run_id: int,
        timeout_s: float,
        poll_s: float = 3.0,
        on_poll: Callable[[str], None] | None = None,
    ) -> str:
        """Poll the run's status until it is ``finished:*`` and return that status. ``on_poll(status)``
        is called after every poll. Raises ``TimeoutError`` after ``timeout_s`` and
        :class:`FederationError` when the SuperLink process dies meanwhile. What a SuperNode that
        died meanwhile left running is stopped at each poll (:meth:`reap`)."""
        deadline = time.monotonic() + timeout_s
        asked_at = -math.inf
        while True:
            self.reap()
            if self.superlink is not None and self.superlink.returncode is not None:
                raise FederationError(
                    f"the SuperLink exited with code {self.superlink.returncode} during run {run_id}:\n"
                    f"{self.superlink.log_tail()}"
                )
            # Each `flwr ls` is a process of its own (Python, Flower, a TLS connection: ~2 s of a
            # core, taken from the sites' training when they share the machine). A run can only
            # finish when its ServerApp process exits, so while one runs the status is refreshed
            # only every STATUS_REFRESH_S; before it starts and once it is gone, at every poll.
            if not self.serverapp_pids() or time.monotonic() - asked_at >= STATUS_REFRESH_S:
                status, asked_at = self.status(run_id), time.monotonic()
            if on_poll is not None:
                on_poll(status)
            if status.startswith("finished"):
                return status
            if time.monotonic() + poll_s > deadline:
                raise TimeoutError(
                    f"run {run_id} is still '{status}' after {timeout_s:.0f} s; stop it with "
                    f"`FLWR_HOME={self.flwr_home} flwr stop {run_id} {self.connection}` and see {self.log_dir}"
                )
            time.sleep(poll_s)

    def serverapp_pids(self) -> list[int]:
        """Live ``flwr-serverapp`` processes of the SuperLink (Linux /proc; empty elsewhere)."""
        if self.superlink is None:
            return []
        return [pid for pid in self.superlink.members() if runs_program(command_line(pid), "flwr-serverapp")]

    def logs(self, run_id: int) -> str:
        """The run's ServerApp log (``flwr log RUN_ID CONNECTION --show``), colour codes removed."""
        done = self.flwr("log", str(run_id), self.connection, "--show", timeout_s=120.0, check=False)
        return _strip_ansi(done.stdout + done.stderr)

    # -- shutdown ---------------------------------------------------------------------------------

    def processes(self) -> list[ManagedProcess]:
        """Every process started so far (running or not), the latest first."""
        return list(reversed(self._started))

    def reap(self) -> dict[str, list[int]]:
        """Stop what the processes of this launcher that exited left running: a SuperNode killed
        with SIGKILL leaves the ClientApp it was running and, for a moment, its SuperExec
        (re-parented by then, found by :data:`PROCESS_TAG_ENV`), a SuperLink its SuperExec and
        ServerApp. Returns
        ``{process name: pids stopped}`` (empty when nothing was left)."""
        dead = [proc for proc in self._started if proc.returncode is not None]
        if not dead or not tagged_processes(PROCESS_TAG_ENV, *(proc.tag for proc in dead)):
            return {}
        stopped: dict[str, list[int]] = {}
        for proc in dead:
            if left := sorted(proc.members()):
                terminate([proc], self.stop_timeout_s)
                stopped.setdefault(proc.name, []).extend(left)
        return stopped

    def leftover_processes(self) -> dict[int, int]:
        """``{pid: start_time}`` of every live process this launcher started, directly or through
        Flower (the ``flwr`` CLI calls included), wherever it sits in the process tree: empty after
        :meth:`stop`."""
        return tagged_processes(FEDERATION_TAG_ENV, self.tag)

    def stop(self) -> None:
        """Stop every process this launcher started (see :func:`terminate`). Safe to call twice.

        SuperNodes go first, while the SuperLink can still record them as offline: a SuperNode
        killed together with its SuperLink stays "online" in the persistent state database, and
        after a restart that stale entry refuses the node's re-activation until it expires
        (:meth:`wait_node_released` waits for that)."""
        others = [p for p in self.processes() if p is not self.superlink]
        terminate(others, self.stop_timeout_s)
        if self.superlink is not None:
            terminate([self.superlink], self.stop_timeout_s)
        if self.app_hub is not None:
            self.app_hub.stop()

    def stop_process(self, proc: ManagedProcess) -> None:
        """Stop one process (a SuperNode going offline, a proxy) the same way :meth:`stop` does."""
        terminate([proc], self.stop_timeout_s)


def terminate(procs: list[ManagedProcess], timeout_s: float = 15.0) -> None:
    """SIGTERM the process group of each running process (all at once, so Flower's processes shut
    down cleanly and in parallel), SIGKILL a group still there after ``timeout_s``; then the same,
    with 5 s of grace, for what is left of their processes (:meth:`ManagedProcess.members`: the
    SuperExec and app processes Flower started in sessions of their own, and everything a killed
    process left behind), and close the logs."""
    for proc in procs:
        # only while our child is un-reaped is its pid (= its group's id) still its own
        if proc.returncode is None:
            _signal_group(proc.popen.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        try:
            proc.popen.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            _signal_group(proc.popen.pid, signal.SIGKILL)
            proc.popen.wait(timeout=10)
    tags = [proc.tag for proc in procs]
    leftovers = tagged_processes(PROCESS_TAG_ENV, *tags)
    for pid, start in leftovers.items():
        if _alive(pid, start):
            _signal_pid(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5.0
    while leftovers and time.monotonic() < deadline:
        time.sleep(0.25)
        leftovers = tagged_processes(PROCESS_TAG_ENV, *tags)
    deadline = time.monotonic() + 10.0
    while leftovers:  # SIGKILL until none is left (one may have started another meanwhile)
        if time.monotonic() > deadline:
            raise FederationError(f"processes {sorted(leftovers)} survive SIGKILL (uninterruptible?); see `ps -o stat`")
        for pid, start in leftovers.items():
            if _alive(pid, start):
                _signal_pid(pid, signal.SIGKILL)
        time.sleep(0.1)
        leftovers = tagged_processes(PROCESS_TAG_ENV, *tags)
    for proc in procs:
        proc.log_file.close()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _signal_pid(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


# ---- a signed run on a real SuperLink -------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("app_dir", type=Path, metavar="APP_DIR", help="the Flower app (folder with pyproject.toml)")
    parser.add_argument("connection", metavar="CONNECTION", help="flwr connection in $FLWR_HOME/config.toml")
    parser.add_argument("--publisher-key", type=Path, required=True,
                        help="Ed25519 key made by `fedglioma certs` (CERTS/publisher/publisher.key)")
    parser.add_argument("--run-config", type=Path, help="TOML file of run-config overrides")
    parser.add_argument("--hub-port", type=int, default=DEFAULT_HUB_PORT,
                        help=f"loopback port of FEDGLIOMA_APP_HUB_URL given to start-superlink.sh (default: {DEFAULT_HUB_PORT})")


def run_signed(args: argparse.Namespace) -> int:
    """``flwr run`` of a signed app on a SuperLink started by ``deploy/start-superlink.sh``: serve
    the signed FAB on ``127.0.0.1:HUB_PORT`` for as long as ``flwr run`` takes (the SuperLink
    downloads it while it starts the run), print flwr's JSON answer; 0 when the run started."""
    with AppHub(port=args.hub_port) as hub:
        spec = hub.publish(args.app_dir, args.publisher_key)
        command = [str(flower_bin("flwr")), "run", spec, args.connection, "--format", "json"]
        if args.run_config:
            command += ["--run-config", str(args.run_config.resolve())]
        done = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    output = _strip_ansi(done.stdout + done.stderr)
    print(output.strip())
    try:
        started = bool(_parse_json_output(done.stdout).get("success"))
    except ValueError:
        started = False
    if started and not hub.downloads:
        # the SuperLink took the FAB from elsewhere (its default is Flower Hub): the sites refuse it
        print(f"the run started, but the SuperLink did not fetch {spec} from {hub.url}: set its "
              f"FEDGLIOMA_APP_HUB_URL to {hub.url} (deploy/start-superlink.sh) and stop this run", file=sys.stderr)
        return 1
    return 0 if started else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.federation",
        description="Sign a Flower app with the federation's publisher key and start it on the SuperLink "
                    "(SuperNodes with --trusted-entities run nothing else).",
    )
    add_arguments(parser)
    try:
        return run_signed(parser.parse_args(argv))
    except (CredentialsError, ValueError, OSError) as err:  # bad key, no app (flwr build), hub port taken
        print(f"python -m deploy.federation: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
