"""The real deployment engine on 127.0.0.1 through :class:`deploy.federation.LocalFederation`:
a TLS SuperLink with SuperNode authentication, registered and unregistered site keys, and a
trivial Flower app (numpy arrays only) whose runs must end as ``finished:completed`` or
``finished:failed`` exactly when they should. Every process is stopped and checked gone.

Runtime on 2 shared cores: about a minute (Flower's SuperNodes and Grid poll every ~3 s).
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
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

from deploy.certs import Credentials, ensure_credentials
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
NGINX = os.environ.get("FEDGLIOMA_TEST_NGINX") or shutil.which("nginx")
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
    offset = float(context.node_config["offset"])
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
    assert (fed.workdir / "superlink" / "state.db").exists()


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
    """deploy/start-superlink.sh, register-sites.sh and start-supernode.sh as a coordinator and a
    hospital would run them (here both on loopback), checked against the launcher's flags."""
    creds = ensure_credentials(tmp_path / "certs", ["site-a"])
    inbox = tmp_path / "received-keys"  # the coordinator only ever receives .pub files
    inbox.mkdir()
    shutil.copy(creds.site_public_key("site-a"), inbox)
    data = tmp_path / "hospital data" / "site-a"
    data.mkdir(parents=True)
    (data / "labels.csv").write_text("case_id,idh,codeletion_1p19q,grade,mgmt\n")
    state = tmp_path / "superlink-state"
    with LocalFederation(tmp_path / "work", creds) as fed:
        fed.start_superlink(
            command=["bash", str(DEPLOY / "start-superlink.sh"), str(creds.directory)],
            extra_env={"FEDGLIOMA_HOST": "127.0.0.1", "FEDGLIOMA_PORT": str(fed.port),
                       "FEDGLIOMA_STATE_DIR": str(state), "FEDGLIOMA_BIN": VENV_BIN},
        )
        script_argv = _argv(fed.superlink)
        assert _flags(script_argv) == _flags(fed.superlink_command())
        assert script_argv[script_argv.index("--database") + 1] == str(state / "state.db")
        assert script_argv[script_argv.index("--ssl-keyfile") + 1] == str(creds.server_key)
        assert (state / "state.db").exists()

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
                       "FEDGLIOMA_LOCAL_PORT": str(free_port()), "FEDGLIOMA_WORKDIR": str(tmp_path / "site-work"),
                       "FEDGLIOMA_BIN": VENV_BIN},
        )
        _wait_online(fed, node_id, node)
        node_argv = _argv(node)
        assert _flags(node_argv) == _flags(fed.supernode_command(creds.site_private_key("site-a"), {"k": 1}, 9094))
        assert node_argv[node_argv.index("--node-config") + 1] == f'data-path="{data}" site-name="site-a"'


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
    assert services["superlink"]["command"][0] == "/opt/fedglioma/deploy/start-superlink.sh"
    assert services["supernode"]["command"][0] == "/opt/fedglioma/deploy/start-supernode.sh"
    assert services["superlink"]["ports"] == ["127.0.0.1:${FEDGLIOMA_PORT:-8000}:8000"]  # never public
    for service in services.values():
        assert service["environment"]["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    superlink_unit = (DEPLOY / "systemd" / "fedglioma-superlink.service").read_text()
    supernode_unit = (DEPLOY / "systemd" / "fedglioma-supernode@.service").read_text()
    assert "\nExecStart=/opt/fedglioma/deploy/start-superlink.sh\n" in superlink_unit
    assert "\nExecStart=/opt/fedglioma/deploy/start-supernode.sh %i\n" in supernode_unit
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
