"""Lung-lobe segmentation of inspiratory VIBE MRI with nnU-Net v2 (Xu et al., Fig. 1 upper part).

* :mod:`.nnunet` -- export of a cohort as an nnU-Net raw dataset, planning/preprocessing/training
  with the ``nnunetv2`` package, model folders and zips (checked: lobe label set, folds),
  prediction with ``nnUNetPredictor`` on the input grid (orientation handled);
* :mod:`.evaluation` -- Dice of the whole lung and of each lobe (lingula mergeable into the
  left upper lobe for 5-lobe references);
* :mod:`.cli` -- ``perfusionai lobes export-nnunet | train | segment | evaluate``.

Lobe labels (ARCHITECTURE.md): 1 right upper, 2 right middle, 3 right lower, 4 left upper,
5 lingula, 6 left lower. ``nnunetv2`` is imported only when a function needs it.
"""
