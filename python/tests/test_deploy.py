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
`config check` also reads and validates `[auth] keys_file`: the test takes that file from the
rendered Secret mounted over its path (the same volume lookup as the ConfigMap's), writes it to a
temporary copy and points keys_file there (TANDEM__AUTH__KEYS_FILE) for the check only; the config
the tests see keeps the pod's path.
A pool's `protocol` decides what its engines must serve: "http" pools are dialled on the engine's
HTTP port, "grpc" pools on its --grpc-port, with its HTTP port as dns.metrics_port.
Tandem serves the OpenAI API on `server.listen` and, with `server.admin_listen`, /metrics and
/admin/* on the admin port only (both ports answer /health and /ready).
"""

from __future__ import annotations

import base64
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
from urllib.parse import urlsplit

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
KEYS_FILE_ENV = "TANDEM__AUTH__KEYS_FILE"
# The Secret Tandem's key file comes from, by the name deploy/README.md tells users to create.
KEYS_SECRET = "tandem-api-keys"
# The base's key file is a placeholder: this hash (64 zeros) is the only one it may hold.
PLACEHOLDER_SHA256 = "0" * 64
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


def addr_port(addr: str) -> int:
    """The port of a `host:port` socket address as Tandem's config renders it."""
    return int(addr.rsplit(":", 1)[1])


def service_port_targets(c: dict, svc: dict) -> set[int]:
    """The container ports a Service's ports lead to, on the pods running container `c`."""
    return {resolve_port(c, p.get("targetPort", p["port"])) for p in svc["spec"]["ports"]}


def mounted_volume(pod: dict, c: dict, path: str) -> tuple[dict, dict, str]:
    """The volume mount of container `c` that `path` is on (the deepest one holding it, as in the
    container; or a file mounted at `path` itself with subPath): (mount, volume, the path inside
    the volume)."""
    def depth(m: dict) -> int:
        mp = m["mountPath"].rstrip("/")
        if mp == path and m.get("subPath"):
            return len(mp) + 1
        return len(mp) if path.startswith(mp + "/") else -1

    mount = max(c.get("volumeMounts", []), key=depth, default=None)
    assert mount is not None and depth(mount) >= 0, f"no volume mounted over {path}"
    volume = [v for v in pod["spec"]["volumes"] if v["name"] == mount["name"]][0]
    rel = path[len(mount["mountPath"].rstrip("/")) + 1 :]
    if mount.get("subPath"):
        rel = f"{mount['subPath']}/{rel}" if rel else mount["subPath"]
    return mount, volume, rel


def volume_item(source: dict, rel: str) -> str:
    """The ConfigMap/Secret key a file of a configMap/secret volume shows (`items` may rename)."""
    items = source.get("items")
    if items is None:
        assert "/" not in rel, f"{rel}: a ConfigMap/Secret volume without items has no subdirectories"
        return rel
    hits = [i["key"] for i in items if i["path"] == rel]
    assert hits, f"no item of the volume is at {rel}"
    return hits[0]


def secret_text(secret: dict, key: str) -> str:
    if key in secret.get("stringData", {}):
        return secret["stringData"][key]
    assert key in secret.get("data", {}), f"Secret {secret['metadata']['name']} has no key {key}"
    return base64.b64decode(secret["data"][key]).decode()


def tandem_keys_file(o: Objects, toml_text: str) -> str | None:
    """[auth] keys_file as the pod sees it: the container's TANDEM__AUTH__KEYS_FILE, else the file's."""
    c = container(o.tandem()["spec"]["template"], TANDEM_CONTAINER)
    env = env_map(c)
    if KEYS_FILE_ENV in env and env[KEYS_FILE_ENV].get("value"):
        return env[KEYS_FILE_ENV]["value"]
    return tomllib.loads(toml_text).get("auth", {}).get("keys_file")


@functools.lru_cache(maxsize=None)
def key_file(overlay: Path) -> tuple[dict, dict, dict, str]:
    """Tandem's API key file as the pod sees it: (mount, volume, Secret, the file's text). The
    file must come from a Secret volume (the rendered Secret: kustomize generates it)."""
    o = Objects(overlay)
    pod = o.tandem()["spec"]["template"]
    c = container(pod, TANDEM_CONTAINER)
    toml_text = tandem_toml(o)
    path = tandem_keys_file(o, toml_text)
    assert path, f"{overlay}: [auth] keys_file is not set: API keys are off"
    assert path.startswith("/"), f"auth.keys_file {path} must be absolute"
    mount, volume, rel = mounted_volume(pod, c, path)
    assert "secret" in volume, f"{path} is not on a Secret volume (volume {volume['name']})"
    secret = o.get("Secret", volume["secret"]["secretName"])
    return mount, volume, secret, secret_text(secret, volume_item(volume["secret"], rel))


def tandem_toml(o: Objects) -> str:
    """The tandem.toml `tandem serve --config` reads, from the ConfigMap mounted over it."""
    pod = o.tandem()["spec"]["template"]
    c = container(pod, TANDEM_CONTAINER)
    args = c.get("args", [])
    assert args[:1] == ["serve"], f"Tandem runs `tandem serve`, got {args}"
    path = flag(args, "--config")
    assert path, "tandem serve needs --config"
    mount, volume, rel = mounted_volume(pod, c, path)
    assert not mount.get("subPath"), f"mount the ConfigMap's directory over {path}, not a subPath"
    cm = o.get("ConfigMap", volume["configMap"]["name"])
    key = volume_item(volume["configMap"], rel)
    assert key in cm["data"], f"ConfigMap {cm['metadata']['name']} has no key {key}"
    return cm["data"][key]


# ---------------------------------------------------------------------------------------------
# Tandem's effective configuration, as the pod sees it


@functools.lru_cache(maxsize=None)
def effective_config(overlay: Path, tmp: Path) -> dict:
    o = Objects(overlay)
    pod = o.tandem()["spec"]["template"]
    c = container(pod, TANDEM_CONTAINER)
    toml_text = tandem_toml(o)
    assert "target_ratio" not in tomllib.loads(toml_text).get("pools", {}), (
        "target_ratio is derived from deploy/k8s/pools; do not set it in tandem.toml"
    )
    stem = re.sub(r"[^A-Za-z0-9]+", "_", str(overlay.relative_to(K8S)))
    file = tmp / f"{stem}.toml"
    file.write_text(toml_text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TANDEM_")}
    for e in c.get("env", []):
        if e["name"].startswith("TANDEM__"):
            assert "value" in e, f"{e['name']} must be a literal value to be checked"
            env[e["name"]] = e["value"]
    # `config check` reads the key file: give it the rendered Secret's file, at a copy.
    keys_path = tandem_keys_file(o, toml_text)
    keys_copy = None
    if keys_path:
        keys_copy = tmp / f"{stem}.keys" / Path(keys_path).name
        keys_copy.parent.mkdir(exist_ok=True)
        keys_copy.write_text(key_file(overlay)[3])
        env[KEYS_FILE_ENV] = str(keys_copy)
    out = subprocess.run(
        [tandem_bin(), "config", "check", str(file)],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert out.returncode == 0, f"tandem config check failed for {overlay}:\n{out.stderr}{out.stdout}"
    cfg = tomllib.loads(out.stdout)
    if keys_copy is not None:
        assert re.search(rf"^# auth: \d+ tenant\(s\) and \d+ key\(s\) in {re.escape(str(keys_copy))}$", out.stdout, re.M), (
            f"tandem config check did not read the key file:\n{out.stdout}"
        )
        assert cfg["auth"]["keys_file"] == str(keys_copy)
        cfg["auth"]["keys_file"] = keys_path  # the pod's path, for the checks below
    return cfg


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
    assert {"base", "overlays/sim", "overlays/hpa", "overlays/vllm-rs-grpc", "overlays/redis-limits"} <= names, names


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

    # Probes on Tandem's real endpoints. Both listeners answer /health and /ready: readiness on
    # the port server.listen binds (the one client traffic takes), liveness on the admin port when
    # there is one (so a public listener full of clients cannot get the pod restarted).
    listen_port = addr_port(cfg["server"]["listen"])
    admin = cfg["server"].get("admin_listen")
    admin_port = addr_port(admin) if admin else None
    ports = {p["containerPort"] for p in c["ports"]}
    assert listen_port in ports
    ready, live = c["readinessProbe"]["httpGet"], c["livenessProbe"]["httpGet"]
    assert ready["path"] == "/ready"
    assert live["path"] == "/health"
    assert resolve_port(c, ready["port"]) == listen_port
    assert resolve_port(c, live["port"]) == (admin_port or listen_port)

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

    # Scraped by prometheus-operator, on the port that serves /metrics: the admin port when
    # server.admin_listen is set (the public one answers 404 there), else server.listen.
    metrics_port = admin_port or listen_port
    tandem_svcs = [x for x in objs.of("Service") if selects(x["spec"].get("selector", {}), labels)]
    sms = [
        (s, x)
        for s in objs.of("ServiceMonitor")
        for x in tandem_svcs
        if selects(s["spec"]["selector"], x["metadata"].get("labels", {}))
    ]
    assert sms and all(ep.get("path", "/metrics") == "/metrics" for s, _ in sms for ep in s["spec"]["endpoints"])
    for s, x in sms:
        by_name = {p.get("name"): p for p in x["spec"]["ports"]}
        for ep in s["spec"]["endpoints"]:
            sp = by_name[ep["port"]]
            assert resolve_port(c, sp.get("targetPort", sp["port"])) == metrics_port, (
                f"ServiceMonitor/{s['metadata']['name']} scrapes Service/{x['metadata']['name']} port "
                f"{ep['port']!r}, not the port serving /metrics ({metrics_port})"
            )


# ---------------------------------------------------------------------------------------------
# Access: API keys from a Secret, /metrics and /admin on the admin listener only


def test_tandem_reads_its_api_keys_from_a_mounted_secret(objs: Objects, cfg: dict):
    # Auth is on: keys_file is set (`tandem config check` read and validated the rendered file:
    # effective_config asserts its "# auth:" line).
    path = cfg["auth"].get("keys_file")
    assert path, "[auth] keys_file must be set: API keys on"
    mount, volume, secret, text = key_file(objs.overlay)

    # The whole Secret directory, read-only: a subPath mount never sees the Secret's updates,
    # so Tandem's reload would never see a rotated key.
    assert "subPath" not in mount and "subPathExpr" not in mount, (
        f"mount {mount['name']} uses a subPath: Secret updates would not reach {path}"
    )
    assert mount.get("readOnly") is True, f"mount {mount['name']} must be readOnly"
    src = volume["secret"]
    assert src.get("optional", False) is False, "the key Secret must not be optional: Tandem needs the file"
    assert secret["type"] == "Opaque"
    # Its plain name, no hash suffix: an updated key file updates this Secret in place (and so the
    # file Tandem reloads) instead of creating a new Secret and rolling the pods; and it is the
    # Secret `kubectl create secret generic tandem-api-keys` (deploy/README.md) makes.
    assert src["secretName"] == secret["metadata"]["name"] == KEYS_SECRET, (
        f"the key Secret is {src['secretName']}, not {KEYS_SECRET} (disableNameSuffixHash)"
    )

    # Readable by Tandem's user: "others" may read, or the group may and the files get fsGroup.
    psc = objs.tandem()["spec"]["template"]["spec"].get("securityContext", {})
    item_modes = [i["mode"] for i in src.get("items", []) if "mode" in i]
    for mode in item_modes or [src.get("defaultMode", 0o644)]:
        assert mode & 0o004 or (mode & 0o040 and psc.get("fsGroup")), (
            f"key file mode {mode:o} is not readable by UID {psc.get('runAsUser')} (set fsGroup)"
        )
        assert not mode & 0o222, f"key file mode {mode:o}: nobody needs to write it"

    # Hashes, not keys, in the manifests.
    doc = tomllib.loads(text)
    assert doc.get("keys"), "the key file names no key"
    for i, k in enumerate(doc["keys"]):
        assert "key" not in k and re.fullmatch(r"[0-9a-fA-F]{64}", k.get("key_sha256", "")), (
            f"keys[{i}]: write key_sha256 (the key's SHA-256), never the key itself"
        )


def test_the_base_ships_only_a_placeholder_key():
    """The base's Secret accepts no key until it is replaced: only the 64-zero hash, which no
    known key has. Real hashes belong in an overlay (or a Secret made outside kustomize)."""
    _, _, _, text = key_file(K8S / "base")
    doc = tomllib.loads(text)
    assert [k.get("key_sha256") for k in doc["keys"]] == [PLACEHOLDER_SHA256] * len(doc["keys"])
    assert "PLACEHOLDER" in text and "REPLACE" in text, "the placeholder says loudly that it is one"


def test_metrics_and_admin_are_on_the_admin_port_only(objs: Objects, cfg: dict):
    pod = objs.tandem()["spec"]["template"]
    c = container(pod, TANDEM_CONTAINER)
    labels = pod["metadata"]["labels"]
    admin = cfg["server"].get("admin_listen")
    assert admin, "server.admin_listen must be set: /metrics and /admin/* off the public port"
    assert admin.startswith("0.0.0.0:"), "the admin listener must be reachable by Prometheus: all interfaces"
    admin_port, listen_port = addr_port(admin), addr_port(cfg["server"]["listen"])
    assert admin_port != listen_port
    assert resolve_port(c, "admin") == admin_port, "container port `admin` is server.admin_listen's port"

    # The public Service (what clients call) does not lead to the admin port...
    public = objs.get("Service", TANDEM_DEPLOYMENT)
    assert admin_port not in service_port_targets(c, public), (
        "Service/tandem exposes the admin port (no API key there): use a separate Service"
    )
    # ... another Service does, and Tandem's ServiceMonitors scrape that one, never the public one.
    admin_svcs = [
        x
        for x in objs.of("Service")
        if selects(x["spec"].get("selector", {}), labels) and admin_port in service_port_targets(c, x)
    ]
    assert admin_svcs, "no Service reaches the admin port"
    for x in admin_svcs:
        assert x["spec"].get("type", "ClusterIP") == "ClusterIP", f"Service/{x['metadata']['name']} must stay in-cluster"
        assert listen_port not in service_port_targets(c, x), "the admin Service carries the admin port only"
    scraping = [s for s in objs.of("ServiceMonitor") if any(selects(s["spec"]["selector"], x["metadata"]["labels"]) for x in admin_svcs)]
    assert scraping, "no ServiceMonitor scrapes the admin Service"
    for s in objs.of("ServiceMonitor"):
        assert not selects(s["spec"]["selector"], public["metadata"].get("labels", {})), (
            f"ServiceMonitor/{s['metadata']['name']} selects the public Service: /metrics is 404 there"
        )


def admitted_peers(np: dict, pod: dict, port: int) -> list[dict | None]:
    """The `from` peers NetworkPolicy `np` admits to container port `port` of `pod` (None: anyone)."""
    def port_matches(p: dict) -> bool:
        if p.get("port") is None:
            return True
        if isinstance(p["port"], int):
            return p["port"] <= port <= p.get("endPort", p["port"])
        return any(
            cp.get("name") == p["port"] and cp["containerPort"] == port
            for c in pod["spec"]["containers"]
            for cp in c.get("ports", [])
        )

    peers: list[dict | None] = []
    for rule in np["spec"].get("ingress", []):
        if not rule.get("ports") or any(port_matches(p) for p in rule["ports"]):
            peers += rule.get("from") or [None]
    return peers


def same_namespace_pods(peer: dict | None) -> dict | None:
    """A peer's podSelector when it admits only pods of the policy's own namespace."""
    return peer["podSelector"] if peer is not None and set(peer) == {"podSelector"} else None


def ingress_policies(objs: Objects, pod: dict) -> list[dict]:
    return [
        np
        for np in objs.of("NetworkPolicy")
        if "Ingress" in np["spec"].get("policyTypes", ["Ingress"])
        and selects(np["spec"]["podSelector"], pod["metadata"]["labels"])
    ]


def test_network_policies_admit_what_the_wiring_needs(objs: Objects, cfg: dict):
    """Where a NetworkPolicy isolates a pod, it still admits what the manifests rely on: clients
    and Prometheus to Tandem's two ports, Tandem to Redis."""
    pod = objs.tandem()["spec"]["template"]
    tandem_labels = pod["metadata"]["labels"]
    nps = ingress_policies(objs, pod)
    if nps:
        ports = {addr_port(cfg["server"]["listen"]), addr_port(cfg["server"].get("admin_listen", cfg["server"]["listen"]))}
        for port in ports:
            assert any(admitted_peers(np, pod, port) for np in nps), f"a NetworkPolicy shuts Tandem's port {port}"
    redis = objs.maybe("Deployment", "tandem-redis")
    if redis is not None:
        rpod = redis["spec"]["template"]
        port = resolve_port(container(rpod), "redis")
        nps = ingress_policies(objs, rpod)
        assert nps, "Redis has no password: a NetworkPolicy must admit the Tandem pods only"
        peers = [peer for np in nps for peer in admitted_peers(np, rpod, port)]
        assert any(
            peer is None or ((sel := same_namespace_pods(peer)) is not None and selects(sel, tandem_labels))
            for peer in peers
        ), "no NetworkPolicy admits the Tandem pods to Redis"
        stranger = {"app.kubernetes.io/name": "someone-else"}
        for peer in peers:
            sel = same_namespace_pods(peer)
            assert sel is not None and sel != {} and not selects(sel, stranger), (
                f"Redis admits more than the Tandem pods: {peer}"
            )


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
# Optional Redis for the tenants' shared budgets


def memory_bytes(q: str) -> int:
    """A Kubernetes memory quantity (Mi, Gi, M, ...) or a Redis size (mb, gb, ...) in bytes."""
    m = re.fullmatch(r"(\d+)\s*([A-Za-z]*)", q.strip())
    assert m, q
    n, unit = int(m.group(1)), m.group(2)
    factors = {
        "": 1, "k": 1000, "M": 1000**2, "G": 1000**3, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3,
        "kb": 1024, "mb": 1024**2, "gb": 1024**3,  # Redis: "mb" is 1024*1024 bytes
    }
    key = unit if unit in factors else unit.lower()
    assert key in factors, f"unknown unit in {q}"
    return n * factors[key]


def redis_flag(args: list[str], name: str) -> str | None:
    """The value of `redis-server ... --name value` (its options take the value as the next argument)."""
    for i, a in enumerate(args[:-1]):
        if a == name:
            return args[i + 1]
    return None


def check_redis_limits(objs: Objects, cfg: dict):
    """[limits] backend = "redis": the URL names a Redis Service in Tandem's namespace, on one of its
    ports, leading to a Redis container serving that port, hardened like the other pods."""
    c = container(objs.tandem()["spec"]["template"], TANDEM_CONTAINER)
    env = env_map(c)
    # Set by environment overrides on the Tandem container (the ConfigMap stays the base's).
    assert env.get("TANDEM__LIMITS__BACKEND", {}).get("value") == "redis"
    url = env["TANDEM__LIMITS__REDIS_URL"]["value"]
    assert cfg["limits"]["backend"] == "redis" and cfg["limits"]["redis_url"] == url, "the override is in force"
    u = urlsplit(url)
    assert u.scheme == "redis" and u.hostname, url
    port = u.port or 6379
    parts = u.hostname.rstrip(".").split(".")
    assert len(parts) >= 2 and parts[2:] in (["svc"], ["svc", "cluster", "local"]), (
        f"{url}: name a Service as <service>.<namespace>.svc[.cluster.local]"
    )
    assert parts[1] == objs.namespace(), f"{url} is not in namespace {objs.namespace()}"
    svc = objs.get("Service", parts[0])
    assert svc["spec"].get("type", "ClusterIP") == "ClusterIP", "Redis stays inside the cluster"
    sp = [p for p in svc["spec"]["ports"] if p["port"] == port]
    assert sp, f"{url}: port {port} is not a port of Service/{parts[0]}"
    deps = [d for d in objs.of("Deployment") if selects(svc["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])]
    assert len(deps) == 1, f"Service/{parts[0]} selects {len(deps)} Deployments"
    dep = deps[0]
    assert dep["spec"].get("replicas", 1) == 1, "one Redis: several unreplicated ones would split the budgets"
    pod = dep["spec"]["template"]
    r = container(pod)
    target = resolve_port(r, sp[0].get("targetPort", sp[0]["port"]))
    assert target in {p["containerPort"] for p in r["ports"]}
    args = r.get("command", []) + r.get("args", [])
    assert any(Path(a).name == "redis-server" for a in args), f"runs redis-server, got {args}"
    assert int(redis_flag(args, "--port") or 6379) == target, "redis-server listens where the Service leads"

    # Hardened like the other pods (non-root etc.: test_containers_run_as_non_root), plus:
    sc = r["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert pod["spec"].get("automountServiceAccountToken") is False
    assert pod["spec"].get("securityContext", {}).get("seccompProfile", {}).get("type") == "RuntimeDefault"
    res = r["resources"]
    assert res["requests"]["cpu"] and res["requests"]["memory"] and res["limits"]["memory"]
    assert r.get("readinessProbe") and r.get("livenessProbe")
    # Nothing persisted (the buckets refill within a minute anyway), and its working directory
    # on an emptyDir, so the read-only root filesystem is never written.
    assert redis_flag(args, "--save") == "" and redis_flag(args, "--appendonly") == "no", (
        "persistence off: no RDB snapshots, no AOF"
    )
    data_dir = redis_flag(args, "--dir")
    assert data_dir, "--dir: Redis's working directory, on a volume"
    mounts = [m for m in r.get("volumeMounts", []) if m["mountPath"].rstrip("/") == data_dir.rstrip("/")]
    assert len(mounts) == 1 and not mounts[0].get("readOnly"), f"--dir {data_dir} needs a writable volume"
    vol = [v for v in pod["spec"]["volumes"] if v["name"] == mounts[0]["name"]][0]
    assert "emptyDir" in vol, f"--dir {data_dir} is not on an emptyDir"
    # maxmemory below the container's limit, and evicting only keys with a TTL (all of Tandem's).
    maxmem = redis_flag(args, "--maxmemory")
    assert maxmem and memory_bytes(maxmem) < memory_bytes(res["limits"]["memory"]), (
        f"--maxmemory {maxmem} must stay below the memory limit {res['limits']['memory']}"
    )
    assert redis_flag(args, "--maxmemory-policy") in ("volatile-ttl", "volatile-lru", "volatile-lfu", "noeviction"), (
        "never evict a key without a TTL"
    )


def test_redis_limits_wherever_configured(objs: Objects, cfg: dict):
    if cfg["limits"]["backend"] == "redis":
        check_redis_limits(objs, cfg)
    else:
        assert objs.maybe("Deployment", "tandem-redis") is None, "a Redis nobody uses"


def test_redis_overlay_shares_the_limits_through_redis(tmp_path_factory):
    overlay = K8S / "overlays" / "redis-limits"
    cfg = effective_config(overlay, tmp_path_factory.getbasetemp())
    assert cfg["limits"]["backend"] == "redis"
    assert cfg["limits"]["redis_url"] == "redis://tandem-redis.tandem.svc.cluster.local:6379"
    check_redis_limits(Objects(overlay), cfg)
    # Everything else is the base's: only the two variables differ on the Tandem container.
    base_env = env_map(container(Objects(K8S / "base").tandem()["spec"]["template"], TANDEM_CONTAINER))
    env = env_map(container(Objects(overlay).tandem()["spec"]["template"], TANDEM_CONTAINER))
    assert set(env) - set(base_env) == {"TANDEM__LIMITS__BACKEND", "TANDEM__LIMITS__REDIS_URL"}


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
