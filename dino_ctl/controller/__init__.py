"""The in-cluster controller: reconciles ``DinoExperiment`` custom resources with the same planner as the CLI.

Layers (each imports only the ones above it):

- :mod:`dino_ctl.controller.status` and :mod:`dino_ctl.controller.core` - pure:
  ``reconcile(experiment, observed, status, now=...) -> Reconciliation`` (the planner's actions, the new status, the
  events to post, the restarts counted). No I/O; the clock is an argument.
- :mod:`dino_ctl.controller.executor` - reads the cluster and applies actions through :mod:`dino_ctl.kube` (the only
  module that calls the Kubernetes API) with the CLI's executor, making the resource the owner of its children.
- :mod:`dino_ctl.controller.handlers` - the :class:`~dino_ctl.controller.handlers.Controller` and thin kopf handlers;
  :mod:`dino_ctl.controller.metrics` - its Prometheus metrics; ``python -m dino_ctl.controller`` runs it.

:mod:`dino_ctl.controller.manifests` generates the chart's data files and ``manifests/``;
:mod:`dino_ctl.controller.validate` validates rendered objects strictly offline.
"""
