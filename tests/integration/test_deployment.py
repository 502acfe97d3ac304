"""The real deployment engine on 127.0.0.1 through :class:`deploy.federation.LocalFederation`:
a TLS SuperLink with SuperNode authentication, registered and unregistered site keys, SuperNodes
with ``--trusted-entities`` that run the app signed by the federation's publisher key and refuse
an unsigned one or one signed by another key, and a trivial Flower app (numpy arrays only) whose
runs must end as ``finished:completed`` or ``finished:failed`` exactly when they should. Every
process is stopped and checked gone. The deploy scripts and templates are checked against the
launcher's flags and their secure defaults (loopback bind, owner-only state.db).

Runtime on 2 shared cores: about two minutes (Flower's SuperNodes and Grid poll every ~3 s).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import ssl
import stat
import subprocess
import sys
import textwrap
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.certs import Credentials, create_publisher_key, ensure_credentials
from deploy.federation import (
    LocalFederation,
    ManagedProcess,
    descendant_processes,
    format_config,
    free_port,
)
from server.errors import FederationError
from tests.integration.conftest import flower_processes, wait_until_gone

pytestmark = pytest.mark.integration

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
VENV_BIN = str(Path(sys.executable).parent)
#: an nginx binary for the reverse-proxy test (not a project dependency: skipped when absent)
#: (.ci/run installs it with apt-get; Debian puts it in /usr/sbin, which a non-root PATH may lack)
NGINX = (os.environ.get("FEDGLIOMA_TEST_NGINX") or shutil.which("nginx")
         or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None))
SITES = {"site-a": 1.0, "site-b": 3.0}  # site -> the offset its ClientApp adds to every weight

PYPROJECT = """
[project]
name = "probeapp"
version = "1.0.0"
dependencies = ["numpy"]

[tool.flwr.app]
publisher = "fedglioma-tests"

[tool.flwr.app.components]
serverapp = "probeapp.server_app:app"
clientapp = "probeapp.client_app:app"

[tool.flwr.app.config]
fail = false
min-nodes = 2

[tool.flwr.app.config.out]
file = ""
"""

CLIENT_APP = """
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    # deploy/start-supernode.sh sets only data-path and site-name: offset 1 then
    offset = float(context.node_config.get("offset", 1.0))
    arrays = [a + offset for a in msg.content["arrays"].to_numpy_ndarrays()]
    metrics = MetricRecord({"num-examples": 1, "offset": offset})
    return Message(RecordDict({"arrays": ArrayRecord(arrays), "metrics": metrics}), reply_to=msg)
"""

SERVER_APP = """
import json
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    if context.run_config["fail"]:
        raise RuntimeError("probe failure requested")
    n = int(context.run_config["min-nodes"])
    strategy = FedAvg(fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord([np.zeros(8, dtype=np.float32)]),
                            num_rounds=1, timeout=120)
    Path(str(context.run_config["out.file"])).write_text(json.dumps({
        "weights": result.arrays.to_numpy_ndarrays()[0].tolist(),
        "mean_offset": float(result.train_metrics_clientapp[1]["offset"]),
    }))
"""


def write_probe_app(root: Path) -> Path:
    """A minimal Flower app (package ``probeapp``, unique so nothing on the SuperLink's path shadows
    it): each ClientApp adds its node's ``offset`` to the weights; the ServerApp raises when
    ``fail``, else runs one FedAvg round over ``min-nodes`` nodes and writes the averaged weights
    to ``out.file`` (a dotted key, like fedglioma's run-config keys)."""
    (root / "probeapp").mkdir(parents=True)
    (root / "pyproject.toml").write_text(textwrap.dedent(PYPROJECT))
    (root / "probeapp" / "__init__.py").write_text("")
    (root / "probeapp" / "client_app.py").write_text(textwrap.dedent(CLIENT_APP))
    (root / "probeapp" / "server_app.py").write_text(textwrap.dedent(SERVER_APP))
    return root


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    """Run the block with this process's umask at ``mask`` (so a file mode check can fail for real
    whatever umask the test runner had), restored afterwards."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _node_logs_since(proc: ManagedProcess, marker: str) -> str:
    """The SuperNode's log after the first line containing ``marker`` (a run id)."""
    text = proc.log_path.read_text(errors="replace")
    return text[text.find(marker):] if marker in text else ""


def _wait_for_log(proc: ManagedProcess, marker: str, needle: str, timeout_s: float = 60.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if needle in (text := _node_logs_since(proc, marker)):
            return text
        time.sleep(0.5)
    raise AssertionError(f"{proc.name} never logged {needle!r} after {marker!r}:\n{proc.log_tail(30)}")


class Federation:
    """What the module fixture hands to the tests."""

    def __init__(self, fed: LocalFederation, creds: Credentials, node_ids: dict[str, int], app: Path, timings: dict[str, float]):
        self.fed, self.creds, self.node_ids, self.app, self.timings = fed, creds, node_ids, app, timings


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("federation")
    creds = ensure_credentials(root / "certs", [*SITES, "intruder"])
    app = write_probe_app(root / "app")
    timings: dict[str, float] = {}
    tracked: dict[int, int] = {}
    with LocalFederation(root / "work", creds) as fed:
        t0 = time.perf_counter()
        with _umask(0o022):  # a typical login umask: state.db must still come out 0600
            fed.start_superlink()
        timings["superlink_start_s"] = time.perf_counter() - t0
        node_ids = {site: fed.register_site(site, creds.site_public_key(site)) for site in SITES}
        for site, offset in SITES.items():
            fed.start_supernode(site, creds.site_private_key(site), {"offset": offset, "site-name": site})
        # a site whose key was never registered: the SuperLink must refuse it
        fed.start_supernode("intruder", creds.site_private_key("intruder"), {"offset": 100.0})
        try:
            yield Federation(fed, creds, node_ids, app, timings)
        finally:
            for proc in fed.processes():
                if proc.returncode is None:
                    tracked[proc.popen.pid] = 0
                    tracked.update(descendant_processes(proc.popen.pid))
    # outside the `with`: LocalFederation.stop() has run; the SuperLink's and SuperNodes' own
    # children (SuperExec, app processes, started in sessions of their own) must be gone too
    assert len(tracked) >= 6, f"expected SuperLink, 2 SuperNodes and their SuperExecs, tracked {tracked}"
    left = wait_until_gone(list(tracked), timeout_s=10)
    assert not left, f"still running after stop(): {left}"
    print(f"\ntimings: {json.dumps({k: round(v, 1) for k, v in timings.items()})}")


def test_superlink_serves_health_over_tls_verified_by_the_ca(federation: Federation) -> None:
    fed = federation.fed
    url = f"https://127.0.0.1:{fed.port}/health"
    context = ssl.create_default_context(cafile=str(federation.creds.ca_cert))
    with urllib.request.urlopen(url, context=context, timeout=5) as response:
        assert response.status == 200
    # a client that does not trust our CA is refused: the certificate is not self-signed-accepted
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen(url, context=ssl.create_default_context(), timeout=5)
    # and there is no plaintext HTTP on the port
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"http://127.0.0.1:{fed.port}/health", timeout=5)
    connection = tomllib.loads((fed.flwr_home / "config.toml").read_text())["superlink"]
    assert connection["default"] == "fedglioma-local"
    assert connection["fedglioma-local"] == {
        "address": f"127.0.0.1:{fed.port}", "root-certificates": str(federation.creds.ca_cert)
    }
    assert "--enable-supernode-auth" in fed.superlink_command()
    assert "--disable-runtime-dependency-installation" in fed.superlink_command()
    # runs, registered nodes and model weights: readable by the SuperLink's user only
    assert _mode(fed.workdir / "superlink" / "state.db") == 0o600


def test_supernodes_run_with_the_federation_publisher_as_trusted_entity(federation: Federation) -> None:
    fed = federation.fed
    for site in SITES:
        argv = _argv(fed.supernodes[site])
        assert argv[argv.index("--trusted-entities") + 1] == str(federation.creds.trusted_entities)


def test_registered_sites_connect_and_keep_their_node_ids(federation: Federation) -> None:
    fed = federation.fed
    nodes = fed.wait_for_nodes(list(SITES), timeout_s=60)
    online = {int(n["node-id"]) for n in nodes if n["status"] == "online"}
    assert online == set(federation.node_ids.values())  # and not the intruder
    # registering again (a demo re-run on the persistent database) gives the same node id
    assert fed.register_site("site-a", federation.creds.site_public_key("site-a")) == federation.node_ids["site-a"]


def test_unregistered_site_key_is_refused(federation: Federation) -> None:
    fed = federation.fed
    intruder = fed.supernodes["intruder"]
    intruder.popen.wait(timeout=60)
    assert intruder.returncode not in (0, None)
    node_log = intruder.log_tail(80)
    # Flower 1.41 prints exit code 305 (the process itself exits with 1)
    assert "Exit Code: 305" in node_log and "Failed to activate SuperNode" in node_log
    assert "No SuperNode found with the given public key" in fed.superlink.log_path.read_text()


def test_trivial_app_round_completes_with_the_fedavg_mean(federation: Federation, tmp_path: Path) -> None:
    fed = federation.fed
    out_file = tmp_path / "result with space.json"
    t0 = time.perf_counter()
    run_id = fed.run(federation.app, {"out.file": str(out_file)})
    # a round needs several 3-s polls of SuperNodes and Grid: it cannot be over within 0.5 s
    with pytest.raises(TimeoutError, match=rf"run {run_id} is still .* flwr stop {run_id}"):
        fed.wait(run_id, timeout_s=0.5, poll_s=0.2)
    statuses: list[str] = []
    status = fed.wait(run_id, timeout_s=120, poll_s=1.0, on_poll=statuses.append)
    federation.timings["one_round_run_s"] = time.perf_counter() - t0
    assert status == "finished:completed", fed.logs(run_id)[-3000:]
    assert statuses[-1] == status and all(not s.startswith("finished") for s in statuses[:-1])
    result = json.loads(out_file.read_text())
    # FedAvg with equal num-examples: mean of the two sites' offsets (1 and 3) added to zeros; the
    # intruder's offset (100) must not be in it
    assert result["weights"] == [pytest.approx(2.0)] * 8
    assert result["mean_offset"] == pytest.approx(2.0)
    # it ran as a signed Hub app: the SuperLink fetched FAB and signature from the launcher's hub
    assert fed.app_hub is not None and ("@fedglioma-tests/probeapp", "1.0.0") in fed.app_hub.downloads


def test_supernodes_refuse_an_unsigned_app(federation: Federation, tmp_path: Path) -> None:
    """What anyone who reaches the Control API can do: `flwr run APP_DIR` uploads the FAB unsigned.
    Every SuperNode answers with an error instead of starting the ClientApp."""
    fed = federation.fed
    out_file = tmp_path / "unsigned.json"
    config = fed._write_run_config({"out.file": str(out_file)})
    done = fed.flwr("run", str(federation.app), fed.connection, "--run-config", str(config), "--format", "json")
    run_id = json.loads(done.stdout[done.stdout.find("{"):])["run-id"]
    for site in SITES:
        log = _wait_for_log(fed.supernodes[site], f"[RUN {run_id}]", "App verification is not supported")
        assert "Start `flwr-clientapp` process" not in log
    assert fed.wait(int(run_id), timeout_s=120, poll_s=1.0).startswith("finished")
    assert not out_file.exists()  # no site trained, so the ServerApp had nothing to average


def test_supernodes_refuse_an_app_signed_by_another_publisher(federation: Federation, tmp_path: Path) -> None:
    fed = federation.fed
    rogue = create_publisher_key(tmp_path / "rogue")  # a valid Ed25519 key, not in trusted-entities.yaml
    out_file = tmp_path / "rogue.json"
    run_id = fed.run(federation.app, {"out.file": str(out_file)}, publisher_key=rogue)
    for site in SITES:
        log = _wait_for_log(fed.supernodes[site], f"[RUN {run_id}]", "FAB verification failed")
        assert "Start `flwr-clientapp` process" not in log
    assert fed.wait(run_id, timeout_s=120, poll_s=1.0).startswith("finished")
    assert not out_file.exists()


def test_failing_server_app_is_reported_failed(federation: Federation) -> None:
    fed = federation.fed
    run_id = fed.run(federation.app, {"fail": True})
    assert fed.wait(run_id, timeout_s=120, poll_s=1.0) == "finished:failed"
    assert "probe failure requested" in fed.logs(run_id)


def test_exit_on_error_stops_the_superlink_and_its_superexec(tmp_path: Path) -> None:
    creds = ensure_credentials(tmp_path / "certs", [])
    tracked: dict[int, int] = {}
    with pytest.raises(KeyboardInterrupt):
        with LocalFederation(tmp_path / "work", creds) as fed:
            fed.start_superlink()
            tracked = {fed.superlink.popen.pid: 0, **descendant_processes(fed.superlink.popen.pid)}
            assert any("flower-superexec" in c for c in flower_processes(tracked).values())
            raise KeyboardInterrupt
    assert not wait_until_gone(list(tracked), timeout_s=10)
    assert fed.superlink.returncode is not None
    assert (tmp_path / "work" / "logs" / "superlink.log").read_text().startswith("$ ")


def test_superlink_start_failure_shows_the_log(tmp_path: Path) -> None:
    creds = ensure_credentials(tmp_path / "certs", [])
    creds.server_key.write_text("not a key")  # TLS set-up fails inside flower-superlink
    with LocalFederation(tmp_path / "work", creds) as fed:
        with pytest.raises(FederationError, match="exited with code"):
            fed.start_superlink(timeout_s=60)


def test_config_formatting_quotes_strings_toml_style() -> None:
    assert format_config({"data-path": "/a b/c", "partition-id": 0, "lr": 1e-05, "ok": True}) == (
        'data-path="/a b/c" partition-id=0 lr=1e-05 ok=true'
    )
    assert format_config({"p": 'C:\\data "x"'}) == "p='C:\\data \"x\"'"
    with pytest.raises(ValueError, match="key"):
        format_config({"bad key": 1})
    with pytest.raises(ValueError, match="control characters"):
        format_config({"k": "a\nb"})


def _argv(proc: ManagedProcess) -> list[str]:
    """The running process's argv (a deploy script has exec-ed into the Flower executable)."""
    return Path(f"/proc/{proc.popen.pid}/cmdline").read_bytes().decode().split("\0")[:-1]


def _flags(argv: list[str]) -> set[str]:
    return {a for a in argv if a.startswith("--")}


def _wait_online(fed: LocalFederation, node_id: int, proc: ManagedProcess, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.returncode is None, f"{proc.name} exited with {proc.returncode}:\n{proc.log_tail()}"
        if any(int(n["node-id"]) == node_id and n["status"] == "online" for n in fed.nodes()):
            return
        time.sleep(1.0)
    raise AssertionError(f"node {node_id} not online after {timeout_s} s:\n{proc.log_tail()}")


def test_deploy_scripts_run_the_same_secure_federation(tmp_path: Path) -> None:
    """deploy/start-superlink.sh, register-sites.sh, start-supernode.sh and ``python -m
    deploy.federation`` (a signed run) as a coordinator and a hospital would run them (here both on
    loopback), with the scripts' defaults for bind address and app verification, checked against
    the launcher's flags."""
    creds = ensure_credentials(tmp_path / "certs", ["site-a"])
    app = write_probe_app(tmp_path / "app")
    inbox = tmp_path / "received-keys"  # the coordinator only ever receives .pub files
    inbox.mkdir()
    shutil.copy(creds.site_public_key("site-a"), inbox)
    data = tmp_path / "hospital data" / "site-a"
    data.mkdir(parents=True)
    (data / "labels.csv").write_text("case_id,idh,codeletion_1p19q,grade,mgmt\n")
    state = tmp_path / "superlink-state"
    hub_port = free_port()  # where `python -m deploy.federation` serves the signed app
    with LocalFederation(tmp_path / "work", creds) as fed:
        with _umask(0o022):
            fed.start_superlink(  # no FEDGLIOMA_HOST: the script's default bind
                command=["bash", str(DEPLOY / "start-superlink.sh"), str(creds.directory)],
                extra_env={"FEDGLIOMA_PORT": str(fed.port), "FEDGLIOMA_STATE_DIR": str(state), "FEDGLIOMA_BIN": VENV_BIN,
                           "FEDGLIOMA_APP_HUB_URL": f"http://127.0.0.1:{hub_port}/v1"},
            )
        script_argv = _argv(fed.superlink)
        assert _flags(script_argv) == _flags(fed.superlink_command())
        assert script_argv[script_argv.index("--host") + 1] == "127.0.0.1"
        assert script_argv[script_argv.index("--database") + 1] == str(state / "state.db")
        assert script_argv[script_argv.index("--ssl-keyfile") + 1] == str(creds.server_key)
        assert _mode(state / "state.db") == 0o600

        register = ["bash", str(DEPLOY / "register-sites.sh"), str(inbox), fed.connection]
        env = {**fed.env, "FEDGLIOMA_BIN": VENV_BIN}
        first = subprocess.run(register, env=env, capture_output=True, text=True, timeout=120)
        assert first.returncode == 0, first.stdout + first.stderr
        line = next(li for li in first.stdout.splitlines() if li.startswith("registered"))
        node_id = int(line.split("node-id")[1])
        again = subprocess.run(register, env=env, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0 and again.stdout.startswith("already      site-a"), again.stdout + again.stderr

        node = fed.spawn(
            "supernode-site-a", ["bash", str(DEPLOY / "start-supernode.sh"), "site-a", str(data)], tmp_path,
            extra_env={"FEDGLIOMA_SUPERLINK": fed.address, "FEDGLIOMA_CA": str(creds.ca_cert),
                       "FEDGLIOMA_KEY": str(creds.site_private_key("site-a")),
                       "FEDGLIOMA_TRUSTED_ENTITIES": str(creds.trusted_entities),
                       "FEDGLIOMA_LOCAL_PORT": str(free_port()), "FEDGLIOMA_WORKDIR": str(tmp_path / "site-work"),
                       "FEDGLIOMA_BIN": VENV_BIN},
        )
        _wait_online(fed, node_id, node)
        node_argv = _argv(node)
        assert _flags(node_argv) == _flags(fed.supernode_command(creds.site_private_key("site-a"), {"k": 1}, 9094))
        assert node_argv[node_argv.index("--node-config") + 1] == f'data-path="{data}" site-name="site-a"'
        assert node_argv[node_argv.index("--trusted-entities") + 1] == str(creds.trusted_entities)

        # the coordinator starts a signed run; the SuperLink fetches it from the script's FEDGLIOMA_APP_HUB_URL
        out_file = tmp_path / "out.json"
        overrides = fed._write_run_config({"out.file": str(out_file), "min-nodes": 1})
        signed = subprocess.run(
            [sys.executable, "-m", "deploy.federation", str(app), fed.connection, "--publisher-key",
             str(creds.publisher_key), "--hub-port", str(hub_port), "--run-config", str(overrides)],
            env=fed.env, cwd=DEPLOY.parent, capture_output=True, text=True, timeout=300,
        )
        assert signed.returncode == 0, signed.stdout + signed.stderr
        run_id = int(json.loads(signed.stdout[signed.stdout.find("{"):])["run-id"])
        assert fed.wait(run_id, timeout_s=120, poll_s=1.0) == "finished:completed", fed.logs(run_id)[-3000:]
        assert json.loads(out_file.read_text())["weights"] == [pytest.approx(1.0)] * 8


def _superlink_script(certs: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``start-superlink.sh [ARGS] CERTS`` with ``env`` added (FEDGLIOMA_HOST, ...), run to its end."""
    return subprocess.run(
        ["bash", str(DEPLOY / "start-superlink.sh"), *args, str(certs)], capture_output=True, text=True, timeout=60,
        env={**os.environ, "FEDGLIOMA_BIN": VENV_BIN, "FEDGLIOMA_STATE_DIR": str(certs.parent / "state"), **env},
    )


def test_superlink_script_binds_loopback_unless_a_fleet_proxy_is_declared(tmp_path: Path) -> None:
    """The Control API shares the Fleet API's port and has no authentication: a routable bind is
    refused until the operator states that a fleet-only proxy or firewall is in front."""
    creds = ensure_credentials(tmp_path / "certs", [])
    default = _superlink_script(creds.directory, "--dry-run")
    assert default.returncode == 0, default.stderr
    assert " --host 127.0.0.1 " in default.stderr

    refused = _superlink_script(creds.directory, "--dry-run", FEDGLIOMA_HOST="0.0.0.0")
    assert refused.returncode == 1
    assert "refusing to bind 0.0.0.0" in refused.stderr and "/v1/control/" in refused.stderr
    assert "deploy/nginx-fleet-only.conf" in refused.stderr and "--public-behind-proxy" in refused.stderr
    assert "flower-superlink" not in refused.stderr.split("refusing")[0]  # nothing was started or printed first

    for allowed in (_superlink_script(creds.directory, "--public-behind-proxy", "--dry-run", FEDGLIOMA_HOST="0.0.0.0"),
                    _superlink_script(creds.directory, "--dry-run", FEDGLIOMA_HOST="0.0.0.0", FEDGLIOMA_BEHIND_FLEET_PROXY="1")):
        assert allowed.returncode == 0, allowed.stderr
        assert " --host 0.0.0.0 " in allowed.stderr
    assert not (tmp_path / "state").exists()  # a dry run creates nothing


def test_superlink_script_refuses_a_ca_key_next_to_its_own(tmp_path: Path) -> None:
    creds = ensure_credentials(tmp_path / "certs", [])
    shutil.copy(creds.ca_key, creds.directory / "ca.key")  # the layout of earlier versions
    done = _superlink_script(creds.directory, "--dry-run")
    assert done.returncode == 1 and "ca-private/" in done.stderr and "fedglioma certs" in done.stderr


def _supernode_script(data: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(DEPLOY / "start-supernode.sh"), *args, "site-a", str(data)], capture_output=True, text=True,
        timeout=60, env={**os.environ, "FEDGLIOMA_SUPERLINK": "127.0.0.1:1", "FEDGLIOMA_BIN": VENV_BIN, **env},
    )


def test_supernode_script_verifies_apps_unless_told_otherwise(tmp_path: Path) -> None:
    creds = ensure_credentials(tmp_path / "certs", ["site-a"])
    (tmp_path / "labels.csv").write_text("case_id\n")
    env = {"FEDGLIOMA_CA": str(creds.ca_cert), "FEDGLIOMA_KEY": str(creds.site_private_key("site-a"))}
    verified = _supernode_script(tmp_path, "--dry-run", **env, FEDGLIOMA_TRUSTED_ENTITIES=str(creds.trusted_entities))
    assert verified.returncode == 0, verified.stderr
    assert f"--trusted-entities {creds.trusted_entities}" in verified.stderr

    missing = _supernode_script(tmp_path, "--dry-run", **env, FEDGLIOMA_TRUSTED_ENTITIES=str(tmp_path / "none.yaml"))
    assert missing.returncode == 1 and "trusted-entities.yaml" in missing.stderr
    assert "FEDGLIOMA_ACCEPT_UNSIGNED_APPS=1" in missing.stderr

    unsigned = _supernode_script(tmp_path, "--dry-run", **env, FEDGLIOMA_TRUSTED_ENTITIES=str(tmp_path / "none.yaml"),
                                 FEDGLIOMA_ACCEPT_UNSIGNED_APPS="1")
    assert unsigned.returncode == 0 and "--trusted-entities" not in unsigned.stderr

    creds.trusted_entities.chmod(0o666)  # anyone could add a publisher
    writable = _supernode_script(tmp_path, "--dry-run", **env, FEDGLIOMA_TRUSTED_ENTITIES=str(creds.trusted_entities))
    assert writable.returncode == 1 and f"chmod go-w {creds.trusted_entities}" in writable.stderr


def test_supernode_script_refuses_a_readable_key(tmp_path: Path) -> None:
    creds = ensure_credentials(tmp_path / "certs", ["site-a"])
    key = creds.site_private_key("site-a")
    key.chmod(0o644)
    (tmp_path / "labels.csv").write_text("case_id\n")
    done = subprocess.run(
        ["bash", str(DEPLOY / "start-supernode.sh"), "site-a", str(tmp_path)], capture_output=True, text=True,
        env={**os.environ, "FEDGLIOMA_SUPERLINK": "127.0.0.1:1", "FEDGLIOMA_CA": str(creds.ca_cert),
             "FEDGLIOMA_KEY": str(key), "FEDGLIOMA_BIN": VENV_BIN},
    )
    assert done.returncode == 1 and f"chmod 600 {key}" in done.stderr


def test_templates_start_the_deploy_scripts() -> None:
    """compose and systemd run the scripts tested above, so their Flower flags are the same."""
    import yaml

    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    superlink, supernode = services["superlink"], services["supernode"]
    assert superlink["command"][0] == "/opt/fedglioma/deploy/start-superlink.sh"
    assert supernode["command"][0] == "/opt/fedglioma/deploy/start-supernode.sh"
    # the SuperLink binds the host's loopback, as under systemd: no published port, no proxy claim
    assert superlink["network_mode"] == "host" and "ports" not in superlink
    assert superlink["environment"]["FEDGLIOMA_HOST"] == "127.0.0.1"
    assert "FEDGLIOMA_BEHIND_FLEET_PROXY" not in superlink["environment"]
    # it gets the three files it reads from the credentials folder, not the folder (ca-private/ is in it)
    cert_mounts = [v.rsplit(":", 2)[1] for v in superlink["volumes"] if v.startswith("${FEDGLIOMA_CERTS")]
    assert sorted(cert_mounts) == ["/certs/ca.crt", "/certs/superlink.crt", "/certs/superlink.key"]
    assert supernode["environment"]["FEDGLIOMA_TRUSTED_ENTITIES"] == "/secrets/trusted-entities.yaml"
    assert "FEDGLIOMA_ACCEPT_UNSIGNED_APPS" not in supernode["environment"]
    for service in services.values():
        assert service["environment"]["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    superlink_unit = (DEPLOY / "systemd" / "fedglioma-superlink.service").read_text()
    supernode_unit = (DEPLOY / "systemd" / "fedglioma-supernode@.service").read_text()
    assert "\nExecStart=/opt/fedglioma/deploy/start-superlink.sh\n" in superlink_unit
    assert "\nExecStart=/opt/fedglioma/deploy/start-supernode.sh %i\n" in supernode_unit
    assert "\nUMask=0077\n" in superlink_unit and "\nUMask=0077\n" in supernode_unit
    assert "\nEnvironment=FEDGLIOMA_HOST=127.0.0.1\n" in superlink_unit
    assert "FEDGLIOMA_BEHIND_FLEET_PROXY=1" not in superlink_unit.split("[Service]")[1]
    inaccessible = next(li for li in superlink_unit.splitlines() if li.startswith("InaccessiblePaths="))
    assert "/etc/fedglioma/certs/ca-private" in inaccessible and "/etc/fedglioma/certs/publisher" in inaccessible
    for script in DEPLOY.glob("*.sh"):
        assert os.access(script, os.X_OK), f"{script} is not executable"
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
        help_text = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True)
        assert help_text.returncode == 0 and help_text.stdout.startswith("usage:")


@pytest.mark.skipif(NGINX is None, reason="nginx not installed (or set FEDGLIOMA_TEST_NGINX=/path/to/nginx)")
def test_fleet_only_proxy_passes_sites_and_blocks_the_control_api(tmp_path: Path) -> None:
    """deploy/nginx-fleet-only.conf in front of a loopback SuperLink: a SuperNode that dials the
    proxy trains a round; /v1/control and /v1/runtime answer 403 through it."""
    creds = ensure_credentials(tmp_path / "certs", ["site-c"])
    app = write_probe_app(tmp_path / "app")
    proxy_port = free_port()
    with LocalFederation(tmp_path / "work", creds) as fed:
        fed.start_superlink()
        conf = (DEPLOY / "nginx-fleet-only.conf").read_text()
        conf = (conf.replace("127.0.0.1:8000", f"127.0.0.1:{fed.port}")
                .replace("listen 8443 ssl", f"listen 127.0.0.1:{proxy_port} ssl")
                .replace("/etc/fedglioma/certs", str(creds.directory)))
        ng = tmp_path / "nginx"
        ng.mkdir()
        temp_paths = " ".join(f"{k}_temp_path {ng}/{k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (ng / "nginx.conf").write_text(
            f"daemon off; master_process off; pid {ng}/nginx.pid; error_log {ng}/error.log;\n"
            f"events {{}}\nhttp {{ access_log {ng}/access.log; {temp_paths}\n{conf}\n}}\n"
        )
        proxy = fed.spawn("nginx", [NGINX, "-c", str(ng / "nginx.conf"), "-p", str(ng)], ng)
        context = ssl.create_default_context(cafile=str(creds.ca_cert))
        codes = {}
        for path in ("/health", "/v1/control/list-runs", "/v1/runtime/get-nodes", "/v1/fleet/get-run"):
            request = urllib.request.Request(f"https://localhost:{proxy_port}{path}", method="GET" if path == "/health" else "POST",
                                             data=None if path == "/health" else b"", headers={"Content-Type": "application/protobuf"})
            for _ in range(50):  # nginx needs a moment to listen
                try:
                    with urllib.request.urlopen(request, context=context, timeout=5) as response:
                        codes[path] = response.status
                    break
                except urllib.error.HTTPError as err:
                    codes[path] = err.code
                    break
                except urllib.error.URLError:
                    assert proxy.returncode is None, proxy.log_tail()
                    time.sleep(0.1)
        # fleet reaches the SuperLink (which wants a node signature: 401); the rest stops at the proxy
        assert codes == {"/health": 200, "/v1/control/list-runs": 403, "/v1/runtime/get-nodes": 403, "/v1/fleet/get-run": 401}

        node_id = fed.register_site("site-c", creds.site_public_key("site-c"))
        command = fed.supernode_command(creds.site_private_key("site-c"), {"offset": 5.0}, free_port())
        command[command.index("--superlink") + 1] = f"localhost:{proxy_port}"
        node = fed.spawn("supernode-site-c-via-proxy", command, tmp_path / "site-c")
        _wait_online(fed, node_id, node)
        out_file = tmp_path / "out.json"
        run_id = fed.run(app, {"out.file": str(out_file), "min-nodes": 1})
        assert fed.wait(run_id, timeout_s=120, poll_s=1.0) == "finished:completed", fed.logs(run_id)[-3000:]
        assert json.loads(out_file.read_text())["weights"] == [pytest.approx(5.0)] * 8
    requests = (ng / "access.log").read_text().splitlines()
    assert sum("/v1/fleet/" in r for r in requests) > 5  # the SuperNode's traffic went through the proxy
