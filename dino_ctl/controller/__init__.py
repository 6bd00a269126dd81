"""The in-cluster controller: reconciles ``DinoExperiment`` custom resources with the same planner as the CLI.

Layers (each imports only the ones above it):

- :mod:`dino_ctl.controller.reconcile` - pure: ``reconcile(spec, observed, status) -> Reconciliation`` (actions, the
  new status, the events to post). No I/O, no clock beyond the ``now`` it is given.
- :mod:`dino_ctl.controller.executor` - applies actions through :mod:`dino_ctl.kube` (the only module that calls the
  Kubernetes API).
- :mod:`dino_ctl.controller.handlers` - thin kopf handlers wiring the two together; ``python -m dino_ctl.controller``.

:mod:`dino_ctl.controller.manifests` generates the chart's data files and ``manifests/``;
:mod:`dino_ctl.controller.validate` validates rendered objects strictly offline.
"""
