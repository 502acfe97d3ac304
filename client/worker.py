"""The site's worker: one long-lived process that runs the site's messages (``federation.site_worker``).

Flower 1.41 starts a fresh ``flwr-clientapp`` process for every message and no mode keeps one
alive (adap/flower#3670), so every message paid for importing torch, MONAI and the model code
(about 4-5 s of a demo site's message on 2 CPU cores; on a GPU also the CUDA context). With
the worker, the first message of a site starts it; the ClientApp then only hands each message's
content to it and returns its reply. Each message still builds its model and opens its site
afresh (:mod:`client.handlers`: the same code, so the replies are the same), so nothing of one
message leaks into the next but the imported modules. Work a handler leaves for after its reply
(``federation.site_validation=after_reply``: the received model's validation) runs once the reply
is sent; the next message waits for it.

Where it runs and who may talk to it:

* a Unix socket in ``$TMPDIR/fedglioma-<uid>/`` (a folder only this user can enter); the socket's
  name is a digest of the site's state folder, the interpreter and the app's code, so a new
  version of the app (or another site on the same machine) gets a worker of its own;
* every connection must pass ``multiprocessing.connection``'s HMAC challenge with a random key
  kept in the site's state folder (``worker.key``, mode 0600);
* what crosses the socket never leaves the site's machine; the worker's log is
  ``<state folder>/worker.log``.

It stops by itself after ``federation.site_worker_idle_s`` without a message, and at once when the
process that started its ClientApps (the SuperNode's SuperExec) is gone. A worker that dies
during a message turns that message into an error reply (:class:`SiteWorkerError`); the next
message starts a new one. A site refuses the worker with ``site-worker="false"`` in its node
config; its messages then run in the ClientApp process, as without the option.

Written by hand: no library, Flower included, keeps a ClientApp's process alive across messages.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import pickle
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

from client.state import node_flag
from common.io import private_dir

#: the app's root: the folder holding the ``client`` and ``common`` packages (the installed FAB)
APP_ROOT = Path(__file__).resolve().parents[1]
KEY_FILE = "worker.key"
LOG_FILE = "worker.log"
#: how long a ClientApp waits for a worker it started to accept connections
START_TIMEOUT_S = 120.0


class SiteWorkerError(RuntimeError):
    """The site's worker could not start, or stopped during a message."""


def worker_wanted(node_config: Mapping[str, Any], enabled: bool) -> bool:
    """The run asks for the worker (``federation.site_worker``) and the site has not refused it."""
    return enabled and node_flag(node_config, "site-worker", True)


# ----------------------------------------------------------------------------------- addresses
def code_fingerprint(root: Path = APP_ROOT) -> str:
    """Digest of the interpreter, the import path and every source/config file of the app (path,
    size, mtime): a changed app gets a new worker."""
    digest = hashlib.sha256(f"{sys.executable}\0{os.pathsep.join(sys.path)}".encode())
    for package in ("client", "common"):
        for path in sorted((root / package).rglob("*")):
            if path.suffix in {".py", ".yaml"}:
                stat = path.stat()
                digest.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()


def socket_dir() -> Path:
    """``$TMPDIR/fedglioma-<uid>``, made owner-only; refused when another user owns it or can enter it."""
    folder = private_dir(Path(tempfile.gettempdir()) / f"fedglioma-{os.getuid()}")
    stat = folder.stat()
    if stat.st_uid != os.getuid() or stat.st_mode & 0o077:
        raise SiteWorkerError(
            f"{folder} is not private to this user (owner uid {stat.st_uid}, mode {stat.st_mode & 0o777:o}); "
            "remove it, or set site-worker=\"false\" in the node config"
        )
    return folder


def socket_path(state_dir: Path) -> Path:
    """Where the worker of the site with state folder ``state_dir`` (and of this code) listens.
    In the temp folder, not the state folder: a Unix socket's path is limited to ~107 bytes."""
    name = hashlib.sha256(f"{state_dir.resolve()}\0{code_fingerprint()}".encode()).hexdigest()[:24]
    return socket_dir() / f"{name}.sock"


def worker_pid(state_dir: Path) -> int | None:
    """The process id of the site's live worker (of this code), or None."""
    try:
        pid = int(socket_path(state_dir).with_suffix(".pid").read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def worker_key(state_dir: Path) -> bytes:
    """The site's worker key (created on first use, owner-only)."""
    path = private_dir(state_dir) / KEY_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_bytes()
        if len(key) < 32:
            raise SiteWorkerError(f"{path} is damaged (under 32 bytes): delete it, a new one is made") from None
        return key
    key = secrets.token_bytes(32)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key)
    return key


# -------------------------------------------------------------------------------------- client
def call(kind: str, content: Any, node_config: Mapping[str, Any], run_config: Mapping[str, Any],
         state_dir: Path, idle_s: float, owner_pid: int | None = None) -> tuple[Any, bool]:
    """Run the ``kind`` handler (:data:`client.handlers.HANDLERS`) in the site's worker, starting
    it when none answers. Returns (the handler's reply content, whether this call started the
    worker). The handler's exception is raised here, with the worker's traceback as a note.
    A worker started here stops when ``owner_pid`` (default: this process's parent, the
    SuperExec that starts the ClientApps) is gone."""
    address, key = socket_path(state_dir), worker_key(state_dir)
    started = False
    conn = _connect(address, key)
    if conn is None:
        with _spawn_lock(address):
            conn = _connect(address, key)  # another message may have started it meanwhile
            if conn is None:
                conn = _start(address, key, state_dir, idle_s, os.getppid() if owner_pid is None else owner_pid)
                started = True
    with conn:
        try:
            conn.send((kind, content, dict(node_config), dict(run_config)))
            status, payload, text = conn.recv()
        except (EOFError, OSError) as exc:
            raise SiteWorkerError(
                "the site's worker process stopped during the message (see worker.log in the site's state "
                "folder); the next message starts a new one"
            ) from exc
    if status == "error":
        if text:
            payload.add_note(f"in the site's worker:\n{text}")
        raise payload
    return payload, started


def _connect(address: Path, key: bytes) -> Connection | None:
    """A connection to a live worker at ``address``, or None (no socket, or nobody answers it)."""
    if not address.exists():
        return None
    try:
        return Client(str(address), family="AF_UNIX", authkey=key)
    except (ConnectionRefusedError, FileNotFoundError, EOFError, ConnectionResetError, BrokenPipeError):
        return None  # a socket left by a worker that is gone (or going): the caller starts one


@contextmanager
def _spawn_lock(address: Path) -> Iterator[None]:
    with open(address.with_suffix(".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _start(address: Path, key: bytes, state_dir: Path, idle_s: float, owner_pid: int) -> Connection:
    """Start a worker for ``address`` and return a connection to it."""
    address.unlink(missing_ok=True)  # a stale socket (its worker is gone: nobody answered it)
    log_path = private_dir(state_dir) / LOG_FILE
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    command = [sys.executable, "-m", "client.worker", "--socket", str(address), "--state", str(state_dir),
               "--idle-s", str(idle_s), "--owner-pid", str(owner_pid)]
    with open(log_path, "ab") as log:
        os.chmod(log_path, 0o600)
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   cwd=APP_ROOT, env=env, close_fds=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        conn = _connect(address, key)
        if conn is not None:
            return conn
        if process.poll() is not None:
            raise SiteWorkerError(f"the site's worker exited at start (code {process.returncode}); see worker.log "
                                  "in the site's state folder, or set site-worker=\"false\" in the node config")
        time.sleep(0.05)
    process.kill()
    raise SiteWorkerError(f"the site's worker did not answer within {START_TIMEOUT_S:.0f} s; see worker.log in the "
                          "site's state folder")


# -------------------------------------------------------------------------------------- worker
class _Lifetime:
    """When the worker stops: idle too long (never during a message), or its owner is gone (at once)."""

    def __init__(self, address: Path, idle_s: float, owner_pid: int) -> None:
        self.address, self.idle_s, self.owner_pid = address, idle_s, owner_pid
        self.lock = threading.Lock()
        self.busy = False
        self.last = time.monotonic()

    def owner_alive(self) -> bool:
        try:
            os.kill(self.owner_pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        try:  # a zombie is gone too
            return Path(f"/proc/{self.owner_pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
        except OSError:
            return True

    def watch(self) -> None:
        while True:
            time.sleep(0.5)
            with self.lock:
                idle = not self.busy and time.monotonic() - self.last > self.idle_s
                if idle or not self.owner_alive():
                    self.address.unlink(missing_ok=True)  # no new message reaches a stopping worker
                    self.address.with_suffix(".pid").unlink(missing_ok=True)
                    print(f"worker {os.getpid()}: {'idle' if idle else 'owner gone'}, stopping", flush=True)
                    os._exit(0)

    def begin(self) -> None:
        with self.lock:
            self.busy = True

    def end(self) -> None:
        with self.lock:
            self.busy, self.last = False, time.monotonic()


def serve(address: Path, state_dir: Path, idle_s: float, owner_pid: int) -> None:
    """Answer messages on ``address`` until idle for ``idle_s`` or ``owner_pid`` is gone."""
    # the imports every message would otherwise pay for, done once (torch, MONAI, the model code)
    from client import handlers
    import client.session  # noqa: F401
    import common.model  # noqa: F401

    key = worker_key(state_dir)
    lifetime = _Lifetime(address, idle_s, owner_pid)
    listener = Listener(str(address), family="AF_UNIX", backlog=4, authkey=key)
    os.chmod(address, 0o600)
    address.with_suffix(".pid").write_text(str(os.getpid()))
    threading.Thread(target=lifetime.watch, daemon=True).start()
    print(f"worker {os.getpid()} ready on {address} (idle stop after {idle_s:.0f} s, owner pid {owner_pid})", flush=True)
    served = 0
    while True:
        try:
            conn = listener.accept()
        except Exception as exc:  # noqa: BLE001 - a failed HMAC challenge, a peer that went away
            print(f"worker {os.getpid()}: refused a connection ({type(exc).__name__})", flush=True)
            continue
        lifetime.begin()
        try:
            with conn:
                kind, content, node_config, run_config = conn.recv()
                started = time.perf_counter()
                later: list[Any] = []  # work a handler leaves for after its reply (after_reply validation)
                try:
                    reply = ("ok", handlers.HANDLERS[kind](content, node_config, run_config, defer=later.append), "")
                except Exception as exc:  # noqa: BLE001 - handed to the ClientApp, which replies with an error
                    reply = ("error", _portable(exc), traceback.format_exc())
                served += 1
                print(f"worker {os.getpid()}: {kind} message {served} in {time.perf_counter() - started:.1f} s "
                      f"({reply[0]})", flush=True)
                conn.send(reply)
                del reply, content
            _after_reply(later)
            _release_gpu_memory()
        except (OSError, EOFError) as exc:
            print(f"worker {os.getpid()}: lost the ClientApp during a message ({type(exc).__name__})", flush=True)
        finally:
            lifetime.end()  # the next message waits for the work after the reply: it reads its result


def _after_reply(jobs: list[Any]) -> None:
    """Run the work handlers left for after their reply; a failure is logged here (worker.log):
    the next reply then lacks what the job would have kept, and the server records the model
    without this site's validation."""
    for job in jobs:
        started = time.perf_counter()
        try:
            job()
        except Exception:  # noqa: BLE001 - the reply is sent already; nothing else to tell
            print(f"worker {os.getpid()}: the work after the reply failed:\n{traceback.format_exc()}", flush=True)
        else:
            print(f"worker {os.getpid()}: work after the reply in {time.perf_counter() - started:.1f} s", flush=True)


def _release_gpu_memory() -> None:
    """Between messages the worker holds no model: hand its cached CUDA blocks back."""
    import torch  # here, not at the top: the ClientApp imports this module and must not pay for torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _portable(exc: Exception) -> Exception:
    """``exc`` if it survives pickling (so the ClientApp sees its class), else a SiteWorkerError
    naming only its class."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any unpicklable exception
        return SiteWorkerError(f"{type(exc).__name__} in the site's worker")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client.worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--idle-s", type=float, required=True)
    parser.add_argument("--owner-pid", type=int, required=True)
    args = parser.parse_args(argv)
    serve(args.socket, args.state, args.idle_s, args.owner_pid)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
