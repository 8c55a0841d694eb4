"""The deployment files: Kubernetes manifests validate against the API schemas and agree
with kmd's own settings and policy; the Dockerfiles parse and pin what they install;
systemd accepts the unit."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
CONTAINER = ROOT / "deploy" / "container"
K8S_VERSION = "1.30.0"  # the oldest Kubernetes release the manifests must still suit


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def manifests() -> list[dict]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [doc for name in kustomization["resources"] for doc in _docs(K8S / name)]


def by_kind(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in manifests() if d["kind"] == kind}


def test_manifests_validate_against_the_kubernetes_schemas():
    import kubernetes_validate

    docs = manifests() + _docs(K8S / "secret.example.yaml")
    for doc in docs:
        # strict: unknown fields are errors, as with `kubectl apply --validate=strict`
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds.count("Deployment") == 2 and "NetworkPolicy" in kinds and "ConfigMap" in kinds


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed: the kustomize build is not checked")
def test_kustomize_build_validates():
    import kubernetes_validate

    out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, check=True).stdout
    built = [d for d in yaml.safe_load_all(out) if d]
    for doc in built:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        assert doc["metadata"].get("namespace") == "kmd"
    images = {c["image"] for d in built if d["kind"] == "Deployment" for c in d["spec"]["template"]["spec"]["containers"]}
    assert images == {"registry.example.com/kmd:0.1.0-cuda"}


def test_configmap_is_a_valid_kmd_setup_and_the_pods_agree_with_it(tmp_path):
    from kmd.daemon.policy import load_policy
    from kmd.daemon.settings import load_settings

    config = by_kind("ConfigMap")["kmd-config"]["data"]
    (tmp_path / "kmd.yaml").write_text(config["kmd.yaml"].replace("/etc/kmd/policy.yaml", str(tmp_path / "policy.yaml")))
    (tmp_path / "policy.yaml").write_text(config["policy.yaml"])
    settings = load_settings(tmp_path / "kmd.yaml")
    load_policy(settings.policy_path)
    assert settings.api.host == "0.0.0.0" and settings.database is None  # the URL comes from the Secret

    secret_keys = set(_docs(K8S / "secret.example.yaml")[0]["stringData"])
    assert secret_keys == {"KMD_DB_URL", settings.api.token_env}
    deployments = by_kind("Deployment")
    roles = {}
    for name, dep in deployments.items():
        pod = dep["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        args = container["args"]
        roles[name] = args[args.index("--role") + 1]
        assert args[args.index("--config") + 1] == "/etc/kmd/kmd.yaml"
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert mounts["config"]["mountPath"] == "/etc/kmd"
        assert mounts["published"]["mountPath"] == settings.cluster.publish_dir
        assert mounts["published"].get("readOnly", False) == (roles[name] == "replica")
        assert mounts["state"]["mountPath"] == settings.state_dir
        assert container["ports"][0]["containerPort"] == settings.api.port
        assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert container["envFrom"] == [{"secretRef": {"name": "kmd-secrets"}}]
        assert pod["securityContext"]["runAsNonRoot"] is True
    assert roles == {"kmd-editor": "writer", "kmd-replica": "replica"}
    assert deployments["kmd-editor"]["spec"]["replicas"] == 1
    assert deployments["kmd-editor"]["spec"]["strategy"]["type"] == "Recreate"
    claims = by_kind("PersistentVolumeClaim")
    assert claims["kmd-published"]["spec"]["accessModes"] == ["ReadWriteMany"]

    # Every kmd pod is covered by an egress policy; only the editor reaches the internet.
    policies = by_kind("NetworkPolicy")
    covered = {p["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for p in policies.values()}
    assert covered == {"editor", "replica"}
    for policy in policies.values():
        assert policy["spec"]["policyTypes"] == ["Egress"]
        public = [r for r in policy["spec"]["egress"] for t in r.get("to", []) if "ipBlock" in t]
        assert bool(public) == (policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "editor")


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles_parse_and_pin_what_they_install(name):
    from dockerfile_parse import DockerfileParser

    path = CONTAINER / name
    parser = DockerfileParser(fileobj=path.open("rb"))
    known = {"FROM", "ENV", "RUN", "COPY", "USER", "WORKDIR", "VOLUME", "EXPOSE", "ENTRYPOINT", "CMD", "HEALTHCHECK",
             "ARG", "LABEL", "COMMENT"}  # fmt: skip
    instructions = parser.structure
    assert {i["instruction"] for i in instructions} <= known
    # the base image pinned to an exact Python release (digests are added once pulled)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", parser.baseimage)
    pyproject = (ROOT / "pyproject.toml").read_text()
    torch_pin = re.search(r'"torch==([\d.]+)"', pyproject).group(1)
    runs = " ".join(i["value"] for i in instructions if i["instruction"] == "RUN")
    assert f'"torch=={torch_pin}"' in runs
    assert "-c /opt/kmd/requirements.lock" in runs
    # every COPY source exists and is in the build context (.dockerignore allows it)
    allowed = [line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")]
    for copy in (i["value"].split() for i in instructions if i["instruction"] == "COPY"):
        for source in copy[:-1]:
            assert (ROOT / source).exists(), source
            assert any(source == a or source.startswith(a + "/") for a in allowed), f"{source} is not in the build context"
    user = next(i["value"] for i in instructions if i["instruction"] == "USER")
    assert not user.startswith(("0", "root"))
    assert parser.cmd == '["run", "--config", "/etc/kmd/kmd.yaml"]'


def _locked() -> dict[str, str]:
    """requirements.lock as {normalised name: version} (markers and comments dropped)."""
    pinned = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.split("#", 1)[0].split(";", 1)[0].strip()
        if line:
            pkg, sep, version = line.partition("==")
            assert sep and re.fullmatch(r"[\w.+!-]+", version.strip()), f"not an exact pin: {line!r}"
            pinned[re.sub(r"[-_.]+", "-", pkg.strip().lower())] = version.strip()
    return pinned


def test_lock_pins_every_dependency():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    names = {re.sub(r"[-_.]+", "-", re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0].lower()) for req in wanted}
    locked = _locked()
    assert names <= set(locked), f"not in requirements.lock (run scripts/lock.sh): {sorted(names - set(locked))}"
    # the lock agrees with the ranges pyproject.toml declares
    from packaging.requirements import Requirement

    for req in map(Requirement, wanted):
        name = re.sub(r"[-_.]+", "-", req.name.lower())
        assert req.specifier.contains(locked[name], prereleases=True), f"{name}=={locked[name]} outside {req.specifier}"


def test_every_install_path_uses_the_lock():
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    installs = [line for line in setup.splitlines() if "pip install" in line and "--upgrade pip" not in line and "--no-deps" not in line]
    assert installs and all("-c requirements.lock" in line for line in installs), installs
    assert "./scripts/setup.sh" in (ROOT / ".ci" / "run").read_text()
    for name in ("Dockerfile", "Dockerfile.cuda"):
        text = (CONTAINER / name).read_text()
        assert "COPY requirements.lock /opt/kmd/requirements.lock" in text


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_accepts_the_unit(tmp_path):
    unit = (ROOT / "deploy" / "systemd" / "kmd.service").read_text()
    kmd = Path(sys.executable).parent / "kmd"
    assert "ExecStart=/opt/kmd/.venv/bin/kmd run" in unit
    # verify checks that ExecStart's binary exists: point it at this checkout's
    (tmp_path / "kmd.service").write_text(unit.replace("/opt/kmd/.venv/bin/kmd", str(kmd)))
    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "kmd.service")], capture_output=True, text=True)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
