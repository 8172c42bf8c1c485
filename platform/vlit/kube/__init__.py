"""Kubernetes manifests of vlit (cluster/), checked offline.

`check_files(paths)` validates KubeRay custom resources against the KubeRay v1.7.0 CRDs
(strictly, as the API server does), a few core kinds against the same Kubernetes schemas
those CRDs embed, KubeRay's own controller rules, and vlit's rules for every manifest:
credentials only through Secret references, containers as non-root. See `vlit.kube.check`.
"""
from vlit.kube.check import Problem, check_files, sync_serve_config

__all__ = ["Problem", "check_files", "sync_serve_config"]
