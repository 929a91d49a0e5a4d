"""The Kubernetes operator: reconciles ServerlessModel resources into worker pods.

Pure code turns what the operator reads into the shared policies' terms and back into
objects (``records``, ``cluster_state``, ``planning``, ``manifests``, ``consolidation``,
``naming``); the decisions themselves are :mod:`hydraserve.control`'s. The adapters act:
``reconciler`` talks to the API server, ``prefetchers`` to the node prefetchers, and
``handlers`` wires kopf. The ``kopf`` import lives in ``handlers`` only.
"""
