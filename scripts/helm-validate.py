#!/usr/bin/env python3
"""Validates manifests rendered from helm/pis-worker. Run by scripts/helm-test.sh in its venv.

    helm-validate.py --kube-version 1.30.0 --rules FILE [--expect KIND ...] MANIFEST

- Core kinds: kubernetes-validate's strict schemas (unknown fields are errors) for that Kubernetes
  version. A core kind without a schema there is an error, never a skip.
- ServiceMonitor and PrometheusRule (monitoring.coreos.com/v1, CRDs that kubernetes-validate does
  not know): the strict schemas below, written from the prometheus-operator CRDs for the fields
  this chart renders.
- The chart's own promises: hardened pod, probes, secrets as read-only files, drain-aware grace
  period, selectors that match, PrometheusRule == files/pis-worker.rules.yml.
Prints one line per manifest; exits 1 on any failure.
"""
import argparse
import re
import sys

import jsonschema
import yaml
import kubernetes_validate
from kubernetes_validate.utils import SchemaNotFoundError, ValidationError

SECRET_MOUNT = "/etc/pis-worker/secrets"
FILE_VARS = {
    "PIS_CLIENT_SECRET_FILE", "PIS_STATE_KEY_FILE", "PIS_QWAC_CERT_FILE", "PIS_QWAC_KEY_FILE",
    "PIS_QWAC_P12_FILE", "PIS_QWAC_P12_PASSWORD_FILE", "PIS_QSEAL_KEY_FILE", "PIS_QSEAL_CERT_FILE",
    "PIS_BANK_CA_FILE", "PIS_STATE_KEYS_PREVIOUS_FILE",
}
SECRET_VALUES = {"PIS_CLIENT_SECRET", "PIS_STATE_KEY", "PIS_STATE_KEYS_PREVIOUS", "PIS_SANDBOX_CLIENT_SECRET"}
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DURATION = "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"

STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
METADATA = {
    "type": "object",
    "required": ["name", "namespace"],
    "properties": {
        "name": {"type": "string", "pattern": DNS_LABEL.pattern, "maxLength": 63},
        "namespace": {"type": "string", "pattern": DNS_LABEL.pattern, "maxLength": 63},
        "labels": STRING_MAP,
        "annotations": STRING_MAP,
    },
    "additionalProperties": False,
}
LABEL_SELECTOR = {
    "type": "object",
    "properties": {
        "matchLabels": STRING_MAP,
        "matchExpressions": {"type": "array", "items": {
            "type": "object", "required": ["key", "operator"],
            "properties": {"key": {"type": "string"},
                           "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                           "values": {"type": "array", "items": {"type": "string"}}},
            "additionalProperties": False}},
    },
    "additionalProperties": False,
}
RELABEL = {
    "type": "object",
    "properties": {
        "action": {"enum": ["replace", "Replace", "keep", "Keep", "drop", "Drop", "hashmod", "HashMod",
                            "labelmap", "LabelMap", "labeldrop", "LabelDrop", "labelkeep", "LabelKeep",
                            "lowercase", "Lowercase", "uppercase", "Uppercase", "keepequal", "KeepEqual",
                            "dropequal", "DropEqual"]},
        "modulus": {"type": "integer", "minimum": 0},
        "regex": {"type": "string"},
        "replacement": {"type": "string"},
        "separator": {"type": "string"},
        "sourceLabels": {"type": "array", "items": {"type": "string", "pattern": "^[a-zA-Z_][a-zA-Z0-9_]*$"}},
        "targetLabel": {"type": "string"},
    },
    "additionalProperties": False,
}
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "ServiceMonitor"},
            "metadata": METADATA,
            "spec": {
                "type": "object",
                "required": ["selector", "endpoints"],
                "properties": {
                    "jobLabel": {"type": "string"},
                    "targetLabels": {"type": "array", "items": {"type": "string"}},
                    "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                    "namespaceSelector": {
                        "type": "object",
                        "properties": {"any": {"type": "boolean"},
                                       "matchNames": {"type": "array", "items": {"type": "string"}}},
                        "additionalProperties": False,
                    },
                    "selector": LABEL_SELECTOR,
                    "endpoints": {
                        "type": "array", "minItems": 1,
                        "items": {
                            "type": "object",
                            "properties": {
                                "port": {"type": "string", "minLength": 1},
                                "targetPort": {"type": ["string", "integer"]},
                                "path": {"type": "string", "pattern": "^/"},
                                "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                                "interval": {"type": "string", "pattern": DURATION},
                                "scrapeTimeout": {"type": "string", "pattern": DURATION},
                                "honorLabels": {"type": "boolean"},
                                "honorTimestamps": {"type": "boolean"},
                                "relabelings": {"type": "array", "items": RELABEL},
                                "metricRelabelings": {"type": "array", "items": RELABEL},
                            },
                            "additionalProperties": False,
                        },
                    },
                },
                "additionalProperties": False,
            },
        },
        "additionalProperties": False,
    },
    ("monitoring.coreos.com/v1", "PrometheusRule"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "PrometheusRule"},
            "metadata": METADATA,
            "spec": {
                "type": "object",
                "required": ["groups"],
                "properties": {"groups": {
                    "type": "array", "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["name", "rules"],
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "interval": {"type": "string", "pattern": DURATION},
                            "query_offset": {"type": "string", "pattern": DURATION},
                            "limit": {"type": "integer", "minimum": 0},
                            "labels": STRING_MAP,
                            "partial_response_strategy": {"type": "string"},
                            "rules": {"type": "array", "minItems": 1, "items": {
                                "type": "object",
                                "required": ["expr"],
                                "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                                "properties": {
                                    "alert": {"type": "string", "minLength": 1},
                                    "record": {"type": "string", "pattern": "^[a-zA-Z_:][a-zA-Z0-9_:]*$"},
                                    "expr": {"type": ["string", "integer"], "minLength": 1},
                                    "for": {"type": "string", "pattern": DURATION},
                                    "keep_firing_for": {"type": "string", "pattern": DURATION},
                                    "labels": STRING_MAP,
                                    "annotations": STRING_MAP,
                                },
                                "additionalProperties": False,
                            }},
                        },
                        "additionalProperties": False,
                    },
                }},
                "additionalProperties": False,
            },
        },
        "additionalProperties": False,
    },
}


def selector_matches(selector, labels):
    return all(labels.get(k) == v for k, v in (selector or {}).items())


class Checker:
    def __init__(self, docs, rules_file):
        self.docs = docs
        self.rules_file = rules_file
        self.errors = []

    def fail(self, doc, message):
        where = "%s/%s" % (doc["kind"], doc["metadata"]["name"]) if doc else "manifest"
        self.errors.append("%s: %s" % (where, message))

    def check(self, doc, condition, message):
        if not condition:
            self.fail(doc, message)

    def one(self, kind):
        found = [d for d in self.docs if d["kind"] == kind]
        return found[0] if len(found) == 1 else None

    def chart_promises(self):
        deploy = self.one("Deployment")
        if deploy is None:
            self.fail(None, "exactly one Deployment expected")
            return
        pod = deploy["spec"]["template"]
        spec = pod["spec"]
        pod_labels = pod["metadata"].get("labels", {})
        self.check(deploy, selector_matches(deploy["spec"]["selector"]["matchLabels"], pod_labels),
                   "selector does not match the pod labels")
        self.check(deploy, "checksum/config" in pod["metadata"].get("annotations", {}),
                   "pod template lacks the checksum/config annotation")
        self.check(deploy, spec.get("automountServiceAccountToken") is False,
                   "automountServiceAccountToken must be false")
        psc = spec.get("securityContext", {})
        self.check(deploy, psc.get("runAsNonRoot") is True, "pod runAsNonRoot must be true")
        self.check(deploy, psc.get("seccompProfile", {}).get("type") == "RuntimeDefault",
                   "pod seccompProfile must be RuntimeDefault")
        containers = spec["containers"]
        self.check(deploy, len(containers) == 1, "one container expected")
        c = containers[0]
        sc = c.get("securityContext", {})
        self.check(deploy, sc.get("runAsNonRoot") is True, "container runAsNonRoot must be true")
        self.check(deploy, sc.get("readOnlyRootFilesystem") is True, "readOnlyRootFilesystem must be true")
        self.check(deploy, sc.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation must be false")
        self.check(deploy, "ALL" in sc.get("capabilities", {}).get("drop", []), "capabilities must drop ALL")
        self.check(deploy, not sc.get("capabilities", {}).get("add"), "no capabilities may be added")
        self.check(deploy, sc.get("seccompProfile", {}).get("type") == "RuntimeDefault",
                   "container seccompProfile must be RuntimeDefault")
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        self.check(deploy, "http" in ports, "container port `http` missing")
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            get = c.get(probe, {}).get("httpGet", {})
            self.check(deploy, get.get("path") == path and get.get("port") == "http",
                       "%s must GET %s on port http" % (probe, path))
        env = {e["name"]: e for e in c.get("env", [])}
        mounts = {m["name"]: m for m in c.get("volumeMounts", [])}
        secret_mount = mounts.get("secrets")
        self.check(deploy, secret_mount is not None and secret_mount.get("readOnly") is True,
                   "the secrets volume must be mounted read-only")
        mount_path = secret_mount["mountPath"] if secret_mount else SECRET_MOUNT
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        items = {i["path"] for i in volumes.get("secrets", {}).get("secret", {}).get("items", [])}
        for name in ("PIS_CLIENT_SECRET_FILE", "PIS_STATE_KEY_FILE"):
            self.check(deploy, name in env, "%s is not set" % name)
        for name, e in env.items():
            if name in SECRET_VALUES:
                self.fail(deploy, "%s carries a secret in the environment; use the *_FILE variable" % name)
            if name in FILE_VARS:
                value = e.get("value", "")
                self.check(deploy, value.startswith(mount_path + "/") and value[len(mount_path) + 1:] in items,
                           "%s=%s is not a file of the mounted secret" % (name, value))
        # Resolve the ConfigMap the container loads, for the drain bound.
        config = {}
        for source in c.get("envFrom", []):
            ref = source.get("configMapRef", {}).get("name")
            for cm in self.docs:
                if cm["kind"] == "ConfigMap" and cm["metadata"]["name"] == ref:
                    config.update(cm.get("data", {}))
        self.check(deploy, "PIS_HTTP_ADDR" in config and config["PIS_HTTP_ADDR"].endswith(":%s" % ports.get("http")),
                   "PIS_HTTP_ADDR does not match the http container port")
        drain_ms = int(config.get("PIS_DRAIN_TIMEOUT_MS", 10000))
        session_ms = int(config.get("PIS_SESSION_TIMEOUT_MS", 30000))
        grace = spec.get("terminationGracePeriodSeconds", 30)
        self.check(deploy, grace > -(-drain_ms // 1000),
                   "terminationGracePeriodSeconds %s does not outlast the %d ms drain" % (grace, drain_ms))
        self.check(deploy, drain_ms < session_ms, "drain %d ms is not below the session timeout" % drain_ms)

        for cm in (d for d in self.docs if d["kind"] == "ConfigMap"):
            for key, value in cm.get("data", {}).items():
                self.check(cm, key not in SECRET_VALUES and key not in FILE_VARS,
                           "%s does not belong in a ConfigMap" % key)
                self.check(cm, isinstance(value, str), "%s is not a string" % key)

        svc = self.one("Service")
        svc_ports = {}
        if svc is None:
            self.fail(None, "exactly one Service expected")
        else:
            self.check(svc, selector_matches(svc["spec"]["selector"], pod_labels),
                       "selector does not match the pods")
            svc_ports = {p["name"]: p for p in svc["spec"]["ports"]}
            self.check(svc, svc_ports.get("http-metrics", {}).get("targetPort") == "http",
                       "port http-metrics must target the container port http")

        sa_name = spec.get("serviceAccountName")
        for sa in (d for d in self.docs if d["kind"] == "ServiceAccount"):
            self.check(sa, sa["metadata"]["name"] == sa_name, "is not the pod's service account")
            self.check(sa, sa.get("automountServiceAccountToken") is False,
                       "automountServiceAccountToken must be false")
        for pdb in (d for d in self.docs if d["kind"] == "PodDisruptionBudget"):
            self.check(pdb, selector_matches(pdb["spec"]["selector"]["matchLabels"], pod_labels),
                       "selector does not match the pods")
        for hpa in (d for d in self.docs if d["kind"] == "HorizontalPodAutoscaler"):
            target = hpa["spec"]["scaleTargetRef"]
            self.check(hpa, target["kind"] == "Deployment" and target["name"] == deploy["metadata"]["name"],
                       "scaleTargetRef is not the Deployment")
            self.check(deploy, "replicas" not in deploy["spec"],
                       "replicas must be left to the HorizontalPodAutoscaler")
        for np in (d for d in self.docs if d["kind"] == "NetworkPolicy"):
            self.check(np, selector_matches(np["spec"]["podSelector"].get("matchLabels"), pod_labels),
                       "podSelector does not match the pods")
            self.check(np, set(np["spec"].get("policyTypes", [])) == {"Ingress", "Egress"},
                       "policyTypes must be Ingress and Egress")
        for sm in (d for d in self.docs if d["kind"] == "ServiceMonitor"):
            if svc is not None:
                self.check(sm, selector_matches(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"]),
                           "selector does not match the Service")
                self.check(sm, svc["metadata"]["namespace"] in sm["spec"].get("namespaceSelector", {}).get("matchNames", []),
                           "namespaceSelector does not include the Service's namespace")
            for ep in sm["spec"]["endpoints"]:
                self.check(sm, ep.get("port") in svc_ports, "endpoint port %s is not a Service port" % ep.get("port"))
                self.check(sm, ep.get("path") == "/metrics", "endpoint path must be /metrics")
        for rule in (d for d in self.docs if d["kind"] == "PrometheusRule"):
            with open(self.rules_file) as f:
                expected = yaml.safe_load(f)["groups"]
            self.check(rule, rule["spec"]["groups"] == expected,
                       "spec.groups differs from %s" % self.rules_file)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--kube-version", required=True)
    parser.add_argument("--rules", required=True, help="files/pis-worker.rules.yml")
    parser.add_argument("--expect", action="append", default=[], help="a kind that must be rendered")
    parser.add_argument("manifest")
    args = parser.parse_args()

    with open(args.manifest) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    checker = Checker(docs, args.rules)
    core, crds = [], []
    for doc in docs:
        for field in ("apiVersion", "kind", "metadata"):
            if field not in doc:
                checker.fail(None, "a document lacks %s" % field)
                return report(args, checker, core, crds)
        key = (doc["apiVersion"], doc["kind"])
        name = doc["metadata"].get("name", "")
        checker.check(doc, DNS_LABEL.match(name) and len(name) <= 63, "name is not a DNS label")
        if key in CRD_SCHEMAS:
            crds.append(doc["kind"])
            for error in jsonschema.Draft7Validator(CRD_SCHEMAS[key]).iter_errors(doc):
                checker.fail(doc, "%s: %s" % (".".join(str(p) for p in error.absolute_path), error.message))
            continue
        core.append(doc["kind"])
        try:
            kubernetes_validate.validate(doc, args.kube_version, strict=True)
        except ValidationError as error:
            checker.fail(doc, "%s: %s" % (".".join(str(p) for p in error.path), error.message))
        except SchemaNotFoundError as error:
            checker.fail(doc, "no Kubernetes %s schema: %s" % (args.kube_version, error.message))
    kinds = {d["kind"] for d in docs}
    for kind in args.expect:
        checker.check(None, kind in kinds, "expected a %s" % kind)
    checker.chart_promises()
    return report(args, checker, core, crds)


def report(args, checker, core, crds):
    for error in checker.errors:
        print("  ERROR %s" % error)
    status = "ok" if not checker.errors else "FAILED (%d errors)" % len(checker.errors)
    print("  %s: %d objects; strict Kubernetes %s schemas: %s; CRD schemas: %s -> %s" % (
        args.manifest.rsplit("/", 1)[-1], len(core) + len(crds), args.kube_version,
        ", ".join(core) or "none", ", ".join(crds) or "none", status))
    return 1 if checker.errors else 0


if __name__ == "__main__":
    sys.exit(main())
