"""Offline checks of cluster/: the `ray up` config, the KubeRay RayJob, the runtime env, the image and the submit
script. No Ray cluster is started and nothing is fetched.

- cluster/ray-cluster.yaml goes through the steps `ray up` takes before it talks to the cloud:
  ray.autoscaler._private.util.prepare_config (defaults, docker checks) and validate_config (ray-schema.json).
- cluster/rayjob.yaml is validated against KubeRay's CRD (../shared/schemas/kuberay/ray.io_rayjobs.yaml, the
  openAPIV3Schema of the served version), turned into a JSON schema that, like a strict API server
  (`kubectl apply`, field validation Strict), rejects unknown fields wherever the CRD is structural.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY_SCHEMAS = REPO.parent / "shared" / "schemas" / "kuberay"
TORCH_PIN = "2.13.0"
EIGHT_GPU_INSTANCE_TYPES = {"p4d.24xlarge", "p4de.24xlarge", "p5.48xlarge", "p5e.48xlarge", "p5en.48xlarge"}
RUNTIME_ENV_KEYS = {"working_dir", "py_modules", "py_executable", "excludes", "pip", "uv", "conda", "env_vars",
                    "container", "image_uri", "config", "nsight", "java_jars", "worker_process_setup_hook"}
AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _load_yaml(path: Path):
    with open(path) as f:
        return yaml.load(f, Loader=_Loader)


def _load_all_yaml(path: Path) -> list:
    with open(path) as f:
        return [doc for doc in yaml.load_all(f, Loader=_Loader) if doc is not None]


@functools.cache
def ray_pin() -> str:
    """The Ray version pyproject.toml pins in its `ray` extra (ray[default]==X)."""
    text = (REPO / "pyproject.toml").read_text()
    try:
        import tomllib

        extra = tomllib.loads(text)["project"]["optional-dependencies"]["ray"]
    except ImportError:  # Python 3.10
        extra = re.findall(r'"([^"]+)"', re.search(r"^ray\s*=\s*\[(.*?)\]", text, re.MULTILINE | re.DOTALL).group(1))
    pins = [m.group(1) for req in extra if (m := re.fullmatch(r"ray\[[^\]]*\]==([0-9][0-9.]*)", req.strip()))]
    assert len(pins) == 1, f"pyproject.toml's ray extra should pin ray exactly once, found {extra}"
    return pins[0]


def _docs_by_kind(path: Path) -> dict:
    docs = _load_all_yaml(path)
    by_kind = {}
    for doc in docs:
        assert doc.get("kind") not in by_kind, f"{path.name}: two {doc.get('kind')} objects"
        by_kind[doc.get("kind")] = doc
    return by_kind


# ---- cluster/ray-cluster.yaml: Ray's own validation ---------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_util():
    pytest.importorskip("jsonschema", reason="Ray's cluster config validation needs jsonschema")
    return pytest.importorskip("ray.autoscaler._private.util",
                               reason="ray[default] is not installed (pip install -e '.[test]')")


def _ray_up_checks(util, config: dict) -> dict:
    """What `ray up` does to the config before any cloud call (ray.autoscaler._private.commands._bootstrap_config):
    fill in the provider's defaults, check the docker section, then validate against ray-schema.json."""
    prepared = util.prepare_config(copy.deepcopy(config))
    util.validate_config(prepared)
    return prepared


def test_ray_cluster_config_passes_ray_validation(ray_util):
    config = _load_yaml(CLUSTER / "ray-cluster.yaml")
    prepared = _ray_up_checks(ray_util, config)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("mutate, bad_name", [
    (lambda c: c.__setitem__("setup_comands", c.pop("setup_commands")), "setup_comands"),
    (lambda c: c["docker"].__setitem__("run_option", c["docker"].pop("run_options")), "run_option"),
    (lambda c: c["available_node_types"]["gpu_8x"].__setitem__("min_worker", 1), "min_worker"),
], ids=["top-level", "docker", "node-type"])
def test_ray_cluster_config_typo_is_rejected(ray_util, mutate, bad_name):
    import jsonschema

    config = _load_yaml(CLUSTER / "ray-cluster.yaml")
    mutate(config)
    with pytest.raises(jsonschema.ValidationError, match=bad_name):
        _ray_up_checks(ray_util, config)


def test_ray_cluster_config_shape():
    config = _load_yaml(CLUSTER / "ray-cluster.yaml")
    types = config["available_node_types"]
    head = config["head_node_type"]
    workers = {name: t for name, t in types.items() if name != head}
    gpu_types = {name: t for name, t in workers.items()
                 if t["node_config"].get("InstanceType") in EIGHT_GPU_INSTANCE_TYPES}
    assert gpu_types, f"no 8-GPU worker node type ({sorted(EIGHT_GPU_INSTANCE_TYPES)}) in {sorted(workers)}"
    for name, t in gpu_types.items():
        # distmerge starts one actor per GPU present when the job starts: keep at least one GPU node up.
        assert 1 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"], name
    docker = config["docker"]
    assert docker["image"] == _project_image(), "ray-cluster.yaml and rayjob.yaml should run the same image"
    run_options = " ".join(docker["run_options"])
    assert "RAY_AUTH_MODE=token" in run_options, "token authentication must be on in every container"
    assert re.search(r"-v \S+:/shared\b", run_options), "shared storage must be mounted at /shared"
    assert "~/.ray/auth_token" in config["file_mounts"], "the client's token must reach every node"
    assert any("distmerge" in cmd for cmd in config["setup_commands"]), "setup_commands should install distmerge"


# ---- cluster/rayjob.yaml: KubeRay's CRD schema ---------------------------------------------------------------------

# The API server validates ObjectMeta itself (the CRD's root `metadata` is a bare object); this is the part of it a
# manifest like ours uses, closed like the rest.
_OBJECT_META = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 253, "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"},
        "generateName": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "additionalProperties": False,
}

_DROPPED = {"description", "default", "example", "externalDocs", "nullable", "x-kubernetes-validations"}


def k8s_to_json_schema(node):
    """A Kubernetes structural OpenAPI v3 schema (a CRD's openAPIV3Schema) as a JSON schema.

    - `x-kubernetes-int-or-string`: an integer or a string (the string still has to match `pattern`);
    - `x-kubernetes-preserve-unknown-fields`: unknown fields allowed there (and, without `type`, any value);
    - an object that lists `properties` without preserve-unknown-fields gets `additionalProperties: false`: the
      API server prunes (or, with strict field validation, rejects) unknown fields, so a typo must fail here;
    - `x-kubernetes-embedded-resource`: apiVersion, kind and metadata are allowed besides the listed properties;
    - `nullable: true` admits null; CEL rules (`x-kubernetes-validations`), list-type and map-type markers and
      defaults are not evaluated.
    """
    if isinstance(node, list):
        return [k8s_to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in _DROPPED or key.startswith("x-kubernetes-"):
            continue
        if key in ("properties", "patternProperties", "definitions"):
            out[key] = {name: k8s_to_json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not", "allOf", "anyOf", "oneOf"):
            out[key] = k8s_to_json_schema(value)
        else:  # type, enum, format, pattern, required, min*/max*, uniqueItems, ...
            out[key] = copy.deepcopy(value)
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("x-kubernetes-embedded-resource") and "properties" in out:
        out["properties"].setdefault("apiVersion", {"type": "string"})
        out["properties"].setdefault("kind", {"type": "string"})
        out["properties"].setdefault("metadata", {"type": "object"})
    if node.get("x-kubernetes-preserve-unknown-fields"):
        pass
    elif "properties" in out and "additionalProperties" not in out and out.get("type", "object") == "object":
        out["additionalProperties"] = False
    if node.get("nullable"):
        if "type" in out:
            out["type"] = ([out["type"]] if isinstance(out["type"], str) else list(out["type"])) + ["null"]
        if "enum" in out:
            out["enum"] = list(out["enum"]) + [None]
        if "anyOf" in out:
            out["anyOf"] = list(out["anyOf"]) + [{"type": "null"}]
    return out


def crd_json_schema(crd: dict, version: str) -> dict:
    served = {v["name"]: v for v in crd["spec"]["versions"] if v.get("served", True)}
    assert version in served, f"{crd['metadata']['name']} serves {sorted(served)}, not {version}"
    schema = k8s_to_json_schema(served[version]["schema"]["openAPIV3Schema"])
    group = crd["spec"]["group"]
    schema["properties"]["apiVersion"] = {"enum": [f"{group}/{version}"]}
    schema["properties"]["kind"] = {"enum": [crd["spec"]["names"]["kind"]]}
    schema["properties"]["metadata"] = _OBJECT_META
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
    return schema


@functools.cache
def _rayjob_validator():
    import jsonschema

    path = KUBERAY_SCHEMAS / "ray.io_rayjobs.yaml"
    crd = _load_yaml(path)
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == "RayJob", path
    return jsonschema.Draft7Validator(crd_json_schema(crd, "v1"))


@pytest.fixture(scope="module")
def rayjob_validator():
    pytest.importorskip("jsonschema", reason="validating the RayJob needs jsonschema (pip install -e '.[test]')")
    if not (KUBERAY_SCHEMAS / "ray.io_rayjobs.yaml").is_file():
        pytest.skip(f"KubeRay CRD schemas not found at {KUBERAY_SCHEMAS} (expected shared/ beside the repository)")
    return _rayjob_validator()


def _errors(validator, doc) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]


def _rayjob() -> dict:
    return _docs_by_kind(CLUSTER / "rayjob.yaml")["RayJob"]


def test_crd_conversion_semantics():
    import jsonschema

    schema = k8s_to_json_schema({
        "type": "object",
        "properties": {
            "closed": {"type": "object", "properties": {"a": {"type": "string"}}},
            "open": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {"a": {}}},
            "anything": {"x-kubernetes-preserve-unknown-fields": True},
            "map": {"type": "object", "additionalProperties": {"type": "string"}},
            "qty": {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True,
                    "pattern": r"^[0-9]+(Gi|Mi)?$"},
            "maybe": {"type": "string", "nullable": True, "enum": ["x"]},
        },
    })
    jsonschema.Draft7Validator.check_schema(schema)
    v = jsonschema.Draft7Validator(schema)
    assert v.is_valid({"closed": {"a": "s"}, "open": {"b": 1}, "anything": [1, {"x": None}], "map": {"k": "v"},
                       "qty": 8, "maybe": None})
    assert v.is_valid({"qty": "8Gi", "maybe": "x"})
    assert not v.is_valid({"closed": {"b": "s"}})
    assert not v.is_valid({"unknown": 1})
    assert not v.is_valid({"qty": "8GB"})
    assert not v.is_valid({"qty": 1.5})
    assert not v.is_valid({"map": {"k": 1}})


@pytest.mark.shared
def test_rayjob_matches_kuberay_crd(rayjob_validator):
    errors = _errors(rayjob_validator, _rayjob())
    assert not errors, "cluster/rayjob.yaml does not match KubeRay's RayJob CRD:\n" + "\n".join(errors)


def _worker_container(job):
    return job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]


def _rename(mapping: dict, old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


REJECTED = {
    # the misspelled-field case the CRD must catch, at several depths
    "spec-typo": (lambda j: _rename(j["spec"], "shutdownAfterJobFinishes", "shutdownAfterJobFinish"),
                  "shutdownAfterJobFinish"),
    "worker-group-typo": (lambda j: _rename(j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0], "replicas",
                                            "replica"), "replica"),
    "container-typo": (lambda j: _rename(_worker_container(j), "volumeMounts", "volumeMount"), "volumeMount"),
    "metadata-typo": (lambda j: _rename(j["metadata"], "labels", "label"), "label"),
    "wrong-type": (lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].__setitem__("replicas", "one"),
                   "one"),
    "bad-enum": (lambda j: j["spec"]["rayClusterSpec"]["authOptions"].__setitem__("mode", "tokens"), "tokens"),
    "missing-required": (lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop("groupName"),
                         "groupName"),
    "bad-quantity": (lambda j: _worker_container(j)["resources"]["limits"].__setitem__("memory", "768GB"), "768GB"),
    "wrong-api-version": (lambda j: j.__setitem__("apiVersion", "ray.io/v2"), "ray.io/v2"),
}


@pytest.mark.shared
@pytest.mark.parametrize("case", sorted(REJECTED))
def test_rayjob_schema_rejects(rayjob_validator, case):
    mutate, bad = REJECTED[case]
    job = copy.deepcopy(_rayjob())
    mutate(job)
    errors = _errors(rayjob_validator, job)
    assert errors, f"{case}: the mutated RayJob was accepted"
    assert any(bad in e for e in errors), f"{case}: no error names {bad!r}: {errors}"


def _project_image() -> str:
    images = set()
    job = _rayjob()
    cluster_spec = job["spec"]["rayClusterSpec"]
    for group in [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]:
        images |= {c["image"] for c in group["template"]["spec"]["containers"]}
    assert len(images) == 1, f"rayjob.yaml runs several images: {images}"
    return images.pop()


def test_rayjob_content():
    docs = _docs_by_kind(CLUSTER / "rayjob.yaml")
    assert set(docs) == {"PersistentVolumeClaim", "RayJob"}
    pvc, job = docs["PersistentVolumeClaim"], docs["RayJob"]
    assert pvc["apiVersion"] == "v1" and "ReadWriteMany" in pvc["spec"]["accessModes"]
    assert pvc["metadata"]["labels"]["app.kubernetes.io/component"] != job["metadata"]["labels"][
        "app.kubernetes.io/component"], "the README applies the volume and the job separately by label"

    spec = job["spec"]
    assert job["apiVersion"] == "ray.io/v1"
    assert re.match(r"distmerge merge \S+ -o /shared/\S+ .*--runtime ray\b", spec["entrypoint"]), spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["env_vars"] == _load_yaml(CLUSTER / "runtime-env.yaml")["env_vars"], \
        "runtimeEnvYAML's env_vars should equal cluster/runtime-env.yaml's"
    assert "working_dir" not in runtime_env, "the submitter pod has no checkout to upload"

    cluster_spec = spec["rayClusterSpec"]
    assert cluster_spec["rayVersion"] == ray_pin()
    assert cluster_spec["authOptions"]["mode"] == "token"
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    for group in groups:
        pod = group["template"]["spec"]
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                  if "persistentVolumeClaim" in v}
        for container in pod["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert claims.get(mounts.get("/shared")) == pvc["metadata"]["name"], \
                f"{container['name']}: /shared must be the shared PersistentVolumeClaim"
            assert mounts.get("/dev/shm"), f"{container['name']}: Ray's object store needs a real /dev/shm"
            assert container["image"].split(":")[-1] not in ("latest", ""), container["image"]
    workers = cluster_spec["workerGroupSpecs"]
    assert workers
    for group in workers:
        pod = group["template"]["spec"]
        assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])), group["groupName"]
        for container in pod["containers"]:
            assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "8", group["groupName"]
        assert 1 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]


# ---- cluster/Dockerfile ---------------------------------------------------------------------------------------------

def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (CLUSTER / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)  # join continuation lines
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_pins_match_pyproject():
    instructions = _dockerfile_instructions()
    froms = [rest for word, rest in instructions if word == "FROM"]
    assert len(froms) == 1, froms
    m = re.fullmatch(r"rayproject/ray:(?P<ray>[0-9.]+)-py3(?P<py>[0-9]+)-cu(?P<cuda>[0-9]+)", froms[0])
    assert m, f"base image should be an official GPU tag rayproject/ray:<ray>-py3XX-cuXYZ, got {froms[0]}"
    assert m["ray"] == ray_pin(), f"base image Ray {m['ray']} != pyproject.toml's ray[default]=={ray_pin()}"

    runs = " ".join(rest for word, rest in instructions if word in ("RUN", "ARG", "ENV"))
    torch_pins = re.findall(r"torch==([0-9][0-9.]*)", runs)
    assert torch_pins and set(torch_pins) == {TORCH_PIN}, f"torch pins {torch_pins}, want torch=={TORCH_PIN}"
    index = re.search(r"download\.pytorch\.org/whl/(cu[0-9]+)", runs)
    assert index and index[1] == f"cu{m['cuda']}", "torch's CUDA build should match the base image's CUDA"
    ray_pins = re.findall(r"ray(?:\[[^\]]*\])?==([0-9][0-9.]*)", runs)
    assert set(ray_pins) == {ray_pin()}, f"Dockerfile pins ray {ray_pins}, pyproject.toml {ray_pin()}"
    assert "latest" not in froms[0]


# ---- cluster/submit.sh ----------------------------------------------------------------------------------------------

SUBMIT = CLUSTER / "submit.sh"


def test_submit_script_syntax():
    text = SUBMIT.read_text()
    assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text
    assert os.access(SUBMIT, os.X_OK), "cluster/submit.sh should be executable"
    subprocess.run(["bash", "-n", str(SUBMIT)], check=True)


def _run_submit(tmp_path, args, env_extra=None, token_file=False):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "ray.log"
    fake_ray = bin_dir / "ray"
    fake_ray.write_text('#!/usr/bin/env bash\n'
                        '{ echo "RAY_AUTH_MODE=${RAY_AUTH_MODE-<unset>}"; echo "PWD=$PWD"; '
                        'printf "ARG=%s\\n" "$@"; } > "$FAKE_RAY_LOG"\n')
    fake_ray.chmod(0o755)
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True, exist_ok=True)
    if token_file:
        (home / ".ray" / "auth_token").write_text("t" * 32)
    env = {k: v for k, v in os.environ.items() if k not in AUTH_VARS + ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", HOME=str(home), FAKE_RAY_LOG=str(log))
    env.update(env_extra or {})
    result = subprocess.run(["bash", str(SUBMIT), *args], check=False, env=env, capture_output=True,
                            text=True, cwd=tmp_path, timeout=30)
    calls = log.read_text().splitlines() if log.exists() else []
    return result, calls


def test_submit_script_builds_the_ray_job_command(tmp_path):
    result, calls = _run_submit(
        tmp_path, ["-a", "http://head:8265", "-s", "merge-1", "examples/rtsvm.yaml", "/shared/merged/x",
                   "--", "--seed", "0"], token_file=True)
    assert result.returncode == 0, result.stderr
    args = [c[len("ARG="):] for c in calls if c.startswith("ARG=")]
    assert args[:2] == ["job", "submit"]
    assert args[args.index("--address") + 1] == "http://head:8265"
    assert args[args.index("--submission-id") + 1] == "merge-1"
    assert os.path.realpath(args[args.index("--runtime-env") + 1]) == os.path.realpath(CLUSTER / "runtime-env.yaml")
    assert args[args.index("--") + 1:] == ["distmerge", "merge", "examples/rtsvm.yaml", "-o", "/shared/merged/x",
                                           "--runtime", "ray", "--seed", "0"]
    # run from the repository root, where the runtime env's `working_dir: .` points
    assert os.path.realpath(calls[1][len("PWD="):]) == os.path.realpath(REPO)
    # a token is at hand, so the client must send it: RAY_AUTH_MODE=token (the file alone sends nothing)
    assert calls[0] == "RAY_AUTH_MODE=token"
    assert "ray job logs" in result.stderr and "--follow" in result.stderr and "ray job stop" in result.stderr


@pytest.mark.parametrize("token_file, env, expected", [
    (False, {}, "<unset>"),
    (False, {"RAY_AUTH_TOKEN": "abc"}, "token"),
    (True, {"RAY_AUTH_MODE": "disabled"}, "disabled"),
])
def test_submit_script_auth_mode(tmp_path, token_file, env, expected):
    result, calls = _run_submit(tmp_path, ["cfg.yaml", "/shared/out"], env_extra=env, token_file=token_file)
    assert result.returncode == 0, result.stderr
    assert calls[0] == f"RAY_AUTH_MODE={expected}"


@pytest.mark.parametrize("args", [["cfg.yaml"], ["cfg.yaml", "relative/out"], ["--bogus", "cfg.yaml", "/o"]])
def test_submit_script_rejects_bad_arguments(tmp_path, args):
    result, calls = _run_submit(tmp_path, args)
    assert result.returncode == 2 and not calls, (result.returncode, result.stderr)


# ---- cluster/runtime-env.yaml ----------------------------------------------------------------------------------------

def test_runtime_env():
    env = _load_yaml(CLUSTER / "runtime-env.yaml")
    assert isinstance(env, dict)
    assert set(env) <= RUNTIME_ENV_KEYS, f"unknown runtime env keys: {set(env) - RUNTIME_ENV_KEYS}"
    assert env["working_dir"] == "."
    assert "/.*" in env["excludes"] and "*.safetensors" in env["excludes"], "keep .git, .venv and checkpoints out"
    env_vars = env["env_vars"]
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in env_vars.items()), "env_vars must be strings"
    assert env_vars["HF_HUB_OFFLINE"] == "1"
    assert env_vars["HF_HOME"].startswith("/shared/")
    assert not set(env_vars) & set(AUTH_VARS), "authentication settings do not belong in the job's runtime env"

    runtime_env = pytest.importorskip("ray.runtime_env", reason="ray is not installed")
    runtime_env.RuntimeEnv(**env)  # Ray's own field validation; uploads nothing


def test_readme_documents_token_auth():
    readme = (CLUSTER / "README.md").read_text()
    for needle in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token",
                   "ray get-auth-token", "ray job logs", "--follow", "HF_HUB_OFFLINE", "ray down", "kubectl"):
        assert needle in readme, f"cluster/README.md should mention {needle}"
