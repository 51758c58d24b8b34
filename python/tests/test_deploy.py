"""deploy/k8s: every kustomization renders, validates offline against the Kubernetes OpenAPI
schemas, and wires Tandem to its engine pools consistently.

Rendering uses a real kustomize: `$KUSTOMIZE_BIN` (.ci/run installs the pinned one with
.ci/install-kustomize), else target/tools/kustomize-*/kustomize, else `kustomize` on PATH.
Schemas come from the pinned `kubernetes-validate` package (bundled, no network), in strict mode
(unknown fields are errors) for the oldest and newest Kubernetes minor versions we claim.
prometheus-operator's ServiceMonitor is a CRD that package has no schema for: it is checked
structurally here (field names and types, the selector and port it must hit).

Tandem's config is checked by the real binary: `tandem config check` on the rendered ConfigMap's
tandem.toml with the container's TANDEM__* variables (`$TANDEM_BIN`, else target/debug/tandem).
A pool's `protocol` decides what its engines must serve: "http" pools are dialled on the engine's
HTTP port, "grpc" pools on its --grpc-port, with its HTTP port as dns.metrics_port.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - CPython 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
POOLS = K8S / "pools" / "kustomization.yaml"
ADAPTER_VALUES = K8S / "components" / "hpa" / "prometheus-adapter-values.yaml"
METRICS_RS = REPO / "crates" / "tandem-proxy" / "src" / "metrics.rs"

# Oldest Kubernetes minor the manifests claim, and the newest kubernetes-validate 1.37.0 ships.
K8S_VERSIONS = ("1.30", "1.37")
TANDEM_DEPLOYMENT = "tandem"
TANDEM_CONTAINER = "tandem"
RATIO_ENV = "TANDEM__POOLS__TARGET_RATIO"
# vLLM's default for VLLM_NIXL_ABORT_REQUEST_TIMEOUT, seconds.
VLLM_NIXL_ABORT_DEFAULT_S = 480


# ---------------------------------------------------------------------------------------------
# Tools and rendering


def kustomize_bin() -> str:
    env = os.environ.get("KUSTOMIZE_BIN")
    if env:
        if not os.access(env, os.X_OK):
            pytest.fail(f"$KUSTOMIZE_BIN={env} is not an executable")
        return env
    installed = sorted((REPO / "target" / "tools").glob("kustomize-*/kustomize"))
    if installed:
        return str(installed[-1])
    found = shutil.which("kustomize")
    if found:
        return found
    pytest.fail(
        "kustomize not found: run .ci/install-kustomize (installs the pinned one under "
        "target/tools) or set KUSTOMIZE_BIN"
    )


def tandem_bin() -> str:
    env = os.environ.get("TANDEM_BIN")
    path = Path(env) if env else REPO / "target" / "debug" / "tandem"
    if not path.is_file() or not os.access(path, os.X_OK):
        pytest.fail(f"tandem binary not found at {path}: `cargo build -p tandem-app` or set TANDEM_BIN")
    return str(path)


def kustomizations() -> list[Path]:
    """Every directory under deploy/k8s that `kustomize build` accepts (components excluded)."""
    found = []
    for k in sorted(K8S.rglob("kustomization.yaml")):
        if yaml.safe_load(k.read_text()).get("kind", "Kustomization") == "Kustomization":
            found.append(k.parent)
    return found


OVERLAYS = kustomizations()
IDS = [str(d.relative_to(K8S)) for d in OVERLAYS]


@functools.lru_cache(maxsize=None)
def render(overlay: Path) -> tuple[dict, ...]:
    out = subprocess.run(
        [kustomize_bin(), "build", str(overlay)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, f"kustomize build {overlay} failed:\n{out.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


class Objects:
    def __init__(self, overlay: Path):
        self.overlay = overlay
        self.all = render(overlay)

    def of(self, kind: str) -> list[dict]:
        return [o for o in self.all if o["kind"] == kind]

    def get(self, kind: str, name: str) -> dict:
        hits = [o for o in self.of(kind) if o["metadata"]["name"] == name]
        assert len(hits) == 1, f"{self.overlay}: expected one {kind}/{name}, found {len(hits)}"
        return hits[0]

    def maybe(self, kind: str, name: str) -> dict | None:
        hits = [o for o in self.of(kind) if o["metadata"]["name"] == name]
        return hits[0] if hits else None

    def pod_templates(self) -> list[tuple[str, dict]]:
        kinds = ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet")
        return [
            (f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"])
            for o in self.all
            if o["kind"] in kinds
        ]

    def tandem(self) -> dict:
        return self.get("Deployment", TANDEM_DEPLOYMENT)

    def namespace(self) -> str:
        return self.tandem()["metadata"]["namespace"]


@pytest.fixture(params=OVERLAYS, ids=IDS)
def objs(request) -> Objects:
    return Objects(request.param)


def container(pod_template: dict, name: str | None = None) -> dict:
    cs = pod_template["spec"]["containers"]
    if name is None:
        assert len(cs) == 1, "engine pods run one container"
        return cs[0]
    hits = [c for c in cs if c["name"] == name]
    assert len(hits) == 1, f"no container {name}"
    return hits[0]


def env_map(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


def resolve_port(c: dict, port: int | str) -> int:
    if isinstance(port, int):
        return port
    named = [p["containerPort"] for p in c.get("ports", []) if p.get("name") == port]
    assert named, f"container {c['name']} has no port named {port!r}"
    return named[0]


def prestop_sleep_s(c: dict) -> int:
    pre = c.get("lifecycle", {}).get("preStop")
    assert pre, f"container {c['name']} has no preStop hook"
    if "sleep" in pre:
        return int(pre["sleep"]["seconds"])
    cmd = pre.get("exec", {}).get("command", [])
    assert len(cmd) == 2 and Path(cmd[0]).name == "sleep", f"unrecognised preStop hook {pre}"
    return int(cmd[1])


def selects(selector: dict, labels: dict) -> bool:
    """A LabelSelector (or a Service's plain selector map) against a label set."""
    structured = "matchLabels" in selector or "matchExpressions" in selector
    match = selector.get("matchLabels", {}) if structured else selector
    if any(labels.get(k) != v for k, v in match.items()):
        return False
    for e in selector.get("matchExpressions", []):
        op, key, values = e["operator"], e["key"], e.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def flag(args: list[str], name: str) -> str | None:
    """The value of `--name value` or `--name=value` in an argument list."""
    for i, a in enumerate(args):
        if a == name:
            return args[i + 1]
        if a.startswith(name + "="):
            return a[len(name) + 1 :]
    return None


def zmq_port(endpoint: str) -> int:
    m = re.fullmatch(r"tcp://[^:]+:(\d+)", endpoint)
    assert m, f"not a tcp ZMQ endpoint: {endpoint}"
    return int(m.group(1))


def parse_ratio(s: str) -> Fraction:
    p, d = s.split(":")
    return Fraction(int(p), int(d))


# ---------------------------------------------------------------------------------------------
# Tandem's effective configuration, as the pod sees it


@functools.lru_cache(maxsize=None)
def effective_config(overlay: Path, tmp: Path) -> dict:
    o = Objects(overlay)
    pod = o.tandem()["spec"]["template"]
    c = container(pod, TANDEM_CONTAINER)
    args = c.get("args", [])
    assert args[:1] == ["serve"], f"Tandem runs `tandem serve`, got {args}"
    path = flag(args, "--config")
    assert path, "tandem serve needs --config"
    mounts = [m for m in c.get("volumeMounts", []) if path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert len(mounts) == 1, f"no volume mounted over {path}"
    volume = [v for v in pod["spec"]["volumes"] if v["name"] == mounts[0]["name"]][0]
    cm = o.get("ConfigMap", volume["configMap"]["name"])
    key = path[len(mounts[0]["mountPath"].rstrip("/")) + 1 :]
    assert key in cm["data"], f"ConfigMap {cm['metadata']['name']} has no key {key}"
    toml_text = cm["data"][key]
    assert "target_ratio" not in tomllib.loads(toml_text).get("pools", {}), (
        "target_ratio is derived from deploy/k8s/pools; do not set it in tandem.toml"
    )
    file = tmp / f"{re.sub(r'[^A-Za-z0-9]+', '_', str(overlay.relative_to(K8S)))}.toml"
    file.write_text(toml_text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TANDEM_")}
    for e in c.get("env", []):
        if e["name"].startswith("TANDEM__"):
            assert "value" in e, f"{e['name']} must be a literal value to be checked"
            env[e["name"]] = e["value"]
    out = subprocess.run(
        [tandem_bin(), "config", "check", str(file)],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert out.returncode == 0, f"tandem config check failed for {overlay}:\n{out.stderr}{out.stdout}"
    return tomllib.loads(out.stdout)


@pytest.fixture
def cfg(objs: Objects, tmp_path_factory) -> dict:
    return effective_config(objs.overlay, tmp_path_factory.getbasetemp())


# ---------------------------------------------------------------------------------------------
# Schemas


DURATION = re.compile(r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$")
SERVICE_MONITOR_SPEC_KEYS = {
    "attachMetadata", "bodySizeLimit", "endpoints", "fallbackScrapeProtocol", "jobLabel",
    "keepDroppedTargets", "labelLimit", "labelNameLengthLimit", "labelValueLengthLimit",
    "namespaceSelector", "podTargetLabels", "sampleLimit", "scrapeClass", "scrapeProtocols",
    "selector", "selectorMechanism", "serviceDiscoveryRole", "targetLabels", "targetLimit",
}
SERVICE_MONITOR_ENDPOINT_KEYS = {
    "authorization", "basicAuth", "bearerTokenFile", "bearerTokenSecret", "enableHttp2",
    "filterRunning", "followRedirects", "honorLabels", "honorTimestamps", "interval",
    "metricRelabelings", "noProxy", "oauth2", "params", "path", "port", "proxyConnectHeader",
    "proxyFromEnvironment", "proxyUrl", "relabelings", "scheme", "scrapeTimeout", "targetPort",
    "tlsConfig", "trackTimestampsStaleness",
}


def check_label_selector(sel: Any, where: str) -> list[str]:
    errs = []
    if not isinstance(sel, dict) or not set(sel) <= {"matchLabels", "matchExpressions"}:
        return [f"{where}: not a LabelSelector: {sel!r}"]
    for k, v in sel.get("matchLabels", {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            errs.append(f"{where}.matchLabels: {k!r}: {v!r} must be strings")
    for e in sel.get("matchExpressions", []):
        if e.get("operator") not in ("In", "NotIn", "Exists", "DoesNotExist") or not isinstance(e.get("key"), str):
            errs.append(f"{where}.matchExpressions: bad expression {e!r}")
    return errs


def check_service_monitor(sm: dict, objs: Objects) -> list[str]:
    """Structural check of a monitoring.coreos.com/v1 ServiceMonitor (a CRD: no bundled schema)."""
    name = sm["metadata"].get("name", "?")
    where = f"ServiceMonitor/{name}"
    spec = sm.get("spec")
    if not isinstance(spec, dict):
        return [f"{where}: no spec"]
    errs = [f"{where}.spec: unknown field {k}" for k in set(spec) - SERVICE_MONITOR_SPEC_KEYS]
    errs += check_label_selector(spec.get("selector"), f"{where}.spec.selector")
    endpoints = spec.get("endpoints")
    if not isinstance(endpoints, list) or not endpoints:
        return errs + [f"{where}.spec.endpoints must be a non-empty list"]
    services = [
        s
        for s in objs.of("Service")
        if s["metadata"].get("namespace") == sm["metadata"].get("namespace")
        and selects(spec.get("selector", {}), s["metadata"].get("labels", {}))
    ]
    if not services:
        errs.append(f"{where}: its selector matches no Service")
    for i, ep in enumerate(endpoints):
        at = f"{where}.spec.endpoints[{i}]"
        errs += [f"{at}: unknown field {k}" for k in set(ep) - SERVICE_MONITOR_ENDPOINT_KEYS]
        for key in ("interval", "scrapeTimeout"):
            if key in ep and not DURATION.match(str(ep[key])):
                errs.append(f"{at}.{key}: not a Prometheus duration: {ep[key]!r}")
        if not str(ep.get("path", "/metrics")).startswith("/"):
            errs.append(f"{at}.path must start with /")
        port = ep.get("port")
        if not isinstance(port, str):
            errs.append(f"{at}.port must name a Service port")
        for s in services:
            if port not in {p.get("name") for p in s["spec"]["ports"]}:
                errs.append(f"{at}.port {port!r} is not a port of Service/{s['metadata']['name']}")
    return errs


def test_overlays_found():
    names = set(IDS)
    assert {"base", "overlays/sim", "overlays/hpa", "overlays/vllm-rs-grpc"} <= names, names


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
def test_objects_match_the_kubernetes_schemas(objs: Objects, k8s_version: str):
    errs = []
    seen = set()
    for o in objs.all:
        ident = (o["apiVersion"], o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"])
        assert ident not in seen, f"duplicate object {ident}"
        seen.add(ident)
        if o["apiVersion"] == "monitoring.coreos.com/v1" and o["kind"] == "ServiceMonitor":
            errs += check_service_monitor(o, objs)
            continue
        try:
            kubernetes_validate.validate(o, k8s_version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = "/".join(str(p) for p in e.absolute_path)
            errs.append(f"{o['kind']}/{o['metadata']['name']}: {path}: {e.message}")
        except kubernetes_validate.utils.SchemaNotFoundError as e:
            errs.append(e.message)
    assert not errs, "\n".join(errs)


def test_everything_lives_in_one_namespace(objs: Objects):
    ns = objs.namespace()
    for o in objs.all:
        if o["kind"] == "Namespace":
            assert o["metadata"]["name"] == ns
        else:
            assert o["metadata"].get("namespace") == ns, f"{o['kind']}/{o['metadata']['name']} not in {ns}"


# ---------------------------------------------------------------------------------------------
# Tandem


def test_tandem_config_passes_config_check(cfg: dict):
    assert cfg["server"]["listen"].startswith("0.0.0.0:"), "listen on all interfaces in a pod"


def test_tandem_deployment(objs: Objects, cfg: dict):
    dep = objs.tandem()
    pod = dep["spec"]["template"]
    c = container(pod, TANDEM_CONTAINER)
    labels = pod["metadata"]["labels"]

    # Replicas: two at least, or an HPA with a floor of two owns the count.
    hpa = objs.maybe("HorizontalPodAutoscaler", TANDEM_DEPLOYMENT)
    if hpa is None:
        assert dep["spec"].get("replicas", 1) >= 2
    else:
        assert "replicas" not in dep["spec"], "with the HPA, the Deployment must not pin replicas"
        assert hpa["spec"]["minReplicas"] >= 2

    # Probes on Tandem's real endpoints and the port server.listen binds.
    listen_port = int(cfg["server"]["listen"].rsplit(":", 1)[1])
    ports = {p["containerPort"] for p in c["ports"]}
    assert listen_port in ports
    ready, live = c["readinessProbe"]["httpGet"], c["livenessProbe"]["httpGet"]
    assert ready["path"] == "/ready"
    assert live["path"] == "/health"
    assert resolve_port(c, ready["port"]) == listen_port
    assert resolve_port(c, live["port"]) == listen_port

    # The Service reaches that port.
    svc = objs.get("Service", TANDEM_DEPLOYMENT)
    assert selects(svc["spec"]["selector"], labels)
    assert any(resolve_port(c, p.get("targetPort", p["port"])) == listen_port for p in svc["spec"]["ports"])

    # Shutdown: the grace period covers the preStop sleep and Tandem's own drain.
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    pre = prestop_sleep_s(c)
    drain = cfg["server"]["shutdown_grace_secs"]
    assert grace > pre + drain, (
        f"terminationGracePeriodSeconds {grace} must exceed preStop {pre} + shutdown_grace_secs {drain}"
    )

    # Hardening.
    psc, csc = pod["spec"].get("securityContext", {}), c["securityContext"]
    assert csc["readOnlyRootFilesystem"] is True
    assert csc["allowPrivilegeEscalation"] is False
    assert csc["capabilities"]["drop"] == ["ALL"]
    assert (csc.get("runAsNonRoot") or psc.get("runAsNonRoot")) is True
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]

    # Disruptions and spreading.
    pdbs = [p for p in objs.of("PodDisruptionBudget") if selects(p["spec"]["selector"], labels)]
    assert len(pdbs) == 1, "one PodDisruptionBudget covers the Tandem pods"
    spread = pod["spec"].get("topologySpreadConstraints", [])
    assert spread and all(selects(t["labelSelector"], labels) for t in spread)
    assert {t["topologyKey"] for t in spread} >= {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}

    # Scraped by prometheus-operator.
    sms = [
        s
        for s in objs.of("ServiceMonitor")
        if selects(s["spec"]["selector"], svc["metadata"]["labels"])
    ]
    assert sms and all(ep.get("path", "/metrics") == "/metrics" for s in sms for ep in s["spec"]["endpoints"])


def test_containers_run_as_non_root(objs: Objects):
    for owner, pod in objs.pod_templates():
        psc = pod["spec"].get("securityContext", {})
        for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]:
            sc = c.get("securityContext", {})
            where = f"{owner} container {c['name']}"
            assert sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, f"{where}: runAsNonRoot"
            uid = sc.get("runAsUser", psc.get("runAsUser"))
            assert isinstance(uid, int) and uid > 0, f"{where}: numeric non-root runAsUser"
            assert sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation"
            assert sc.get("privileged", False) is False, f"{where}: privileged"
            assert "ALL" in sc.get("capabilities", {}).get("drop", []), f"{where}: drop ALL capabilities"


# ---------------------------------------------------------------------------------------------
# Engine pools


def pool_deployment(objs: Objects, cfg: dict, pool: str) -> tuple[dict, dict]:
    """The headless Service a pool's DNS name names, and the one Deployment behind it."""
    dns = cfg["pools"][pool].get("dns")
    assert dns, f"pools.{pool} discovers its engines through dns"
    parts = dns["name"].rstrip(".").split(".")
    svc_name = parts[0]
    ns = parts[1] if len(parts) > 1 else objs.namespace()
    if len(parts) > 2:
        assert parts[2:4] == ["svc", "cluster"] or parts[2:] == ["svc"], dns["name"]
    assert ns == objs.namespace(), f"pools.{pool}.dns.name {dns['name']} is not in namespace {objs.namespace()}"
    svc = objs.get("Service", svc_name)
    assert svc["spec"].get("clusterIP") == "None", f"Service/{svc_name} must be headless"
    assert svc["spec"].get("publishNotReadyAddresses", False) is False, (
        f"Service/{svc_name} must not publish unready engines"
    )
    deps = [
        d
        for d in objs.of("Deployment")
        if selects(svc["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])
    ]
    assert len(deps) == 1, f"Service/{svc_name} selects {len(deps)} Deployments"
    return svc, deps[0]


def kv_events(c: dict) -> tuple[int | None, int | None, str | None]:
    """(port, replay port, topic) an engine publishes KV events on, vLLM or `tandem sim`."""
    args = c.get("args", [])
    if args[:1] == ["sim"]:
        ep = flag(args, "--kv-events-endpoint")
        replay = flag(args, "--kv-events-replay-endpoint")
        return (
            zmq_port(ep) if ep else None,
            zmq_port(replay) if replay else None,
            flag(args, "--kv-events-topic") or "",
        )
    raw = flag(args, "--kv-events-config")
    if raw is None:
        return None, None, None
    conf = json.loads(raw)
    assert conf.get("enable_kv_cache_events") is True and conf.get("publisher", "zmq") == "zmq", conf
    return (
        zmq_port(conf.get("endpoint", "tcp://*:5557")),
        zmq_port(conf["replay_endpoint"]) if conf.get("replay_endpoint") else None,
        conf.get("topic", ""),
    )


def check_grpc_engine(objs: Objects, svc: dict, c: dict, dns: dict, pool: str, is_sim: bool):
    """A gRPC pool: Tandem dials the engine's --grpc-port (dns.port) and reads its Prometheus
    /metrics on its HTTP --port (dns.metrics_port); `vllm-rs serve` or `tandem sim` serve both."""
    args = c.get("args", [])
    ports = {p["containerPort"] for p in c["ports"]}

    def published(port: int) -> bool:
        return any(resolve_port(c, p.get("targetPort", p["port"])) == port for p in svc["spec"]["ports"])

    grpc_port, metrics_port = dns["port"], dns.get("metrics_port")
    assert metrics_port, f"pools.{pool}.dns.metrics_port: the engines' HTTP port, for their /metrics"
    assert metrics_port != grpc_port, f"pools.{pool}: the gRPC and HTTP ports must differ"
    for port, what in ((grpc_port, "dns.port (gRPC)"), (metrics_port, "dns.metrics_port (HTTP)")):
        assert port in ports, f"{pool}: {what} {port} is not a containerPort"
        assert published(port), f"{pool}: {what} {port} is not a port of Service/{svc['metadata']['name']}"

    # Ready (= in DNS = routed to by Tandem): grpc.health.v1 on the gRPC port, the check Tandem
    # itself makes, or /health on the HTTP port.
    ready = c["readinessProbe"]
    if "grpc" in ready:
        assert ready["grpc"]["port"] == grpc_port, f"{pool}: gRPC readiness probe not on dns.port"
        assert ready["grpc"].get("service", "") == "", "Tandem checks the server's overall health (service \"\")"
    else:
        probe = ready["httpGet"]
        assert probe["path"] == "/health" and resolve_port(c, probe["port"]) == metrics_port

    # Prometheus scrapes the engines where Tandem reads their metrics: the HTTP port.
    sms = [s for s in objs.of("ServiceMonitor") if selects(s["spec"]["selector"], svc["metadata"]["labels"])]
    assert sms, f"no ServiceMonitor scrapes Service/{svc['metadata']['name']}"
    by_name = {p.get("name"): p for p in svc["spec"]["ports"]}
    for s in sms:
        for ep in s["spec"]["endpoints"]:
            sp = by_name[ep["port"]]
            assert resolve_port(c, sp.get("targetPort", sp["port"])) == metrics_port, (
                f"ServiceMonitor/{s['metadata']['name']} scrapes port {ep['port']!r}, not the HTTP port {metrics_port}"
            )

    if is_sim:
        assert int(flag(args, "--grpc-port")) == grpc_port
        assert int(flag(args, "--port")) == metrics_port
        return
    cmd = c.get("command", [])
    assert len(cmd) == 2 and Path(cmd[0]).name == "vllm-rs" and cmd[1] == "serve", (
        f"{pool}: a gRPC pool runs `vllm-rs serve` (--grpc-port exists only there), got {cmd}"
    )
    assert args and not args[0].startswith("-"), "vllm-rs serve takes the model first"
    # vllm-rs's own flags must come before `--`: what follows goes to the Python engine only.
    front = args[: args.index("--")] if "--" in args else args
    for name, want in (("--grpc-port", grpc_port), ("--port", metrics_port)):
        value = flag(front, name)
        assert value is not None, f"{pool}: vllm-rs serve needs {name}, before any `--`"
        assert int(value) == want, f"{pool}: {name} {value} != {want} in tandem.toml"
    # vllm-rs binds 127.0.0.1 unless told otherwise, the gRPC server included.
    assert flag(front, "--host") in ("0.0.0.0", "::"), f"{pool}: vllm-rs must listen on all interfaces"
    conn = json.loads(flag(args, "--kv-transfer-config"))
    assert conn["kv_connector"] == "NixlConnector", conn


@pytest.mark.parametrize("pool", ["prefill", "decode"])
def test_engine_pool(objs: Objects, cfg: dict, pool: str):
    svc, dep = pool_deployment(objs, cfg, pool)
    pod = dep["spec"]["template"]
    c = container(pod)
    args = c.get("args", [])
    env = env_map(c)
    dns = cfg["pools"][pool]["dns"]
    is_sim = args[:1] == ["sim"]

    if cfg["pools"][pool].get("protocol", "http") == "grpc":
        check_grpc_engine(objs, svc, c, dns, pool, is_sim)
    else:
        # The port Tandem dials is the engine's HTTP port, published by the Service, probed on /health.
        assert dns["port"] in {p["containerPort"] for p in c["ports"]}
        assert any(resolve_port(c, p.get("targetPort", p["port"])) == dns["port"] for p in svc["spec"]["ports"])
        ready = c["readinessProbe"]["httpGet"]
        assert ready["path"] == "/health" and resolve_port(c, ready["port"]) == dns["port"]
        if is_sim:
            assert int(flag(args, "--port")) == dns["port"]
        else:
            assert c["command"] == ["vllm", "serve"] and args and not args[0].startswith("-")
            assert int(flag(args, "--port")) == dns["port"]
            conn = json.loads(flag(args, "--kv-transfer-config"))
            assert conn["kv_connector"] == "NixlConnector", conn

    # Same KV block size as Tandem.
    assert int(flag(args, "--block-size")) == cfg["model"]["block_size"]

    # NIXL side channel on the pod's own IP.
    host = env.get("VLLM_NIXL_SIDE_CHANNEL_HOST", {})
    assert host.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "status.podIP", (
        f"{pool}: VLLM_NIXL_SIDE_CHANNEL_HOST must come from status.podIP"
    )
    assert int(env["VLLM_NIXL_SIDE_CHANNEL_PORT"]["value"]) in {p["containerPort"] for p in c["ports"]}

    # An engine leaving DNS gets no new requests before it starts shutting down.
    assert prestop_sleep_s(c) > dns["interval_secs"]
    assert pod["spec"]["terminationGracePeriodSeconds"] > prestop_sleep_s(c)

    # GPUs: vLLM asks for them, `tandem sim` (the Tandem image) does not.
    res = c.get("resources", {})
    gpus_req = res.get("requests", {}).get("nvidia.com/gpu")
    gpus_lim = res.get("limits", {}).get("nvidia.com/gpu")
    if is_sim:
        assert gpus_req is None and gpus_lim is None
        assert c["image"] == container(objs.tandem()["spec"]["template"], TANDEM_CONTAINER)["image"]
    else:
        assert gpus_req and gpus_req == gpus_lim and int(gpus_req) >= 1

    if pool == "prefill":
        # KV events where Tandem's precise feed subscribes.
        feed = cfg["pools"]["prefill"]["prefix_index"]["feed"]
        port, replay, topic = kv_events(c)
        if feed == "precise":
            ev = cfg["pools"]["prefill"].get("kv_events")
            assert ev, "precise feed without [pools.prefill.kv_events]"
            assert port == ev["port"], f"KV events port {port} != Tandem's {ev['port']}"
            assert topic == ev["topic"], f"KV events topic {topic!r} != Tandem's {ev['topic']!r}"
            if ev.get("replay_port", 0):
                assert replay == ev["replay_port"], f"replay port {replay} != Tandem's {ev['replay_port']}"
            assert port in {p["containerPort"] for p in c["ports"]}
        # Tandem gives up on a finished prefill's KV before the engine frees it.
        abort_s = int(env.get("VLLM_NIXL_ABORT_REQUEST_TIMEOUT", {}).get("value", VLLM_NIXL_ABORT_DEFAULT_S))
        assert cfg["timeouts"]["prefill_lease_ms"] < abort_s * 1000


def test_grpc_overlay_speaks_grpc_to_both_pools(tmp_path_factory):
    cfg = effective_config(K8S / "overlays" / "vllm-rs-grpc", tmp_path_factory.getbasetemp())
    assert [cfg["pools"][p]["protocol"] for p in ("prefill", "decode")] == ["grpc", "grpc"]


def test_pool_sizes_match_the_target_ratio(objs: Objects, cfg: dict):
    _, prefill = pool_deployment(objs, cfg, "prefill")
    _, decode = pool_deployment(objs, cfg, "decode")
    p, d = prefill["spec"]["replicas"], decode["spec"]["replicas"]
    target = cfg["pools"].get("target_ratio")
    assert target, "pools.target_ratio must be set (from deploy/k8s/pools)"
    assert Fraction(p, d) == parse_ratio(target), f"replicas {p}:{d} vs target_ratio {target}"

    # ... and both come from the one place.
    counts = {r["name"]: r["count"] for r in yaml.safe_load(POOLS.read_text())["replicas"]}
    assert (p, d) == (counts[prefill["metadata"]["name"]], counts[decode["metadata"]["name"]])
    assert target == f"{p}:{d}"


# ---------------------------------------------------------------------------------------------
# Optional HPA


def registered_metrics() -> set[str]:
    return set(re.findall(r'"(tandem_[a-z_]+)"', METRICS_RS.read_text()))


def test_hpa_uses_a_served_tandem_metric():
    hpas = [h for d in OVERLAYS for h in Objects(d).of("HorizontalPodAutoscaler")]
    assert hpas, "the hpa overlay renders an HPA"
    for hpa in hpas:
        check_hpa(hpa)


def check_hpa(hpa: dict):
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == ("apps/v1", "Deployment", TANDEM_DEPLOYMENT)
    assert hpa["spec"]["maxReplicas"] >= hpa["spec"]["minReplicas"]
    rules = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    served = {r["name"]["as"]: r for r in rules}
    for m in hpa["spec"]["metrics"]:
        assert m["type"] == "Pods"
        name = m["pods"]["metric"]["name"]
        assert name in served, f"HPA metric {name} is not served by {ADAPTER_VALUES.name}"
        series = re.match(r"(\w+)", served[name]["seriesQuery"]).group(1)
        assert series in registered_metrics(), f"{series} is not a metric Tandem exports"


# ---------------------------------------------------------------------------------------------
# The image


def test_dockerfile_matches_the_toolchain_and_the_pods():
    text = (REPO / "Dockerfile").read_text()
    channel = tomllib.loads((REPO / "rust-toolchain.toml").read_text())["toolchain"]["channel"]
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert froms[0].startswith(f"rust:{channel}"), f"builder {froms[0]} vs toolchain {channel}"
    user = re.findall(r"^USER\s+(\S+)", text, re.M)[-1]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) > 0, "the image runs as a numeric non-root user"
    assert re.search(r"^EXPOSE\s+8000\b", text, re.M)
    assert re.search(r'^ENTRYPOINT\s+\["(/usr/local/bin/)?tandem"\]', text, re.M)
    base = Objects(K8S / "base")
    psc = base.tandem()["spec"]["template"]["spec"]["securityContext"]
    assert psc["runAsUser"] == int(uid), "the pod's runAsUser is the image's USER"
    ignore = (REPO / ".dockerignore").read_text().split()
    assert "target/" in ignore and ".git/" in ignore
