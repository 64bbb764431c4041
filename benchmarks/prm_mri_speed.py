"""CPU inference time of the MRI -> PRM network and of nnU-Net lobe segmentation on the paper's
60 x 256 x 256 VIBE grid (2 threads by default).

* PRM network: the default architecture (5x5x5 kernels, channels 8/16/32 and 32/8/3, four inputs),
  batch norm folded, untrained weights (speed does not depend on the weights); timed through
  :func:`perfusionai.prm.mri_predict.predict_prm_mri` (normalisation, crop/pad, network, paste back).
  Target: <= 30 s on 2 cores.
* nnU-Net lobes: nnU-Net v2 plans a 3d_fullres configuration for two 60x256x256 VIBE-like phantom
  volumes (fingerprint, planning, preprocessing; no training), a standard ``nnUNetTrainer`` is initialised from those
  plans and its (untrained) checkpoint saved as ``fold_0/checkpoint_final.pth``, and
  ``nnUNetPredictor`` (1 fold, no mirroring, tile step 0.5) segments a 60x256x256 volume through
  :func:`perfusionai.lobes.nnunet.segment_lobes`. Reported, no target.

Run: ``.venv/bin/python benchmarks/prm_mri_speed.py [--threads 2] [--skip-nnunet]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _phantom_volume(shape=(60, 256, 256), spacing=(1.4, 1.4, 4.0), seed=0):
    """A VIBE-like volume, lung mask and lobes on the paper's grid (from the CT PRM phantom)."""
    from perfusionai.phantoms.prm import make_prm_phantom

    ct = make_prm_phantom(shape, spacing, noise_hu=15.0, deform=False, seed=seed)
    rng = np.random.default_rng(seed)
    tissue_fraction = np.clip((ct.insp.array + 1000.0) / 1000.0, 0.0, 1.1)
    vibe = (100.0 * tissue_fraction + rng.normal(0, 2.0, shape)).astype(np.float32)
    return vibe, ct.lung_labels, ct.lobes, ct.geometry


def bench_prm_network(threads: int, shape=(60, 256, 256)) -> dict:
    import torch

    from perfusionai.nn import build_model
    from perfusionai.prm.mri_network import ARCHITECTURE_NAME, SEQUENCES
    from perfusionai.prm.mri_predict import predict_prm_mri

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(ARCHITECTURE_NAME).eval()
    card = {"inputs": {"sequences": list(SEQUENCES), "trained_with": list(SEQUENCES), "shape": list(shape)},
            "architecture": model.architecture, "trained_on_phantoms": True}
    vibe, lung, _, _ = _phantom_volume(shape)
    vols = {"vibe": vibe, "post_vibe": vibe * 1.2, "irmax": vibe * 0.5, "pbf": vibe * 0.8}
    times = []
    for _ in range(2):
        t = time.perf_counter()
        os.environ["PERFUSIONAI_THREADS"] = str(threads)
        res = predict_prm_mri(vols, lung, model, card, device="cpu")
        times.append(time.perf_counter() - t)
    assert res.labels.shape == tuple(shape)
    return {"first_s": times[0], "second_s": times[1], "threads": threads,
            "parameters": int(sum(p.numel() for p in model.parameters()))}


def bench_nnunet(threads: int, shape=(60, 256, 256)) -> dict:
    import torch

    from perfusionai.io import write_volume
    from perfusionai.lobes.nnunet import (export_nnunet_dataset, nnunet_environment, segment_lobes)

    torch.set_num_threads(threads)
    tmp = Path(tempfile.mkdtemp(prefix="perfusionai-bench-nnunet-"))
    try:
        cases = []
        for n in range(2):
            vibe, _, lobes, geometry = _phantom_volume(shape, seed=n)
            write_volume(vibe, geometry, tmp / f"c{n}_vibe.nii.gz")
            write_volume(lobes, geometry, tmp / f"c{n}_lobes.nii.gz", np.uint8)
            cases.append({"subject": f"c{n}", "image": tmp / f"c{n}_vibe.nii.gz", "lobes": tmp / f"c{n}_lobes.nii.gz",
                          "split": "train"})
        raw = export_nnunet_dataset(cases, tmp / "raw", 502, "BenchLobes")
        pre, res = tmp / "pre", tmp / "res"
        t = time.perf_counter()
        with nnunet_environment(tmp / "raw", pre, res):
            from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints, plan_experiments,
                                                                               preprocess)
            from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

            extract_fingerprints([502], num_processes=1, verbose=False, show_progress_bar=False)
            plans_id = plan_experiments([502])
            # the trainer initialises from the preprocessed folder (no training happens)
            preprocess([502], plans_id, configurations=("3d_fullres",), num_processes=(1,), show_progress_bar=False)
            plans = json.loads((pre / raw.name / f"{plans_id}.json").read_text())
            ds_json = json.loads((raw / "dataset.json").read_text())
            plans["continue_training"] = False
            trainer = nnUNetTrainer(plans=plans, configuration="3d_fullres", fold=0, dataset_json=ds_json,
                                    device=torch.device("cpu"))
            trainer.initialize()
            model_dir = Path(trainer.output_folder_base)
            trainer.save_checkpoint(str(model_dir / "fold_0" / "checkpoint_final.pth"))
            shutil.copy(pre / raw.name / f"{plans_id}.json", model_dir / "plans.json")
            shutil.copy(raw / "dataset.json", model_dir / "dataset.json")
        planning = time.perf_counter() - t
        conf = plans["configurations"]["3d_fullres"]
        times = []
        for _ in range(2):
            os.environ["PERFUSIONAI_THREADS"] = str(threads)
            seg = segment_lobes(tmp / "c0_vibe.nii.gz", model_dir, device="cpu")
            times.append(seg.seconds)
        return {"first_s": times[0], "second_s": times[1], "threads": threads, "planning_s": planning,
                "patch_size": conf["patch_size"], "features": conf["architecture"]["arch_kwargs"]["features_per_stage"]}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-nnunet", action="store_true")
    args = parser.parse_args(argv)
    rows = []
    prm = bench_prm_network(args.threads)
    print(f"PRM network: {prm['first_s']:.1f} s, {prm['second_s']:.1f} s", flush=True)
    rows.append(("PRM network (4 inputs, 5x5x5, BN folded)", "60x256x256", prm["first_s"], prm["second_s"],
                 "<= 30 s", "yes" if prm["second_s"] <= 30 else "NO"))
    if not args.skip_nnunet:
        nn = bench_nnunet(args.threads)
        print(f"nnU-Net lobes: {nn['first_s']:.1f} s, {nn['second_s']:.1f} s (planning {nn['planning_s']:.0f} s)",
              flush=True)
        rows.append((f"nnU-Net lobes 3d_fullres (patch {nn['patch_size']}, 1 fold, no mirroring)", "60x256x256",
                     nn["first_s"], nn["second_s"], "reported", "-"))
    print(f"CPU threads: {args.threads}")
    print(f"| {'step':60s} | grid       | run 1 (s) | run 2 (s) | target   | met |")
    print(f"|{'-' * 62}|------------|-----------|-----------|----------|-----|")
    for name, grid, t1, t2, target, ok in rows:
        print(f"| {name:60s} | {grid} | {t1:9.1f} | {t2:9.1f} | {target:8s} | {ok:3s} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
