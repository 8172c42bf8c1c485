"""Kubernetes manifests of vlit (cluster/), checked offline.

`check_files(paths)` validates KubeRay custom resources against the KubeRay v1.7.0 CRDs
(strictly, as the API server does), a few core kinds against the same Kubernetes schemas
those CRDs embed, KubeRay's own controller rules, and vlit's rules for every manifest:
credentials only through Secret references, containers as non-root. See `kubecheck.check`.

Repository tooling, not part of the vlit package: `vlit cluster check` and `vlit cluster
sync` load it from the checkout (cluster/ on the path), and the tests import it so.
"""
from kubecheck.check import Problem, check_files, sync_serve_config

__all__ = ["Problem", "check_files", "sync_serve_config"]
