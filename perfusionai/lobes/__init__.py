"""Lung-lobe segmentation of inspiratory VIBE MRI with nnU-Net v2 (Xu et al., Fig. 1 upper part).

Public API::

    from perfusionai.lobes import LobeSegmentJob, segment_lobes, load_lobe_model
    job = LobeSegmentJob(image="vibe.nii.gz", model="lobe_model", out="lobes_out")
    seg = job.run()            # LobeSegmentation: .lobes [k, j, i] 1-6, .lung_labels, .summary()

* :mod:`.model` -- lobe model files (safetensors + model.json holding nnU-Net's plans,
  dataset.json, configurations and folds; never a pickle), :func:`load_lobe_model`, and
  :func:`import_nnunet_folder` (``lobes import-model``: nnU-Net checkpoints read once with
  PyTorch's restricted unpickler);
* :mod:`.nnunet` -- export of a cohort as an nnU-Net raw dataset, planning/preprocessing/training
  with the ``nnunetv2`` package (3d_fullres and the CPU configuration 3d_cpu), prediction with
  ``nnUNetPredictor`` on the input grid (orientation handled);
* :mod:`.job` -- :class:`LobeSegmentJob` (``lobes segment``);
* :mod:`.evaluation` -- Dice of the whole lung and of each lobe (lingula mergeable into the
  left upper lobe for 5-lobe references);
* :mod:`.cli` -- ``perfusionai lobes phantom | export-nnunet | train | import-model | segment | evaluate``.

Lobe labels (ARCHITECTURE.md): 1 right upper, 2 right middle, 3 right lower, 4 left upper,
5 lingula, 6 left lower. ``torch``/``nnunetv2`` are imported only when a function needs them
(the ``[lobes]`` extra).
"""

from .evaluation import evaluate_lobe_files, lobe_dice
from .job import LobeSegmentJob
from .model import LobeModel, import_nnunet_folder, load_lobe_model
from .nnunet import LobeSegmentation, NNUNetTrainingConfig, export_nnunet_dataset, segment_lobes, train_nnunet

__all__ = ["LobeModel", "LobeSegmentJob", "LobeSegmentation", "NNUNetTrainingConfig", "evaluate_lobe_files",
           "export_nnunet_dataset", "import_nnunet_folder", "load_lobe_model", "lobe_dice", "segment_lobes",
           "train_nnunet"]
