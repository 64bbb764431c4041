"""nnU-Net lobe inference on CPU: the old recipe against the CPU recipe, where the time goes, and
the accuracy cost (issue 17.2).

* **Speed** on the paper's 60 x 256 x 256 VIBE grid (4 x 1.4 x 1.4 mm): nnU-Net v2 plans the
  dataset (fingerprint + planning of two VIBE-like phantom volumes, no training), the CPU
  configuration ``3d_cpu`` is added (:func:`perfusionai.lobes.nnunet.add_cpu_configuration`), and a
  lobe model file with untrained weights for both configurations is written (speed does not depend
  on the weights). Each recipe runs through :func:`perfusionai.lobes.segment_lobes` and, step by
  step, through the same nnU-Net calls (preprocessing = normalisation + resampling to the
  configuration's spacing; sliding window = the network on every tile; export = resampling the
  logits back and argmax):

  - old recipe: ``3d_fullres``, 1 fold, no mirroring, tile step 0.5 (``--configuration 3d_fullres``);
  - CPU recipe (the CPU default): ``3d_cpu``, 1 fold, no mirroring, tile step 0.5.

  The old recipe's network is timed on 2 of its tiles and scaled to all of them unless
  ``--old-end-to-end``. Tile counts for other tile steps and the mirroring multiplier are computed,
  not timed. Wall and
  CPU seconds are printed: on a shared machine the wall time includes other processes' time, while
  CPU seconds / threads bounds the wall time on an idle one. Target: <= 60 s on 2 cores.
* **Accuracy cost**: both configurations trained briefly on the same small phantom MRI cohort
  (:mod:`perfusionai.phantoms.prm_mri`, 16 x 28 x 32 voxels; trained on phantoms), Dice against
  the phantom truth of the held-out subjects for each recipe.

Run: ``.venv/bin/python benchmarks/lobes_speed.py [--threads 2] [--skip-accuracy] [--epochs 5]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def vibe_like_volume(shape=(60, 256, 256), spacing=(1.4, 1.4, 4.0), seed=0):
    """A VIBE-like volume and its lobes on the paper's grid (from the CT PRM phantom)."""
    from perfusionai.phantoms.prm import make_prm_phantom

    ct = make_prm_phantom(shape, spacing, noise_hu=15.0, deform=False, seed=seed)
    rng = np.random.default_rng(seed)
    tissue_fraction = np.clip((ct.insp.array + 1000.0) / 1000.0, 0.0, 1.1)
    vibe = (100.0 * tissue_fraction + rng.normal(0, 2.0, shape)).astype(np.float32)
    return vibe, ct.lobes, ct.geometry


def untrained_model(tmp: Path, shape=(60, 256, 256)) -> tuple[Path, Path, dict]:
    """Plan nnU-Net for two VIBE-like volumes of ``shape`` and write an untrained lobe model file
    holding 3d_fullres and 3d_cpu. Returns (model path, image path, plans)."""
    import torch

    from perfusionai.io import write_volume
    from perfusionai.lobes.model import build_nnunet_networks, save_lobe_model
    from perfusionai.lobes.nnunet import add_cpu_configuration, export_nnunet_dataset, nnunet_environment

    cases = []
    for n in range(2):
        vibe, lobes, geometry = vibe_like_volume(shape, seed=n)
        write_volume(vibe, geometry, tmp / f"c{n}_vibe.nii.gz")
        write_volume(lobes, geometry, tmp / f"c{n}_lobes.nii.gz", np.uint8)
        cases.append({"subject": f"c{n}", "image": tmp / f"c{n}_vibe.nii.gz", "lobes": tmp / f"c{n}_lobes.nii.gz",
                      "split": "train"})
    raw = export_nnunet_dataset(cases, tmp / "raw", 502, "BenchLobes")
    with nnunet_environment(tmp / "raw", tmp / "pre", tmp / "res"):
        from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments

        extract_fingerprints([502], num_processes=1, verbose=False, show_progress_bar=False)
        plans_id = plan_experiments([502])
    plans = add_cpu_configuration(json.loads((tmp / "pre" / raw.name / f"{plans_id}.json").read_text()))
    dataset_json = json.loads((raw / "dataset.json").read_text())
    torch.manual_seed(0)
    confs = {"3d_fullres": ["0"], "3d_cpu": ["0"]}
    nets = build_nnunet_networks(plans, dataset_json, "nnUNetTrainer", confs)
    for net in nets.values():
        net.apply(net.initialize)                     # nnU-Net's own initialisation (weights do not matter)
    weights = {c: {"0": nets[f"{c}-fold_0"].state_dict()} for c in confs}
    model = save_lobe_model(tmp / "model", plans, dataset_json, weights, "nnUNetTrainer",
                            {c: [0, 1, 2] for c in confs}, trained_on_phantoms=True,
                            training_data="untrained weights (speed benchmark)")
    return model, tmp / "c0_vibe.nii.gz", plans


def _clock():
    return time.perf_counter(), time.process_time()


def _since(start):
    return time.perf_counter() - start[0], time.process_time() - start[1]


def profile_recipe(model, image: Path, configuration: str, threads: int, end_to_end: bool = True,
                   tiles_timed: Optional[int] = None) -> dict:
    """Time one recipe step by step through nnU-Net's own calls (those of
    ``predict_single_npy_array``) and, with ``end_to_end``, through :func:`segment_lobes`.
    ``tiles_timed``: time the network on only that many tiles and scale to the tile count (the
    sliding window is the network once per tile plus an accumulation that costs little), so the old
    recipe can be measured on a busy machine."""
    import SimpleITK as sitk
    import torch
    from acvl_utils.cropping_and_padding.padding import pad_nd_image
    from nnunetv2.inference.data_iterators import PreprocessAdapterFromNpy
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

    from perfusionai.io import read_volume, to_sitk
    from perfusionai.lobes import segment_lobes
    from perfusionai.lobes.nnunet import _reorient

    out = {"configuration": configuration}
    if end_to_end:
        start = _clock()
        seg = segment_lobes(image, model, device="cpu", configuration=configuration, threads=threads)
        out["end_to_end"] = _since(start)
        out["lobes_found"] = int(len(np.unique(seg.lobes)))
    torch.set_num_threads(threads)
    predictor = model.predictor(configuration, ("0",), torch.device("cpu"))
    vol = read_volume(image)
    img = _reorient(to_sitk(np.asarray(vol.array, np.float32), vol.geometry), model.orientation)
    arr = sitk.GetArrayFromImage(img)[None].astype(np.float32)
    props = {"spacing": list(img.GetSpacing())[::-1]}
    steps = {}
    t = _clock()
    ppa = PreprocessAdapterFromNpy([arr], [None], [props], [None], predictor.plans_manager, predictor.dataset_json,
                                   predictor.configuration_manager, num_threads_in_multithreaded=1)
    dct = next(ppa)
    steps["preprocessing"] = _since(t)
    data = dct["data"]
    padded, _ = pad_nd_image(data, predictor.configuration_manager.patch_size, "constant", {"value": 0}, True, None)
    tiles = {}
    for step in (1.0, 0.75, 0.5):
        predictor.tile_step_size = step
        slicers = predictor._internal_get_sliding_window_slicers(padded.shape[1:])
        tiles[step] = len(slicers)
    if tiles_timed is None:
        t = _clock()
        logits = predictor.predict_logits_from_preprocessed_data(data).cpu()
        steps["sliding window"] = _since(t)
    else:
        network = predictor.network.eval()
        with torch.inference_mode():
            t = _clock()
            for s in slicers[:tiles_timed]:
                network(padded[s][None].contiguous())
            w, c = _since(t)
        scale = len(slicers) / min(tiles_timed, len(slicers))
        steps[f"sliding window ({min(tiles_timed, len(slicers))} of {len(slicers)} tiles timed, scaled)"] = (
            w * scale, c * scale)
        logits = torch.zeros((predictor.label_manager.num_segmentation_heads, *data.shape[1:]), dtype=torch.half)
    t = _clock()
    convert_predicted_logits_to_segmentation_with_correct_shape(logits, predictor.plans_manager,
                                                                predictor.configuration_manager,
                                                                predictor.label_manager, dct["data_properties"])
    steps["export (resample back, argmax)"] = _since(t)
    out.update({"steps": steps, "tiles": tiles, "network_input": list(data.shape[1:]),
                "patch": list(predictor.configuration_manager.patch_size),
                "spacing": [round(float(v), 2) for v in predictor.configuration_manager.spacing],
                "steps_total": (sum(v[0] for v in steps.values()), sum(v[1] for v in steps.values()))})
    return out


def accuracy(tmp: Path, epochs: int, iterations: int, subjects: int = 8) -> dict:
    """Train 3d_fullres and 3d_cpu briefly on one phantom cohort; Dice of each recipe on the test subjects."""
    from perfusionai.cli import main
    from perfusionai.lobes import load_lobe_model, segment_lobes
    from perfusionai.lobes.evaluation import lobe_dice
    from perfusionai.io import read_volume

    cohort = tmp / "cohort"
    assert main(["lobes", "phantom", "--out", str(cohort), "--subjects", str(subjects), "--progress", "none"]) == 0
    assert main(["lobes", "export-nnunet", "--cohort", str(cohort / "cohort.csv"), "--out", str(tmp / "raw"),
                 "--progress", "none"]) == 0
    dataset = next((tmp / "raw").glob("Dataset*"))
    t = time.perf_counter()
    assert main(["lobes", "train", "--dataset", str(dataset), "--out", str(tmp / "model"), "--device", "cpu",
                 "--epochs", str(epochs), "--iterations-per-epoch", str(iterations), "--patch-size", "16", "28", "32",
                 "--batch-size", "2", "--progress", "none"]) == 0
    train_s = time.perf_counter() - t
    model = load_lobe_model(tmp / "model")
    split = json.loads((dataset / "perfusionai_split.json").read_text())
    out = {"train_s": train_s, "test_subjects": split["test"]}
    for conf in ("3d_fullres", "3d_cpu"):
        whole, mean_lobe = [], []
        for sub in split["test"]:
            seg = segment_lobes(cohort / sub / "vibe.nii.gz", model, device="cpu", configuration=conf)
            d = lobe_dice(seg.lobes, read_volume(cohort / sub / "lobes.nii.gz").array)
            whole.append(d["whole_lung"])
            mean_lobe.append(d["mean_lobe"])
        out[conf] = {"whole_lung": float(np.mean(whole)), "mean_lobe": float(np.mean(mean_lobe))}
    return out


def bench_speed(threads: int, shape=(60, 256, 256), old_tiles_timed: Optional[int] = 2) -> dict:
    """Both recipes on one untrained model of ``shape``; used by benchmarks/prm_mri_speed.py too.
    The CPU recipe runs end to end and step by step; the old recipe step by step, its network on
    ``old_tiles_timed`` tiles scaled to all of them (None: every tile, plus end to end)."""
    from perfusionai.lobes import load_lobe_model

    tmp = Path(tempfile.mkdtemp(prefix="perfusionai-bench-lobes-"))
    try:
        model_path, image, _ = untrained_model(tmp, shape)
        model = load_lobe_model(model_path)
        cpu = profile_recipe(model, image, "3d_cpu", threads)
        old = profile_recipe(model, image, "3d_fullres", threads, end_to_end=old_tiles_timed is None,
                             tiles_timed=old_tiles_timed)
        return {"old": old, "cpu": cpu, "threads": threads}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def print_speed(speed: dict, threads: int) -> None:
    print(f"nnU-Net lobes, 60x256x256 VIBE (4 x 1.4 x 1.4 mm), {threads} CPU threads, 1 fold, no mirroring")
    print(f"| {'recipe':34s} | wall (s) | CPU (s) | tiles @1.0/0.75/0.5 | network input | patch      | spacing (mm)    |")
    print(f"|{'-' * 36}|----------|---------|---------------------|---------------|------------|-----------------|")
    for key, name in (("old", "old: 3d_fullres, step 0.5"), ("cpu", "CPU default: 3d_cpu, step 0.5")):
        r = speed[key]
        wall, cpu = r.get("end_to_end", r["steps_total"])
        tiles = "/".join(str(r["tiles"][s]) for s in (1.0, 0.75, 0.5))
        print(f"| {name:34s} | {wall:8.1f} | {cpu:7.1f} | {tiles:19s} | {'x'.join(map(str, r['network_input'])):13s} "
              f"| {'x'.join(map(str, r['patch'])):10s} | {'x'.join(map(str, r['spacing'])):15s} |")
    for key in ("old", "cpu"):
        r = speed[key]
        how = "end to end" if "end_to_end" in r else "sum of the steps"
        print(f"  {r['configuration']} ({how}) steps, wall/CPU s: " + "; ".join(
            f"{k} {w:.1f}/{c:.1f}" for k, (w, c) in r["steps"].items())
            + "; mirroring would multiply the sliding window by 8 (computed)")
    cpu_wall, cpu_cpu = speed["cpu"]["end_to_end"]
    old_cpu = speed["old"].get("end_to_end", speed["old"]["steps_total"])[1]
    print(f"CPU recipe <= 60 s on {threads} cores: {'yes' if cpu_wall <= 60.0 else 'NO'} (wall {cpu_wall:.1f} s, "
          f"CPU {cpu_cpu:.1f} s = {cpu_cpu / threads:.1f} s per core; old recipe CPU {old_cpu:.1f} s = "
          f"{old_cpu / threads:.1f} s per core; {old_cpu / max(cpu_cpu, 1e-9):.1f}x less CPU)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--skip-accuracy", action="store_true", help="only the speed part")
    parser.add_argument("--skip-speed", action="store_true", help="only the accuracy part")
    parser.add_argument("--epochs", type=int, default=5, help="training epochs per configuration (accuracy part)")
    parser.add_argument("--iterations", type=int, default=6, help="iterations per epoch (accuracy part)")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    parser.add_argument("--old-end-to-end", action="store_true",
                        help="run the old recipe end to end on every tile (about 5 min on 2 idle cores)")
    args = parser.parse_args(argv)
    results = {}
    if not args.skip_speed:
        results["speed"] = bench_speed(args.threads, old_tiles_timed=None if args.old_end_to_end else 2)
        print_speed(results["speed"], args.threads)
    if not args.skip_accuracy:
        tmp = Path(tempfile.mkdtemp(prefix="perfusionai-bench-lobes-acc-"))
        try:
            acc = accuracy(tmp, args.epochs, args.iterations)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        results["accuracy"] = acc
        print(f"Accuracy cost (phantom cohort 16x28x32, {args.epochs} epochs x {args.iterations} iterations per "
              f"configuration, trained in {acc['train_s']:.0f} s; trained on phantoms; test {acc['test_subjects']}):")
        for conf in ("3d_fullres", "3d_cpu"):
            print(f"  {conf:10s} whole-lung Dice {acc[conf]['whole_lung']:.3f}, mean lobe Dice "
                  f"{acc[conf]['mean_lobe']:.3f}")
        print(f"  cost of the CPU recipe: whole lung {acc['3d_fullres']['whole_lung'] - acc['3d_cpu']['whole_lung']:+.3f}, "
              f"mean lobe {acc['3d_fullres']['mean_lobe'] - acc['3d_cpu']['mean_lobe']:+.3f} (fullres minus cpu)")
    if args.json:
        print(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
