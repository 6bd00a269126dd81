"""Dataset curation: embed, dedup, retrieve, balance, write MDS (DINOv2 appendix A; Vo et al. 2024).

Entry points: ``dino-ctl curate SPEC.yaml [--ranks N]`` / ``python -m curation SPEC.yaml`` (:mod:`curation.cli`),
``python -m curation.launch --spec SPEC.yaml`` under torchrun (:mod:`curation.launch`, every step on N ranks),
:func:`curation.pipeline.run_pipeline`, :func:`curation.kube.render_curation_jobs`. The algorithms are usable on
their own arrays: :func:`curation.dedup.deduplicate`, :mod:`curation.retrieve`, :mod:`curation.balance`.

Importing the package is free: submodules load numpy, faiss, streaming or torch only when imported.
"""
