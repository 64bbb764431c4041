"""CPU inference time of the MRI -> PRM network and of nnU-Net lobe segmentation on the paper's
60 x 256 x 256 VIBE grid (2 threads by default).

* PRM network: the default architecture (5x5x5 kernels, channels 8/16/32 and 32/8/3, four inputs),
  batch norm folded, untrained weights (speed does not depend on the weights); timed through
  :func:`perfusionai.prm.mri_predict.predict_prm_mri` (normalisation, crop/pad, network, paste back).
  Target: <= 30 s on 2 cores.
* nnU-Net lobes: :func:`benchmarks.lobes_speed.bench_speed` (nnU-Net v2 plans two 60x256x256 VIBE-like
  phantom volumes, an untrained lobe model file holds 3d_fullres and the CPU configuration 3d_cpu;
  :func:`perfusionai.lobes.segment_lobes`, 1 fold, no mirroring, tile step 0.5). The CPU recipe is
  one run; the old recipe (3d_fullres; its network timed on 2 of its 8 tiles and scaled) is shown in
  both columns. Target: <= 60 s.

Run: ``.venv/bin/python benchmarks/prm_mri_speed.py [--threads 2] [--skip-nnunet]``.
"""

from __future__ import annotations

import argparse
import os
import sys
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
    """nnU-Net lobes through benchmarks/lobes_speed.py (one place): the CPU recipe (3d_cpu) and the
    old one (3d_fullres), untrained lobe model file, 1 fold, no mirroring, tile step 0.5."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from lobes_speed import bench_speed

    r = bench_speed(threads, shape)
    old = r["old"].get("end_to_end", r["old"]["steps_total"])
    return {"first_s": r["cpu"]["end_to_end"][0], "old_s": old[0], "threads": threads,
            "patch_size": r["cpu"]["patch"], "old_patch_size": r["old"]["patch"]}


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
        print(f"nnU-Net lobes: CPU recipe {nn['first_s']:.1f} s, old recipe {nn['old_s']:.1f} s", flush=True)
        rows.append((f"nnU-Net lobes 3d_cpu (patch {nn['patch_size']}, 1 fold, no mirroring)", "60x256x256",
                     nn["first_s"], nn["first_s"], "<= 60 s", "yes" if nn["first_s"] <= 60 else "NO"))
        rows.append((f"nnU-Net lobes 3d_fullres, old (patch {nn['old_patch_size']})", "60x256x256",
                     nn["old_s"], nn["old_s"], "reported", "-"))
    print(f"CPU threads: {args.threads}")
    print(f"| {'step':60s} | grid       | run 1 (s) | run 2 (s) | target   | met |")
    print(f"|{'-' * 62}|------------|-----------|-----------|----------|-----|")
    for name, grid, t1, t2, target, ok in rows:
        print(f"| {name:60s} | {grid} | {t1:9.1f} | {t2:9.1f} | {target:8s} | {ok:3s} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
