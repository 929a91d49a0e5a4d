"""The Kubernetes operator: reconciles ServerlessModel resources into worker pods.

Pure decisions (``cluster_state``, ``planning``, ``manifests``, ``reconcile``,
``consolidation``) are separate
from the adapters that act (``reconciler`` talks to the API server and the prefetchers,
``handlers`` wires kopf). The ``kopf`` import lives in ``handlers`` only.
"""
