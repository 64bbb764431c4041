"""Parametric response mapping (PRM) of paired inspiratory/expiratory chest CT.

Public entry points: :func:`perfusionai.prm.pipeline.compute_prm` (the whole pipeline),
:func:`perfusionai.prm.lungmask.segment_lungs`, :func:`perfusionai.prm.classification.classify_prm`,
:func:`perfusionai.prm.stats.prm_statistics`. Submodules are imported lazily so that importing
``perfusionai.prm`` never pulls ANTsPy.
"""
