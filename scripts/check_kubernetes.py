"""Offline checks of the manifests in deploy/kubernetes/.

Run by scripts/check-kubernetes, in a virtualenv with kubernetes-validate
and jsonschema; arguments are the Kubernetes versions to validate against.

1. Every manifest is valid against the Kubernetes schemas of each version
   (kubernetes-validate, strict: unknown fields are errors). A kind or
   apiVersion it has no schema for is an error too, not a warning.
2. KEDA's kinds (keda.sh) are valid against the openAPIV3Schema of KEDA's
   own CRDs, vendored unchanged in deploy/kubernetes/schemas/ (see the
   README there), made strict the same way; the CRD's one CEL rule
   (minReplicaCount <= maxReplicaCount) is checked by hand.
3. The manifests agree with each other, with the Dockerfile and with the
   service's settings: what no schema can see (names, ports, paths, the
   user, the drain time, no secret in the ConfigMap).

Each problem is one line naming the file; any problem exits 1.
"""

import copy
import pathlib
import re
import sys
import tomllib

import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, ValidationError

ROOT = pathlib.Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "deploy" / "kubernetes"
KEDA_CRDS = MANIFESTS / "schemas" / "keda-v2.20.2"
# Not applied by `kubectl apply -k`: filled in by the operator.
SECRET_TEMPLATE = "secret.example.yaml"
KUSTOMIZATION = "kustomization.yaml"

problems = []


def problem(where, message):
    problems.append(f"{where}: {message}")


class StrictLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys; kubectl refuses them."""


def _mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def load_manifests():
    docs = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        try:
            loaded = list(yaml.load_all(path.read_text(), Loader=StrictLoader))
        except yaml.YAMLError as e:
            problem(path.name, f"not YAML: {e}")
            continue
        for doc in loaded:
            if doc is None:
                continue
            if not isinstance(doc, dict) or not all(
                isinstance(doc.get(k), str) for k in ("apiVersion", "kind")
            ):
                problem(path.name, "a document without apiVersion and kind")
                continue
            docs.append((path.name, doc))
    return docs


def strict(schema):
    """Unknown fields become errors, as kubernetes-validate's strict schemas
    make them; objects that keep unknown fields on purpose stay open."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [strict(v) for v in schema]
    return schema


def keda_schemas():
    """(apiVersion, kind) -> strict openAPIV3Schema, from the CRDs."""
    schemas = {}
    for path in sorted(KEDA_CRDS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        spec = crd["spec"]
        for version in spec["versions"]:
            schema = strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
            schemas[(f"{spec['group']}/{version['name']}", spec["names"]["kind"])] = schema
    if not schemas:
        problem(str(KEDA_CRDS.relative_to(ROOT)), "no CRD found")
    return schemas


DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


def validate_keda(file, doc, schemas):
    schema = schemas.get((doc["apiVersion"], doc["kind"]))
    where = f"{file} {doc['kind']}"
    if schema is None:
        problem(where, f"no KEDA CRD for {doc['apiVersion']} in {KEDA_CRDS.name}")
        return
    for error in jsonschema.Draft7Validator(schema).iter_errors(doc):
        path = ".".join(str(p) for p in error.absolute_path) or "(top)"
        problem(where, f"{path}: {error.message}")
    name = doc.get("metadata", {}).get("name", "")
    if not DNS_SUBDOMAIN.match(name):
        problem(where, f"metadata.name {name!r} is not a DNS subdomain")
    spec = doc.get("spec", {})
    # The CRD's x-kubernetes-validations rule (CEL, which jsonschema does
    # not run): maxReplicaCount defaults to 100.
    if doc["kind"] == "ScaledObject" and spec.get("minReplicaCount", 0) > spec.get(
        "maxReplicaCount", 100
    ):
        problem(where, "minReplicaCount must be less than or equal to maxReplicaCount")


def validate_kubernetes(file, doc, versions):
    where = f"{file} {doc['kind']}/{doc.get('metadata', {}).get('name')}"
    for version in versions:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except ValidationError as e:
            path = ".".join(str(p) for p in e.path) or "(top)"
            problem(where, f"Kubernetes {version}: {path}: {e.message}")
        except SchemaNotFoundError as e:
            problem(where, e.message)


def validate_kustomization(doc):
    listed = doc.get("resources", [])
    expected = sorted(
        p.name
        for p in MANIFESTS.glob("*.yaml")
        if p.name not in (KUSTOMIZATION, SECRET_TEMPLATE)
    )
    if sorted(listed) != expected:
        problem(KUSTOMIZATION, f"resources {sorted(listed)} should be {expected}")
    unknown = set(doc) - {"apiVersion", "kind", "resources", "images"}
    if unknown:
        problem(KUSTOMIZATION, f"fields this check does not know: {sorted(unknown)}")


def dockerfile_user():
    match = re.search(r"^USER\s+(\d+)(?::(\d+))?\s*$", (ROOT / "Dockerfile").read_text(), re.M)
    if not match:
        problem("Dockerfile", "no numeric USER uid[:gid] line")
        return None, None
    return int(match[1]), int(match[2]) if match[2] else None


def port_of(bind):
    return int(bind.rsplit(":", 1)[1])


# Settings that hold secrets (docs/reference.md, section 9.2;
# docs/providers.md): they come from the Secret, never from the ConfigMap.
SECRET_PROVIDER_KEYS = {
    "token",
    "callback_secret",
    "callback_token",
    "auth_token",
    "api_secret",
    "signature_secret",
}
# api_key is a secret for these kinds; Vonage's api_key is its account id.
SECRET_API_KEY_KINDS = {"africastalking", "infobip"}


def check_no_secrets(file, settings):
    for section, key in (("amqp", "url"), ("redis", "url")):
        if key in settings.get(section, {}):
            problem(file, f"{section}.{key} holds a password: set it from the Secret")
    if settings.get("http", {}).get("api_keys"):
        problem(file, "http.api_keys are secrets: set them from the Secret")
    for name in ("token", "callback_secret"):
        if settings.get("provider", {}).get(name):
            problem(file, f"provider.{name} is a secret: set it from the Secret")
    for instance, fields in settings.get("providers", {}).items():
        kind = fields.get("kind", instance)
        for key, value in fields.items():
            secret = key in SECRET_PROVIDER_KEYS or (
                key == "api_key" and kind in SECRET_API_KEY_KINDS
            )
            if secret and value:
                problem(file, f"providers.{instance}.{key} is a secret: set it from the Secret")


def one(docs, kind, file=None):
    found = [(f, d) for f, d in docs if d["kind"] == kind and (file is None or f == file)]
    if len(found) != 1:
        problem(file or "deploy/kubernetes", f"expected one {kind}, found {len(found)}")
        return None, {}
    return found[0]


def check_together(docs):
    _, deployment = one(docs, "Deployment")
    _, service = one(docs, "Service")
    _, pdb = one(docs, "PodDisruptionBudget")
    _, configmap = one(docs, "ConfigMap")
    _, secret = one(docs, "Secret", SECRET_TEMPLATE)
    _, scaled = one(docs, "ScaledObject")
    trigger_auths = {d["metadata"]["name"]: d for _, d in docs if d["kind"] == "TriggerAuthentication"}
    if not deployment:
        return

    where = "deployment.yaml"
    pod_meta = deployment["spec"]["template"]["metadata"]
    pod = deployment["spec"]["template"]["spec"]
    labels = pod_meta.get("labels", {})
    containers = pod["containers"]
    if len(containers) != 1:
        problem(where, "expected one container")
        return
    container = containers[0]
    env = {e["name"]: e for e in container.get("env", [])}
    ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}

    # Selectors: the Deployment's own, the Service's and the PDB's.
    for name, selector in (
        ("Deployment", deployment["spec"]["selector"].get("matchLabels", {})),
        ("Service", service.get("spec", {}).get("selector", {})),
        ("PodDisruptionBudget", pdb.get("spec", {}).get("selector", {}).get("matchLabels", {})),
    ):
        if not selector or any(labels.get(k) != v for k, v in selector.items()):
            problem(where, f"the {name}'s selector {selector} does not select the pod labels {labels}")
    for port in service.get("spec", {}).get("ports", []):
        if port.get("targetPort") not in ports:
            problem("service.yaml", f"targetPort {port.get('targetPort')!r} is no container port name")

    # The user the image runs as, and the hardening.
    uid, gid = dockerfile_user()
    pod_sc = pod.get("securityContext", {})
    sc = container.get("securityContext", {})
    if pod_sc.get("runAsNonRoot") is not True:
        problem(where, "securityContext.runAsNonRoot must be true")
    if uid is not None and pod_sc.get("runAsUser") != uid:
        problem(where, f"runAsUser {pod_sc.get('runAsUser')} is not the Dockerfile's USER {uid}")
    if gid is not None and pod_sc.get("runAsGroup") != gid:
        problem(where, f"runAsGroup {pod_sc.get('runAsGroup')} is not the Dockerfile's group {gid}")
    seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
    if seccomp.get("type") != "RuntimeDefault":
        problem(where, "seccompProfile.type must be RuntimeDefault")
    if sc.get("allowPrivilegeEscalation") is not False:
        problem(where, "allowPrivilegeEscalation must be false")
    if sc.get("readOnlyRootFilesystem") is not True:
        problem(where, "readOnlyRootFilesystem must be true")
    if "ALL" not in sc.get("capabilities", {}).get("drop", []):
        problem(where, "capabilities.drop must hold ALL")
    for mount in container.get("volumeMounts", []):
        if mount.get("readOnly") is not True:
            problem(where, f"volume {mount['name']} is writable, and the service writes no file")

    # The settings file: mounted from the ConfigMap where --config says.
    args = container.get("args", [])
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    settings = {}
    if len(args) != 3 or args[0] != "--config" or args[2] != "run":
        problem(where, f"args {args} should be --config PATH run")
    else:
        config_path = pathlib.PurePosixPath(args[1])
        mounted = [
            m for m in container.get("volumeMounts", [])
            if pathlib.PurePosixPath(m["mountPath"]) == config_path.parent
        ]
        cm_name = mounted and volumes.get(mounted[0]["name"], {}).get("configMap", {}).get("name")
        if cm_name != configmap.get("metadata", {}).get("name"):
            problem(where, f"{config_path.parent} is not where the ConfigMap is mounted")
        text = configmap.get("data", {}).get(config_path.name)
        if text is None:
            problem("configmap.yaml", f"no key {config_path.name}, the file --config names")
        else:
            try:
                settings = tomllib.loads(text)
            except tomllib.TOMLDecodeError as e:
                problem("configmap.yaml", f"{config_path.name} is not TOML: {e}")
            check_no_secrets("configmap.yaml", settings)
    defaults = tomllib.loads((ROOT / "config" / "default.toml").read_text())

    def setting(section, key):
        return settings.get(section, {}).get(key, defaults[section][key])

    # Ports: the binds the pod listens on are its container ports.
    for var, port_name in (("SMS__HTTP__BIND", "http"), ("SMS__GRPC__BIND", "grpc")):
        value = env.get(var, {}).get("value")
        if value is None or port_name not in ports or port_of(value) != ports[port_name]:
            problem(where, f"{var} ({value}) should listen on the container port {port_name!r}")
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = container.get(probe, {}).get("httpGet", {})
        if get.get("path") != path or get.get("port") != "http":
            problem(where, f"{probe} should GET {path} on port http")
    annotations = pod_meta.get("annotations", {})
    if annotations.get("prometheus.io/port") != str(ports.get("http")):
        problem(where, "the prometheus.io/port annotation is not the http port")
    resources = container.get("resources", {})
    for kind in ("requests", "limits"):
        if "memory" not in resources.get(kind, {}):
            problem(where, f"resources.{kind}.memory is not set")

    # The drain fits in the grace period (docs/reference.md, section 5.12).
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    sleep = pre_stop.get("exec", {}).get("command", [])
    pre_stop_secs = int(sleep[1]) if sleep[:1] == ["sleep"] and len(sleep) == 2 else 0
    drain = pre_stop_secs + setting("processing", "shutdown_grace_ms") / 1000 + 30 + 5
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if grace <= drain:
        problem(where, f"terminationGracePeriodSeconds {grace} is not above the drain, {drain:g} s")

    # Secrets: every reference names a key of the template, and every key
    # of the template is used.
    secret_name = secret.get("metadata", {}).get("name")
    secret_keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    used = set()
    for e in container.get("env", []):
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            used.add(ref["key"])
            if ref["name"] != secret_name or ref["key"] not in secret_keys:
                problem(where, f"{e['name']} names {ref['name']}/{ref['key']}, not in {SECRET_TEMPLATE}")
    for name, auth in trigger_auths.items():
        for ref in auth["spec"].get("secretTargetRef", []):
            used.add(ref["key"])
            if ref["name"] != secret_name or ref["key"] not in secret_keys:
                problem("keda.yaml", f"{name} names {ref['name']}/{ref['key']}, not in {SECRET_TEMPLATE}")
    for key in sorted(secret_keys - used):
        problem(SECRET_TEMPLATE, f"key {key} is used by nothing")

    # Autoscaling: the Deployment, on the command queue and its high queue.
    if scaled:
        spec = scaled["spec"]
        target = spec["scaleTargetRef"]
        if target.get("kind", "Deployment") != "Deployment" or target["name"] != deployment["metadata"]["name"]:
            problem("keda.yaml", f"scaleTargetRef {target} is not the Deployment")
        queue = setting("amqp", "command_queue")
        queues = sorted(t.get("metadata", {}).get("queueName", "") for t in spec["triggers"])
        if queues != sorted([queue, f"{queue}.high"]):
            problem("keda.yaml", f"triggers on {queues}, not on {queue} and {queue}.high")
        for trigger in spec["triggers"]:
            ref = trigger.get("authenticationRef", {}).get("name")
            if ref not in trigger_auths:
                problem("keda.yaml", f"authenticationRef {ref} is no TriggerAuthentication here")


def main(versions):
    if not versions:
        sys.exit("usage: check_kubernetes.py KUBERNETES_VERSION...")
    docs = load_manifests()
    schemas = keda_schemas()
    for file, doc in docs:
        if doc["apiVersion"].startswith("kustomize.config.k8s.io/"):
            validate_kustomization(doc)
        elif doc["apiVersion"].split("/")[0] == "keda.sh":
            validate_keda(file, doc, schemas)
        else:
            validate_kubernetes(file, doc, versions)
    if not problems:
        check_together(docs)
    for line in problems:
        print(f"check-kubernetes: {line}", file=sys.stderr)
    if problems:
        print(f"check-kubernetes: FAILED, {len(problems)} problem(s)", file=sys.stderr)
        sys.exit(1)
    files = sorted({f for f, _ in docs})
    print(
        f"check-kubernetes: {len(docs)} manifests in {len(files)} files valid against "
        f"Kubernetes {', '.join(versions)} and the CRDs of {KEDA_CRDS.name}; "
        "names, ports, probes, user, drain time and secrets agree"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
