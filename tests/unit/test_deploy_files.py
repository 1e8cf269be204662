"""The deployment files keep their promises: the Dockerfile, the Kubernetes
manifests (infra/k8s/) and the Compose project (infra/compose/).

No image can be built and no cluster runs here, so each file is checked for
what it promises and against the code it deploys: the Dockerfile by parsing
it, the Kustomize base and overlay by rendering them with kubectl and
validating every object against Kubernetes' schemas, compose.yaml against
the Compose Specification's schema. Every name one file takes from another (a
setting, a route, a stream, a port, a label, a uid, a mounted file) must exist
there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import io
import json
import re
import subprocess
import sys
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from dockerfile_parse import DockerfileParser  # type: ignore[import-untyped]

from ingest.app import create_app
from ingest.serve import SHUTDOWN_TIMEOUT
from tests.k8s import (
    BASE,
    CLUSTER_OVERLAY,
    INGRESS_PODS,
    TRUSTED_PROXIES,
    Rendered,
    drain_budget,
    main_container,
    render,
)
from tests.support import REPO
from voteflow.cli import main as voteflow_main
from voteflow.keys import GROUP, Keys
from voteflow.settings import PREFIX, Settings, SettingsError
from workers.worker import SHUTDOWN_GRACE

DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
# The Kubernetes release whose schemas the manifests are validated against
# (kubernetes-validate ships them; docs/deploying.md).
KUBERNETES_VERSION = "1.34"
# Kinds that KEDA adds to a cluster, which Kubernetes' own schemas do not know.
KEDA_KINDS = {("keda.sh/v1alpha1", "ScaledObject"), ("keda.sh/v1alpha1", "TriggerAuthentication")}
# Per KEDA scaler (pkg/scalers/redis_streams_scaler.go and the scalers' docs):
# metadata that must be there to scale on a consumer group's lag, and the keys
# of which at least one must name the server(s).
LAG_METADATA = {"stream", "consumerGroup", "lagCount"}
SCALER_ADDRESS_KEYS = {
    "redis-streams": {"address", "host", "addressFromEnv", "hostFromEnv"},
    "redis-cluster-streams": {"addresses", "hosts", "addressesFromEnv", "hostsFromEnv"},
}
# Packages that would bring a compiler into the final image.
COMPILERS = ("build-essential", "gcc", "g++", "clang", "make", "libc6-dev", "python3-dev")
SETTING_NAMES = {PREFIX + field.name.upper() for field in dataclasses.fields(Settings)}


# -- the Dockerfile -----------------------------------------------------------


def _stages() -> list[list[dict[str, Any]]]:
    """The Dockerfile's instructions, one list per stage (each starts at FROM)."""
    with DOCKERFILE.open("rb") as file:
        parser = DockerfileParser(fileobj=file)
        structure: list[dict[str, Any]] = parser.structure
    stages: list[list[dict[str, Any]]] = []
    for instruction in structure:
        if instruction["instruction"] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def _values(stage: list[dict[str, Any]], instruction: str) -> list[str]:
    return [i["value"] for i in stage if i["instruction"] == instruction]


def _console_script() -> str:
    with (REPO / "pyproject.toml").open("rb") as file:
        scripts: dict[str, str] = tomllib.load(file)["project"]["scripts"]
    [name] = [n for n, target in scripts.items() if target == "voteflow.cli:main"]
    return name


def _accepts(command: list[str]) -> bool:
    """The voteflow CLI knows this command line (its --help exits 0)."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            voteflow_main([*command, "--help"])
    except SystemExit as exc:
        return exc.code == 0
    return False


def image_uid() -> int:
    [user] = _values(_stages()[-1], "USER")
    return int(user.split(":")[0])


def test_image_is_built_in_one_stage_and_runs_from_a_slim_one_without_compilers() -> None:
    stages = _stages()
    assert len(stages) >= 2, "a build stage and a runtime stage"
    final = stages[-1]
    base = final[0]["value"].split()[0]
    assert base.startswith("python:3.11-") and "slim" in base, base
    for run in _values(final, "RUN"):
        words = run.replace(";", " ").replace("&&", " ").split()
        assert not set(words) & set(COMPILERS), f"a compiler in the final stage: {run}"
    # What the final stage copies comes from the build stage: the virtualenv only.
    names = {s[0]["value"].split()[-1] for s in stages[:-1] if " AS " in s[0]["value"].upper()}
    for copy in _values(final, "COPY"):
        source = next((w for w in copy.split() if w.startswith("--from=")), "")
        assert source.removeprefix("--from=") in names, f"copied from outside a stage: {copy}"
        assert copy.split()[-2:] == ["/opt/venv", "/opt/venv"], copy
    # The build stage installs the project itself, none of its extras.
    installs = [r for s in stages[:-1] for r in _values(s, "RUN") if "pip install" in r]
    # At the locked versions: the ones the suite passed with.
    assert any("pip install -c requirements.lock ." in r for r in installs), installs
    assert not any("[" in r for r in installs), f"extras in the image: {installs}"


def test_image_runs_as_an_unprivileged_numeric_user() -> None:
    [user] = _values(_stages()[-1], "USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0, f"USER {user}: a numeric uid other than 0"
    assert not gid or (gid.isdigit() and int(gid) > 0), f"USER {user}"


def test_image_entrypoint_is_the_console_script_and_its_commands_exist() -> None:
    final = _stages()[-1]
    [entrypoint] = [json.loads(v) for v in _values(final, "ENTRYPOINT")]
    [cmd] = [json.loads(v) for v in _values(final, "CMD")]
    assert Path(entrypoint[0]).name == _console_script(), entrypoint
    assert cmd == ["edge"], cmd
    for command in (cmd, ["worker"], ["migrate"]):
        assert _accepts(command), command
    assert not _accepts(["no-such-command"])  # the check above can fail


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path (or a parent) wins."""
    ignored = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.removeprefix("!").rstrip("/")
        if any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes) or (
            pattern.startswith("**/") and fnmatch.fnmatchcase(parts[-1], pattern[3:])
        ):
            ignored = not negated
    return ignored


def test_build_context_holds_what_the_dockerfile_copies_and_no_more() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied = [
        word
        for stage in _stages()
        for copy in _values(stage, "COPY")
        if "--from=" not in copy
        for word in copy.split()[:-1]
    ]
    assert copied
    for source in copied:
        assert (REPO / source).exists(), source
        assert not _ignored(source.rstrip("/"), patterns), f".dockerignore leaves out {source}"
        if (REPO / source).is_dir():
            for file in (REPO / source).rglob("*"):
                if file.is_file() and "__pycache__" not in file.parts:
                    relative = file.relative_to(REPO).as_posix()
                    assert not _ignored(relative, patterns), relative
    for kept_out in (".git", ".venv", "tests/conftest.py", ".voteflow", "loadtest/run.py"):
        assert _ignored(kept_out, patterns), f"{kept_out} would be sent to the builder"


# -- Kubernetes ---------------------------------------------------------------


@pytest.fixture(scope="module", params=[BASE, CLUSTER_OVERLAY], ids=["base", "redis-cluster"])
def rendered(request: pytest.FixtureRequest) -> Rendered:
    return Rendered(render(request.param))


def test_every_object_is_valid_for_kubernetes(rendered: Rendered) -> None:
    kinds = set()
    for obj in rendered.objects:
        kinds.add(obj["kind"])
        if (obj["apiVersion"], obj["kind"]) in KEDA_KINDS:
            continue
        # strict: an unknown (say, misspelt) field is an error too.
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    expected = {"Deployment", "Service", "Job", "ConfigMap", "Secret"}
    assert expected | {"HorizontalPodAutoscaler", "PodDisruptionBudget", "ScaledObject"} <= kinds


def test_validation_rejects_a_broken_object(rendered: Rendered) -> None:
    # The check above can fail: a misspelt field is refused.
    broken = json.loads(json.dumps(rendered.deployment("edge")))
    broken["spec"]["template"]["spec"]["terminationGracePeriod"] = 20
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_workloads_run_voteflow_commands_as_the_image_user(rendered: Rendered) -> None:
    workloads = [*rendered.of_kind("Deployment"), *rendered.of_kind("Job")]
    assert {tuple(main_container(w)["args"]) for w in workloads} == {
        ("edge",),
        ("worker",),
        ("migrate",),
    }
    for workload in workloads:
        assert _accepts(main_container(workload)["args"])
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == image_uid()
        resources_ = main_container(workload)["resources"]
        assert resources_["requests"] and resources_["limits"], workload["metadata"]["name"]


def test_settings_are_real_and_valid_and_every_reference_resolves(rendered: Rendered) -> None:
    settings = rendered.settings()
    secret = rendered.secret("voteflow-secrets")
    assert set(settings) <= SETTING_NAMES, set(settings) - SETTING_NAMES
    assert set(secret) <= SETTING_NAMES, set(secret) - SETTING_NAMES
    assert not set(settings) & set(secret)
    # What an edge or a worker would read at start-up, once the trusted
    # proxies are set (test_kubernetes_base_...), passes its checks.
    parsed = Settings.from_env({**rendered.configured(), **secret})
    parsed.require_urls()
    assert parsed.host == "0.0.0.0"  # reachable by the Service and the probes
    for workload in [*rendered.of_kind("Deployment"), *rendered.of_kind("Job")]:
        container = main_container(workload)
        for source in container["envFrom"]:
            if "configMapRef" in source:
                rendered.named("ConfigMap", source["configMapRef"]["name"])
            else:
                rendered.named("Secret", source["secretRef"]["name"])
        for variable in container.get("env", []):
            ref = variable["valueFrom"]["secretKeyRef"]
            assert ref["key"] in rendered.secret(ref["name"]), ref
            assert not variable["name"].startswith(PREFIX), "settings belong in the ConfigMap"


def test_kubernetes_base_does_not_start_behind_its_ingress_until_trusted_proxies_are_set(
    rendered: Rendered, tmp_path: Path
) -> None:
    """Left empty, every client behind the ingress would share the ingress's
    per-IP limit without a word; the placeholder stops the edge (and the
    worker) at start instead, naming the setting and saying what it wants."""
    env = {**rendered.settings(), **rendered.secret("voteflow-secrets")}
    with pytest.raises(SettingsError, match=TRUSTED_PROXIES) as refused:
        Settings.from_env(env)
    assert "ingress" in str(refused.value)
    # The edge itself, as the pod would run it: exit status 2 and the reason.
    for role in ("edge", "worker"):
        done = subprocess.run(
            [sys.executable, "-m", "voteflow", role],
            env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, (role, done.returncode, done.stderr[-2000:])
        assert TRUSTED_PROXIES in done.stderr and "ingress" in done.stderr, done.stderr
    # Replaced as settings.env says (or emptied for pods that clients reach
    # without a proxy), the settings pass.
    for value in (INGRESS_PODS, ""):
        assert Settings.from_env(env | {TRUSTED_PROXIES: value}).trusted_proxies == value


def test_ports_and_probes_match_the_settings(rendered: Rendered) -> None:
    settings = rendered.settings()
    edge, worker = rendered.deployment("edge"), rendered.deployment("worker")
    edge_ports = {p["name"]: p["containerPort"] for p in main_container(edge)["ports"]}
    worker_ports = {p["name"]: p["containerPort"] for p in main_container(worker)["ports"]}
    assert edge_ports["http"] == int(settings["VOTEFLOW_PORT"])
    assert worker_ports["metrics"] == int(settings["VOTEFLOW_WORKER_METRICS_PORT"])
    probes = main_container(edge)
    assert probes["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert probes["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert main_container(worker)["livenessProbe"]["httpGet"] == {
        "path": "/metrics",
        "port": "metrics",
    }
    # Every route a probe names is one of the edge's routes.
    app = create_app(Settings(database_url="postgresql://unused", redis_url="redis://unused"))
    routes = {resource.canonical for resource in app.router.resources()}
    assert {"/ready", "/health"} <= routes
    for service in rendered.of_kind("Service"):
        [target] = [
            d
            for d in rendered.of_kind("Deployment")
            if _matches(service["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])
        ]
        names = {p["name"] for p in main_container(target)["ports"]}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= names


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def test_worker_metrics_listen_beyond_loopback_where_prometheus_scrapes_another_pod(
    rendered: Rendered,
) -> None:
    # The default is loopback (a worker on a shared host keeps its counts to
    # itself); a pod's Prometheus and liveness probe come from outside the pod.
    assert Settings().worker_metrics_host == "127.0.0.1"
    assert Settings.from_env(rendered.configured()).worker_metrics_host == "0.0.0.0"
    # In Compose, Prometheus is a container of its own (scraping "worker").
    env = compose()["services"]["worker"]["environment"]
    assert Settings.from_env({k: str(v) for k, v in env.items()}).worker_metrics_host == "0.0.0.0"


def test_autoscalers_and_disruption_budget_target_the_right_pods(rendered: Rendered) -> None:
    edge, worker = rendered.deployment("edge"), rendered.deployment("worker")
    [hpa] = rendered.of_kind("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": edge["metadata"]["name"],
    }
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    [scaled] = rendered.of_kind("ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    assert scaled["spec"]["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    [pdb] = rendered.of_kind("PodDisruptionBudget")
    selector = pdb["spec"]["selector"]["matchLabels"]
    for deployment in rendered.of_kind("Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert _matches(selector, labels) == (deployment is edge)


def test_workers_scale_on_the_lag_of_every_stream_shard(rendered: Rendered) -> None:
    settings = Settings.from_env(rendered.configured())
    [scaled] = rendered.of_kind("ScaledObject")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"]
    assert spec["minReplicaCount"] >= 1  # the workers also run the reclaim job
    scaler = "redis-cluster-streams" if settings.redis_cluster else "redis-streams"
    worker_env = {v["name"] for v in main_container(rendered.deployment("worker")).get("env", [])}
    streams = []
    for trigger in spec["triggers"]:
        assert trigger["type"] == scaler
        metadata = trigger["metadata"]
        assert set(metadata) >= LAG_METADATA, metadata
        assert set(metadata) & SCALER_ADDRESS_KEYS[scaler], metadata
        assert all(isinstance(value, str) for value in metadata.values()), "KEDA takes strings"
        assert metadata["consumerGroup"] == GROUP
        assert int(metadata["lagCount"]) > 0
        for key, value in metadata.items():
            if key.endswith("FromEnv"):
                assert value in worker_env, f"{key}: {value} is not in the worker's env"
        streams.append(metadata["stream"])
    keys = Keys(settings.key_prefix, settings.stream_shards, settings.redis_cluster)
    assert sorted(streams) == sorted(keys.streams())


def test_the_cluster_overlay_turns_on_cluster_mode_and_replica_acks() -> None:
    base = Settings.from_env(Rendered(render(BASE)).configured())
    cluster = Settings.from_env(Rendered(render(CLUSTER_OVERLAY)).configured())
    assert (base.redis_cluster, base.redis_min_replicas) == (False, 0)
    assert (cluster.redis_cluster, cluster.redis_min_replicas) == (True, 1)
    changed = {
        f.name
        for f in dataclasses.fields(Settings)
        if getattr(base, f.name) != getattr(cluster, f.name)
    }
    assert changed == {"redis_cluster", "redis_min_replicas"}


def test_grace_periods_outlast_the_processes_own_shutdown_deadlines() -> None:
    rendered = Rendered(render(BASE))
    edge, worker = rendered.deployment("edge"), rendered.deployment("worker")
    # The edge gives requests in flight SHUTDOWN_TIMEOUT after its preStop sleep.
    assert drain_budget(edge) > SHUTDOWN_TIMEOUT
    # A worker first waits for a reclaim run, then for its consumers' batches.
    assert drain_budget(worker) > 2 * SHUTDOWN_GRACE


# -- Compose ------------------------------------------------------------------

COMPOSE_DIR = REPO / "infra" / "compose"
COMPOSE = COMPOSE_DIR / "compose.yaml"
# Added with -f to publish Prometheus and Grafana on the host's loopback.
MONITORING_PORTS = COMPOSE_DIR / "monitoring-ports.yaml"
# The Compose Specification's JSON schema, as check-jsonschema vendors it.
COMPOSE_SCHEMA = ("check_jsonschema", "builtin_schemas/vendor/compose-spec.json")


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def compose_validator() -> Any:
    package, path = COMPOSE_SCHEMA
    schema = json.loads((resources.files(package) / path).read_text())
    validator = jsonschema.validators.validator_for(schema)
    validator.check_schema(schema)
    return validator(schema)


def _bind_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source on the host, target in the container) of each bind mount."""
    mounts = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts.append((source, target))
    return mounts


def test_compose_file_follows_the_compose_specification() -> None:
    validator = compose_validator()
    document = compose()
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(document)]
    assert not errors, "\n".join(errors)
    # The check above can fail: an unknown key, a value of the wrong type.
    for service, key, value in (("worker", "restart_policy", "always"), ("edge", "ports", 8080)):
        broken = json.loads(json.dumps(document))
        broken["services"][service][key] = value
        assert list(validator.iter_errors(broken)), (service, key, value)


def test_compose_references_resolve() -> None:
    services = compose()["services"]
    for name, service in services.items():
        for source, _ in _bind_mounts(service):
            assert (COMPOSE_DIR / source).exists(), f"{name} mounts {source}, which is missing"
        for needed in service.get("depends_on", {}):
            assert needed in services, f"{name} depends on {needed}, which is no service"
        build = service.get("build")
        if build:
            assert (COMPOSE_DIR / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    # The edges and workers start after the migrations have succeeded.
    for name in ("edge", "worker"):
        condition = services[name]["depends_on"]["migrate"]["condition"]
        assert condition == "service_completed_successfully"
        assert services[name]["command"] == [name]
    assert services["migrate"]["command"] == ["migrate"]
    assert services["edge"]["deploy"]["replicas"] == 2


def test_compose_gives_edges_and_workers_real_settings() -> None:
    services = compose()["services"]
    for name in ("edge", "worker", "migrate"):
        env = services[name]["environment"]
        assert set(env) <= SETTING_NAMES, set(env) - SETTING_NAMES
        Settings.from_env({k: str(v) for k, v in env.items()}).require_urls()
    assert services["edge"]["environment"] == services["worker"]["environment"]


def test_compose_redis_keeps_every_acknowledged_vote() -> None:
    redis_ = compose()["services"]["redis"]
    command = redis_["command"]
    options = dict(zip(command[1::2], command[2::2], strict=True))
    assert options["--appendonly"] == "yes"
    assert options["--appendfsync"] == "always"
    assert options["--maxmemory-policy"] == "noeviction"
    assert any(target == "/data" for target in (v.split(":")[1] for v in redis_["volumes"]))


def _bytes(size: str) -> int:
    """A Redis or Compose memory size ("1gb", "2g", "512mb") in bytes."""
    match = re.fullmatch(r"(\d+)([kmg]?)b?", str(size).lower())
    assert match, size
    return int(match.group(1)) * 1024 ** "_kmg".index(match.group(2) or "_")


def test_compose_redis_is_bounded_with_headroom_for_aof_rewrites() -> None:
    redis_ = compose()["services"]["redis"]
    command = redis_["command"]
    options = dict(zip(command[1::2], command[2::2], strict=True))
    limit = _bytes(redis_["deploy"]["resources"]["limits"]["memory"])
    # An AOF rewrite forks; copy-on-write may take up to the data set again.
    assert 0 < _bytes(options["--maxmemory"]) <= limit // 2
    assert options["--maxmemory-policy"] == "noeviction"


def test_compose_transaction_pooling_turns_off_the_statement_cache() -> None:
    services = compose()["services"]
    assert services["pgbouncer"]["environment"]["POOL_MODE"] == "transaction"
    for name in ("edge", "worker"):
        env = Settings.from_env({k: str(v) for k, v in services[name]["environment"].items()})
        assert "@pgbouncer:" in env.database_url
        assert env.database_statement_cache_size == 0


def test_compose_nginx_fronts_every_edge() -> None:
    services = compose()["services"]
    nginx = services["nginx"]
    mounts = dict((target, source) for source, target in _bind_mounts(nginx))
    assert mounts["/etc/nginx/conf.d/default.conf"] == "../nginx/voteflow.conf"
    site = (COMPOSE_DIR / mounts["/etc/nginx/conf.d/default.conf"]).read_text()
    assert "include voteflow-upstream.conf;" in site
    listens = [
        line.split()[1].rstrip(";") for line in site.splitlines() if "listen" in line.split()[:1]
    ]
    assert {"80", "443"} <= set(listens), listens
    assert any(port.endswith(":80") for port in nginx["ports"])
    assert any(port.endswith(":443") for port in nginx["ports"])
    upstream = (COMPOSE_DIR / mounts["/etc/nginx/voteflow-upstream.conf"]).read_text()
    servers = [
        line.split()[1] for line in upstream.splitlines() if line.strip().startswith("server ")
    ]
    env = Settings.from_env({k: str(v) for k, v in services["edge"]["environment"].items()})
    assert servers == [f"edge:{env.port}"]
    # The edges believe nginx's X-Forwarded-For, and only nginx's.
    assert env.trusted_proxies == nginx["networks"]["voteflow"]["ipv4_address"]


def _named_volumes(service: dict[str, Any]) -> dict[str, str]:
    """Target in the container -> named volume, of each named volume mount."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if not source.startswith((".", "/")):
            mounts[target] = source
    return mounts


def test_compose_nginx_terminates_tls_with_a_certificate_made_on_first_start() -> None:
    services = compose()["services"]
    nginx, maker = services["nginx"], services["tls-cert"]
    mounts = {target: source for source, target in _bind_mounts(nginx)}
    site = (COMPOSE_DIR / mounts["/etc/nginx/conf.d/default.conf"]).read_text()
    assert "include voteflow-tls.conf;" in site
    # voteflow-tls.conf names files in the volume that tls-cert fills.
    tls_conf = (COMPOSE_DIR / mounts["/etc/nginx/voteflow-tls.conf"]).read_text()
    paths = dict(
        line.rstrip(";").split() for line in tls_conf.splitlines() if line.startswith("ssl_")
    )
    [(directory, volume)] = _named_volumes(nginx).items()
    assert paths == {
        "ssl_certificate": f"{directory}/tls.crt",
        "ssl_certificate_key": f"{directory}/tls.key",
    }
    [(written, maker_volume)] = _named_volumes(maker).items()
    assert maker_volume == volume
    # The maker runs infra/nginx/self_signed_cert.py into that volume, before nginx starts.
    script_mounts = {target: source for source, target in _bind_mounts(maker)}
    script = maker["entrypoint"][-1]
    assert (
        COMPOSE_DIR / script_mounts[script]
    ).resolve() == REPO / "infra/nginx/self_signed_cert.py"
    assert maker["command"][0] == written
    assert nginx["depends_on"]["tls-cert"]["condition"] == "service_completed_successfully"


def test_compose_prometheus_scrapes_every_edge_and_worker_with_the_alert_rules() -> None:
    services = compose()["services"]
    mounts = {target: source for source, target in _bind_mounts(services["prometheus"])}
    config_path = COMPOSE_DIR / mounts["/etc/prometheus/prometheus.yml"]
    config = load_yaml(config_path)
    for rules in config["rule_files"]:
        source = mounts[f"/etc/prometheus/{rules}"]
        assert (COMPOSE_DIR / source).resolve() == REPO / "infra" / "prometheus" / "alerts.yml"
    env = Settings.from_env({k: str(v) for k, v in services["edge"]["environment"].items()})
    ports = {"edge": env.port, "worker": env.worker_metrics_port}
    # The job names the rules and the dashboard tell edges from workers by.
    reference = load_yaml(REPO / "infra" / "prometheus" / "prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {job["job_name"] for job in reference["scrape_configs"]}
    # Redis's memory comes from the exporter service, on its port.
    [redis_sd] = jobs.pop("redis")["dns_sd_configs"]
    assert (redis_sd["names"], redis_sd["port"]) == (["redis-exporter"], 9121)
    exporter = services["redis-exporter"]
    assert exporter["environment"]["REDIS_ADDR"] == "redis://redis:6379"
    for job in jobs.values():
        [sd] = job["dns_sd_configs"]
        [name] = sd["names"]
        assert name in services
        assert sd["port"] == ports[name]
        assert job["job_name"] == f"voteflow-{name}"
    # Grafana's provisioned data source is this Prometheus.
    grafana = {t: s for s, t in _bind_mounts(services["grafana"])}
    sources = COMPOSE_DIR / grafana["/etc/grafana/provisioning/datasources"]
    [datasource] = load_yaml(sources / "prometheus.yml")["datasources"]
    assert datasource["url"] == "http://prometheus:9090"
    dashboards = COMPOSE_DIR / grafana["/etc/grafana/provisioning/dashboards"]
    [provider] = load_yaml(dashboards / "voteflow.yml")["providers"]
    dashboard_target = next(t for t in grafana if t.endswith("voteflow.json"))
    assert Path(dashboard_target).parent == Path(provider["options"]["path"])


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def test_compose_publishes_only_nginx_and_monitoring_on_loopback_when_asked() -> None:
    services = compose()["services"]
    # Prometheus (no authentication) and Grafana (a placeholder password)
    # run, but nothing of theirs is reachable from other machines.
    published = {name for name, service in services.items() if service.get("ports")}
    assert published == {"nginx"}
    assert "profiles" not in services["prometheus"] and "profiles" not in services["grafana"]
    # The override file publishes them on 127.0.0.1 only, on the ports they serve.
    override = load_yaml(MONITORING_PORTS)
    errors = [e.message for e in compose_validator().iter_errors(override)]
    assert not errors, errors
    assert set(override["services"]) == {"prometheus", "grafana"}
    assert set(override["services"]) <= set(services)
    grafana = {t: s for s, t in _bind_mounts(services["grafana"])}
    [datasource] = load_yaml(
        COMPOSE_DIR / grafana["/etc/grafana/provisioning/datasources"] / "prometheus.yml"
    )["datasources"]
    serves = {"prometheus": int(datasource["url"].rsplit(":", 1)[1]), "grafana": 3000}
    for name, service in override["services"].items():
        [port] = service["ports"]
        host, host_port, container_port = port.split(":")
        assert host == "127.0.0.1", port
        assert int(container_port) == serves[name] == int(host_port)
    assert "monitoring-ports.yaml" in COMPOSE.read_text()  # documented where one looks
