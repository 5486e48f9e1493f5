"""deploy/: the images, compose, Kubernetes and the dashboard, checked offline.

The Kubernetes overlays render with `kubectl kustomize` and every object validates against the
Kubernetes schemas (kubernetes-validate ships them) or, for KEDA's and the Prometheus operator's
kinds, against their CRDs' schemas vendored in deploy/k8s/schemas, refusing unknown fields. The
metric names and labels that the ScaledObjects, the alerts and the dashboard read are checked
against a real broker's /metrics under load from real clients (and a real actuator's for the
per-robot panels), and the queue depth the ScaledObjects read is shown rising past their
threshold under load and falling to zero when idle.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import jsonschema
import kubernetes_validate
import numpy as np
import pytest
import yaml
from mdp_peers import CHUNKBUS, start_broker, start_worker, wait_for
from prometheus_client.parser import text_string_to_metric_families

from chunkbus.bus import Observation, ObservationRequest
from chunkbus.bus.client import BrokerClient

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())
KUBERNETES_VERSIONS = ("1.29", "1.32")  # the oldest minor the big clouds still run, and this machine's kubectl
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh_scaledobject_v1alpha1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_servicemonitor_v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "monitoring.coreos.com_prometheusrule_v1.json",
}
HEALTHCHECK = DEPLOY / "docker" / "healthcheck.py"


# --- rendering and schemas ---------------------------------------------------------------------------


def render(overlay: str) -> list[dict]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed: its built-in kustomize renders the overlays")
    result = subprocess.run(["kubectl", "kustomize", str(K8S / "overlays" / overlay)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def strict(schema):
    """The schema refusing fields it does not list, as kubernetes-validate's strict mode does: the
    API server would silently drop a misspelt field of a custom resource."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: (value if key == "enum" else strict(value)) for key, value in schema.items()}
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def validate(obj: dict, version: str) -> None:
    crd = CRD_SCHEMAS.get((obj["apiVersion"], obj["kind"]))
    if crd is None:
        kubernetes_validate.validate(obj, version, strict=True)
    else:
        schema = strict(json.loads((K8S / "schemas" / crd).read_text()))
        schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta is the API server's, not the CRD's
        jsonschema.Draft202012Validator(schema).validate(obj)


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(request.param)


def test_the_overlays_are_the_ones_the_docs_name():
    assert OVERLAYS == ["cpu-demo", "gpu"]
    docs = (REPO / "docs" / "deploy.md").read_text()
    assert all(f"overlays/{name}" in docs for name in OVERLAYS)


def test_every_rendered_object_validates_against_its_schema(rendered):
    overlay, objects = rendered
    kinds = {obj["kind"] for obj in objects}
    assert {"Deployment", "Service", "NetworkPolicy", "Namespace"} <= kinds
    if overlay == "gpu":
        assert {"ScaledObject", "ServiceMonitor", "PrometheusRule"} <= kinds
    for obj in objects:
        for version in KUBERNETES_VERSIONS:
            try:
                validate(obj, version)
            except jsonschema.ValidationError as exc:
                where = ".".join(map(str, exc.absolute_path))
                pytest.fail(f"{overlay}: {obj['kind']}/{obj['metadata']['name']} ({version}): {where}: {exc.message}")


def test_a_misspelt_field_is_refused():
    """The strict CRD check is not a formality: KEDA would drop `minReplicas` in silence."""
    scaled = next(o for o in render("gpu") if o["kind"] == "ScaledObject")
    wrong = copy.deepcopy(scaled)
    wrong["spec"]["minReplicas"] = wrong["spec"].pop("minReplicaCount")
    with pytest.raises(jsonschema.ValidationError, match="minReplicas"):
        validate(wrong, "1.32")
    wrong = copy.deepcopy(scaled)
    wrong["spec"]["triggers"][0]["metadata"]["threshold"] = 8  # KEDA takes strings only
    with pytest.raises(jsonschema.ValidationError):
        validate(wrong, "1.32")


# --- the objects fit together --------------------------------------------------------------------------


def by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def container(deployment: dict) -> dict:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def env(deployment: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container(deployment).get("env", [])}


def option(deployment: dict, name: str) -> str | None:
    """A worker's --name=value, with $(VAR) expanded from its environment as Kubernetes does."""
    values = env(deployment)
    for arg in container(deployment)["args"]:
        if arg.startswith(f"--{name}="):
            return re.sub(r"\$\((\w+)\)", lambda m: values[m[1]], arg.split("=", 1)[1])
    return None


def secrets_mounted(objects: list[dict]) -> set[str]:
    return {volume["secret"]["secretName"] for d in by_kind(objects, "Deployment").values()
            for volume in d["spec"]["template"]["spec"]["volumes"] if "secret" in volume}


def test_the_broker_runs_once_with_curve_and_a_service_per_port(rendered):
    overlay, objects = rendered
    deployments, services = by_kind(objects, "Deployment"), by_kind(objects, "Service")
    broker = deployments["chunkbus-broker"]
    assert broker["spec"]["replicas"] == 1 and broker["spec"]["strategy"]["type"] == "Recreate"
    args = container(broker)["args"]
    assert {"--curve-secret=/keys/own/broker.key_secret", "--allow-robots=/keys/robots",
            "--allow-workers=/keys/workers", "--metrics-host=0.0.0.0"} <= set(args)
    labels = broker["spec"]["template"]["metadata"]["labels"]
    ports = {p["name"]: p["containerPort"] for p in container(broker)["ports"]}
    for name, port in [("chunkbus-frontend", 5555), ("chunkbus-backend", 5556), ("chunkbus-metrics", 9100)]:
        service = services[name]
        assert service["spec"]["selector"].items() <= labels.items(), name
        (service_port,) = service["spec"]["ports"]
        assert service_port["port"] == port and ports[service_port["targetPort"]] == port
    assert container(broker)["livenessProbe"]["httpGet"]["path"] == "/health"
    frontend_type = services["chunkbus-frontend"]["spec"].get("type", "ClusterIP")
    assert frontend_type == ("LoadBalancer" if overlay == "gpu" else "ClusterIP")
    assert services["chunkbus-backend"]["spec"].get("type", "ClusterIP") == "ClusterIP"


def test_every_pod_runs_without_privileges(rendered):
    _, objects = rendered
    for name, deployment in by_kind(objects, "Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0, name
        context = container(deployment)["securityContext"]
        assert context == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                           "capabilities": {"drop": ["ALL"]}}, name
        mounts = {m["mountPath"] for m in container(deployment)["volumeMounts"]}
        assert "/tmp" in mounts, f"{name}: a read-only root needs a writable /tmp (the runtime folder)"


def test_workers_register_before_they_count_as_ready(rendered):
    _, objects = rendered
    workers = {n: d for n, d in by_kind(objects, "Deployment").items() if n.startswith("chunkbus-worker-")}
    assert workers
    selectors = set()
    for name, worker in workers.items():
        probe = container(worker)["readinessProbe"]["exec"]["command"]
        assert probe == ["chunkbus-healthcheck", "worker", "--backend-port=5556"], name
        assert option(worker, "broker") == "tcp://chunkbus-backend:5556"
        assert "livenessProbe" not in container(worker)
        assert "/cache" in {m["mountPath"] for m in container(worker)["volumeMounts"]}
        selectors.add(tuple(sorted(worker["spec"]["selector"]["matchLabels"].items())))
    assert len(selectors) == len(workers), "two models' Deployments select the same pods"


def test_each_model_scales_on_its_own_queue(rendered):
    overlay, objects = rendered
    scaled = by_kind(objects, "ScaledObject")
    deployments = by_kind(objects, "Deployment")
    if overlay != "gpu":
        assert not scaled
        return
    assert set(scaled) == {n for n in deployments if n.startswith("chunkbus-worker-")}
    for obj in scaled.values():
        worker = deployments[obj["spec"]["scaleTargetRef"]["name"]]
        assert "nvidia.com/gpu" in container(worker)["resources"]["limits"]
        assert obj["spec"]["minReplicaCount"] == 0, "idle models scale to zero"
        load, recent = obj["spec"]["triggers"]
        service = option(worker, "service")
        for trigger in (load, recent):
            assert f'service="{service}"' in trigger["metadata"]["query"]
        assert load["metadata"]["threshold"] == option(worker, "max-batch"), "a worker's share is its batch"
        assert load["metadata"]["activationThreshold"] == "0"


def test_the_secrets_the_pods_mount_are_the_ones_make_secrets_makes(tmp_path):
    keys = tmp_path / "keys"
    (keys / "robots").mkdir(parents=True)
    subprocess.run([CHUNKBUS, "keys", "new", "so101", "--dir", str(tmp_path)], check=True, capture_output=True)
    shutil.copy(tmp_path / "so101.key", keys / "robots")
    env = {**os.environ, "PATH": f"{Path(CHUNKBUS).parent}:{os.environ['PATH']}"}
    result = subprocess.run(["sh", str(K8S / "make-secrets.sh"), "chunkbus", str(keys), "--dry-run"], env=env,
                            capture_output=True, text=True, timeout=60)
    if result.returncode and shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")
    assert result.returncode == 0, result.stderr
    secrets = {s["metadata"]["name"]: s for s in yaml.safe_load_all(result.stdout) if s}
    for secret in secrets.values():
        kubernetes_validate.validate(secret, "1.32", strict=True)
    assert set(secrets) == secrets_mounted(render("gpu")) | {"chunkbus-workers", "chunkbus-robots"}
    assert set(secrets["chunkbus-broker-key"]["data"]) == {"broker.key_secret", "broker.key"}
    assert set(secrets["chunkbus-worker-key"]["data"]) == {"worker.key_secret", "broker.key"}
    assert set(secrets["chunkbus-robots"]["data"]) == {"so101.key"}
    assert set(secrets["chunkbus-workers"]["data"]) == {"worker.key"}


def normalized(value):
    """Strings with their runs of whitespace made one space: kustomize re-folds long YAML lines."""
    if isinstance(value, dict):
        return {key: normalized(item) for key, item in value.items()}
    if isinstance(value, list):
        return [normalized(item) for item in value]
    return " ".join(value.split()) if isinstance(value, str) else value


def test_the_prometheus_rule_holds_the_alert_file():
    rules = by_kind(render("gpu"), "PrometheusRule")["chunkbus"]
    alerts = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())
    assert normalized(rules["spec"]["groups"]) == normalized(alerts["groups"])
    names = {rule["alert"] for group in alerts["groups"] for rule in group["rules"]}
    assert {"ChunkbusNoWorker", "ChunkbusQueueGrowing", "ChunkbusServiceTimeOverBudget",
            "ChunkbusRequestsFailing"} <= names


# --- images and compose --------------------------------------------------------------------------------


def dockerfile_stages() -> dict[str, list[str]]:
    """Each stage's instructions (continuation lines joined), by its name."""
    text = re.sub(r"\\\n\s*", " ", (DEPLOY / "docker" / "Dockerfile").read_text())
    stages: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if match := re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", line, re.I):
            current = match[2]
            stages[current] = [line]
        elif current is not None:
            stages[current].append(line)
    return stages


def test_the_images_install_the_projects_own_dependencies_and_run_unprivileged():
    stages = dockerfile_stages()
    assert {"cpu", "broker", "worker"} <= set(stages)
    for build in ("build-gpu", "build-cpu"):
        installs = [line for line in stages[build] if "pip install" in line]
        assert any("-r pyproject.toml" in line for line in installs), "dependencies come from pyproject.toml"
        assert any("--no-deps ." in line for line in installs)
        assert [line for line in stages[build] if "--torch-backend" in line]
    assert not list(DEPLOY.rglob("requirements*.txt")), "a second list of dependencies"

    def inherited(stage: str) -> list[str]:
        base = stages[stage][0].split()[1]
        return (inherited(base) if base in stages else []) + stages[stage]

    for target in ("cpu", "broker", "worker"):
        lines = inherited(target)
        users = [line.split()[1] for line in lines if line.startswith("USER")]
        assert users and users[-1].split(":")[0] not in ("0", "root"), f"{target} runs as root"
        assert users[-1].split(":")[0].isdigit(), "a numeric user: Kubernetes' runAsNonRoot checks it"
        assert any(line.startswith("ENV") and "HF_HOME=/cache/huggingface" in line for line in lines)
        assert 'VOLUME ["/cache"]' in lines
    assert any("chunkbus-healthcheck broker" in " ".join(json.loads(line.split("CMD", 1)[1]))
               for line in stages["broker"] if line.startswith("HEALTHCHECK"))
    assert any("chunkbus-healthcheck worker" in " ".join(json.loads(line.split("CMD", 1)[1]))
               for line in stages["worker"] if line.startswith("HEALTHCHECK"))


def test_every_file_the_images_copy_gets_past_the_dockerignore():
    ignore = (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
    assert ignore[ignore.index("*") if "*" in ignore else 0] == "*", "everything else stays out (.venv, .git, keys)"
    sources = []
    for lines in dockerfile_stages().values():
        for line in lines:
            if line.startswith("COPY") and "--from=" not in line:
                sources += [word for word in line.split()[1:-1] if not word.startswith("--")]
    assert sources
    for source in sources:
        assert (REPO / source).exists(), source
        assert source in allowed, f"{source} is not let into the build by Dockerfile.dockerignore"


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_the_compose_file_runs_a_curve_broker_and_gpu_workers():
    """Checked by reading it (docker compose may be absent); `docker compose config` below."""
    services = compose()["services"]
    broker = services["broker"]
    command = broker["command"]
    assert {"--curve-secret=/keys/broker.key_secret", "--allow-robots=/keys/robots",
            "--allow-workers=/keys/workers", "--metrics-port=9100", "--metrics-host=0.0.0.0"} <= set(command)
    published = " ".join(broker["ports"])
    assert ":5555" in published and "5556" not in published, "robots get in; the backend stays on the host"
    assert "127.0.0.1:${METRICS_PORT:-9100}:9100" in broker["ports"]
    assert broker["healthcheck"]["test"][:3] == ["CMD", "chunkbus-healthcheck", "broker"]
    assert broker["restart"] == "always"
    stages = dockerfile_stages()
    for name in ("worker", "worker-gpu1"):
        worker = services[name]
        assert "--broker=tcp://broker:5556" in worker["command"]
        assert worker["environment"]["CHUNKBUS_CURVE_SECRET"] == "/keys/worker.key_secret"
        (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert worker["depends_on"]["broker"]["condition"] == "service_healthy"
        assert worker["restart"] == "on-failure"
    for service in services.values():
        if "build" in service:
            assert service["build"]["target"] in stages
            assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).exists()
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), source
    assert all(service.get("user", "10001").split(":")[0] != "0" for service in services.values())


def docker_compose() -> list[str] | None:
    for command in (["docker", "compose"], ["docker-compose"]):
        try:
            result = subprocess.run([*command, "version"], capture_output=True, text=True, timeout=20)
        except FileNotFoundError:
            continue
        if result.returncode == 0 and re.search(r"\bv?2\.\d", result.stdout):
            return command
    return None


def test_docker_compose_accepts_the_compose_file(tmp_path):
    command = docker_compose()
    if command is None:
        pytest.skip("no docker compose v2 here; the test above read the file itself")
    profiles = [arg for name in ("monitoring", "second-gpu", "tools") for arg in ("--profile", name)]
    env = {key: value for key, value in os.environ.items() if key not in ("POLICY", "KEYS", "CACHE")}
    result = subprocess.run([*command, "-f", str(DEPLOY / "compose.yaml"), *profiles, "config", "--format", "json"],
                            capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    assert set(config["services"]) == set(compose()["services"])
    assert "--policy=demo:act" in config["services"]["worker"]["command"]


# --- the metrics contract, against a real broker and actuator --------------------------------------------


def test_latency_histograms_count_as_prometheus_buckets_do():
    from prometheus_client.core import HistogramMetricFamily

    from chunkbus.bus.records import Histogram
    from chunkbus.nodes.metrics import add_histogram

    histogram = Histogram.empty()
    for seconds in (0.0, 0.001, 0.0011, 0.05, 11.0):  # a bucket holds what is at most its bound
        histogram.observe(seconds)
    family = HistogramMetricFamily("h", "", labels=["service"])
    add_histogram(family, ["act"], histogram)
    buckets = {s.labels["le"]: s.value for s in family.samples if s.name == "h_bucket"}
    assert (buckets["0.001"], buckets["0.0025"], buckets["0.05"], buckets["10.0"], buckets["+Inf"]) == (2, 3, 4, 4, 5)
    totals = {s.name: s.value for s in family.samples if s.name != "h_bucket"}
    assert totals == {"h_count": 5, "h_sum": pytest.approx(11.0521)}


def scrape(port: int) -> dict[str, list[tuple[dict, float]]]:
    """Every sample of a /metrics page, by sample name (chunkbus_requests_total, ..._bucket)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples: dict[str, list[tuple[dict, float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def sum_query(query: str, samples: dict) -> float:
    """A ScaledObject's load query, `(sum(NAME{label="value"}) or vector(0)) + ...`, evaluated on a
    scrape (a series the broker does not export counts 0, as `or vector(0)` makes it in PromQL)."""
    term = r'\(sum\((\w+)\{(\w+)="([^"]*)"\}\) or vector\(0\)\)'
    assert re.fullmatch(rf"{term}(\s*\+\s*{term})*", query.strip()), f"not a sum of gauges: {query}"
    return sum(value for name, label, wanted in re.findall(term, query)
               for labels, value in samples.get(name, []) if labels.get(label) == wanted)


def promql_uses(expr: str) -> tuple[set[str], set[str], list[tuple[str, str]]]:
    """The metric names, the label names and the (label, exact value) matchers in a PromQL expression."""
    names = set(re.findall(r"\b(chunkbus_[a-z0-9_]+)\b", expr))
    matchers = re.findall(r'(\w+)\s*(?:=~|!~|!=|=)\s*"([^"]*)"', expr)
    grouped = {label.strip() for clause in re.findall(r"\b(?:by|on|without|ignoring)\s*\(([^)]*)\)", expr)
               for label in clause.split(",") if label.strip()}
    return names, {label for label, _ in matchers} | grouped, matchers


def check_expression(expr: str, samples: dict, where: str) -> None:
    names, labels, matchers = promql_uses(expr)
    assert names, f"{where}: no chunkbus metric in {expr!r}"
    for name in names:
        assert name in samples, f"{where}: {name} is not exported (exported: {sorted(samples)})"
    exported = {label for name in names for labels, _ in samples[name] for label in labels}
    for label in labels - {"le"} if any(n.endswith("_bucket") for n in names) else labels:
        assert label in exported, f"{where}: no metric of {sorted(names)} has label {label!r}"
    for label, value in matchers:
        if "$" in value:  # a dashboard variable
            continue
        values = {labels.get(label) for name in names for labels, _ in samples[name]}
        for alternative in value.split("|"):
            assert alternative in values, f"{where}: {label}={alternative!r} is never exported ({values})"


def overlay_queries() -> list[tuple[str, dict]]:
    return [(obj["metadata"]["name"], trigger) for obj in by_kind(render("gpu"), "ScaledObject").values()
            for trigger in obj["spec"]["triggers"]]


def alert_expressions() -> list[tuple[str, str]]:
    alerts = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())
    return [(rule["alert"], rule["expr"]) for group in alerts["groups"] for rule in group["rules"]]


def dashboard_expressions() -> list[tuple[str, str]]:
    dashboard = json.loads((DEPLOY / "grafana" / "chunkbus.json").read_text())
    out = [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel.get("targets", [])]
    out += [(f"variable {v['name']}", v["query"]["query"]) for v in dashboard["templating"]["list"]
            if v["type"] == "query"]
    return out


def observation(robot: str, tick: int) -> ObservationRequest:
    now = time.monotonic()
    return ObservationRequest(robot_id=robot, request_id=f"{robot}-{tick}", tick=tick, fps=30.0, send_time=now,
                              task="", observations=[Observation(tick=tick, time=now, state=np.zeros(6))], ttl=30.0)


def healthcheck(*args: str) -> int:
    """deploy/docker/healthcheck.py's exit status (the images run it as chunkbus-healthcheck)."""
    return subprocess.run([sys.executable, str(HEALTHCHECK), *args], capture_output=True, timeout=20).returncode


def test_the_metrics_deploy_reads_are_exported_and_the_queue_scales_up_and_down(processes):
    triggers = overlay_queries()
    loads = {name: t for name, t in triggers if t["name"] == "load"}
    services = {re.search(r'service="([^"]+)"', t["metadata"]["query"])[1]: (name, t) for name, t in loads.items()}
    broker = start_broker(processes, "--metrics-port", "0", "--max-queue", "200")
    backend_port = int(broker.backend.rsplit(":", 1)[1])
    assert healthcheck("broker", "--port", str(broker.metrics_port)) == 0
    assert healthcheck("worker", "--backend-port", str(backend_port)) == 1, "no worker has registered yet"
    # Robots waiting for services that have no worker yet (an actuator asks for the model until one serves).
    with BrokerClient(broker.frontend) as asker:
        for service in services:
            assert asker.model(service) is None
        waiting = wait_for(lambda: (s := scrape(broker.metrics_port)) and len(s.get("chunkbus_waiting_robots", [])) ==
                           len(services) and s, timeout=5, what="the robots waiting, exported")
    assert all(value == 1 for _, value in waiting["chunkbus_waiting_robots"])
    # One worker per service the ScaledObjects name: one request at a time, 0.1 s each.
    for service in services:
        start_worker(processes, broker.backend, "scripted:sine?delay=0.1", "--service", service)
    assert healthcheck("worker", "--backend-port", str(backend_port)) == 0
    assert healthcheck("worker", "--backend-port", "1") == 1

    busy, (_, busy_trigger) = next(iter(services.items()))
    threshold = float(busy_trigger["metadata"]["threshold"])
    clients = [BrokerClient(broker.frontend) for _ in range(3)]
    try:
        for robot, client in enumerate(clients):  # 36 requests: 3.6 s of work for one worker
            for tick in range(12):
                client.send(busy, observation(f"robot{robot}", tick))
        under_load = wait_for(lambda: (s := scrape(broker.metrics_port)) and
                              sum_query(busy_trigger["metadata"]["query"], s) > threshold and s,
                              timeout=5, what=f"the {busy} load query past its threshold {threshold}")
        for service, (_, trigger) in services.items():
            value = sum_query(trigger["metadata"]["query"], under_load)
            assert (value > threshold) if service == busy else value == 0, (service, value)
        assert math.ceil(sum_query(busy_trigger["metadata"]["query"], under_load) / threshold) >= 2
        answered = sum(client.receive(10) is not None for client in clients for _ in range(12))
        assert answered == 36
        idle = wait_for(lambda: (s := scrape(broker.metrics_port)) and
                        sum_query(busy_trigger["metadata"]["query"], s) == 0 and s,
                        timeout=5, what="the load query back at zero")
    finally:
        for client in clients:
            client.close()
    ok = {labels["service"]: value for labels, value in idle["chunkbus_requests_total"] if labels["outcome"] == "ok"}
    assert ok[busy] == 36
    waits = {labels["le"]: value for labels, value in idle["chunkbus_queue_wait_seconds_bucket"]
             if labels["service"] == busy}
    assert waits["+Inf"] == 36 and waits["0.1"] < 36, "the histogram saw requests wait for the one worker"

    assert "chunkbus_waiting_robots" not in idle, "a service with a worker has nobody waiting"
    for name, trigger in triggers:  # the waiting robots' gauge is exported only while someone waits
        check_expression(trigger["metadata"]["query"], {**waiting, **idle},
                         f"ScaledObject {name} trigger {trigger['name']}")
    for name, expr in alert_expressions():
        check_expression(expr, idle, f"alert {name}")

    # The per-robot panels read an actuator's /metrics (on the robot host).
    processes.start_node("arm")
    actuator = processes.start_node("actuator", "--broker", broker.frontend, "--service", busy, "--robot-id",
                                    "lab", "--metrics-port", "0")
    served = json.loads(processes.wait_log(actuator, '"metrics served"'))
    actuator_port = int(served["url"].rsplit(":", 1)[1].split("/")[0])
    robot = wait_for(lambda: (s := scrape(actuator_port)) and
                     s["chunkbus_actuator_round_trip_seconds_count"][0][1] >= 3 and s,
                     timeout=20, what="the actuator's round trips")
    (labels, ticks), = robot["chunkbus_actuator_ticks_total"]
    assert labels == {"robot": "lab", "service": busy} and ticks > 0
    health = json.load(urllib.request.urlopen(f"http://127.0.0.1:{actuator_port}/health", timeout=5))
    assert health["robot"] == "lab" and health["status"] == "ok"
    both = {**idle, **robot}
    for title, expr in dashboard_expressions():
        check_expression(expr, both, f"dashboard: {title}")


def test_a_robot_wakes_a_service_that_has_no_worker(processes):
    """Scale from zero: an actuator whose service has no worker asks the broker for its model until
    one serves it, and the broker counts it as a robot waiting, which lifts the load query past the
    ScaledObject's activation threshold (0); once a worker comes (as KEDA would start one) the
    actuator checks its model and runs."""
    name, trigger = next((n, t) for n, t in overlay_queries() if t["name"] == "load")
    service = re.search(r'service="([^"]+)"', trigger["metadata"]["query"])[1]
    broker = start_broker(processes, "--metrics-port", "0")
    processes.start_node("arm")
    actuator = processes.start(CHUNKBUS, "--log-json", "actuator", "--broker", broker.frontend, "--service",
                               service, script=True)
    activation = float(trigger["metadata"]["activationThreshold"])
    wait_for(lambda: sum_query(trigger["metadata"]["query"], scrape(broker.metrics_port)) > activation,
             timeout=15, what=f"{name}'s load query past its activation threshold with no worker")
    assert not actuator.ready_event, "the actuator ran without a model"
    start_worker(processes, broker.backend, "scripted:sine?delay=0.02", "--service", service)
    actuator.wait_ready(timeout=20)
    wait_for(lambda: any(labels == {"service": service, "outcome": "ok"} and value >= 5
                         for labels, value in scrape(broker.metrics_port)["chunkbus_requests_total"]),
             timeout=15, what="the robot's requests answered")
