"""Render the extension's catalogue picture: ``python Resources/make_screenshots.py``.

``Resources/Screenshots/DSCDeconvolution-maps.png`` shows what the DSC Deconvolution module
computes, drawn with matplotlib from the library's own output on the DSC digital phantom (one
slice of CBF, CBV, MTT and Tmax by oSVD, and the AIF). It is a rendering of the results, not a
screenshot of the Slicer panel (no Slicer runs here); replace it by one taken in Slicer when
available (the top-level CMakeLists.txt names it in EXTENSION_SCREENSHOTURLS).
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def dsc_maps_picture(path: Path) -> None:
    from perfusionai.dsc.pipeline import DSCOptions, compute_dsc_maps
    from perfusionai.phantoms.dsc import make_dsc_phantom

    phantom = make_dsc_phantom(shape=(4, 48, 48), snr=80.0, seed=1)
    result = compute_dsc_maps(phantom.signal, phantom.times, DSCOptions(te=phantom.te, method="oSVD"),
                              mask=phantom.brain_mask, aif_mask=phantom.aif_mask)
    k = phantom.signal.shape[0] // 2
    fig, axes = plt.subplots(1, 5, figsize=(12.8, 3.0), dpi=100)
    for ax, (name, unit, cmap) in zip(axes, (("cbf", "mL/100 g/min", "jet"), ("cbv", "mL/100 g", "jet"),
                                             ("mtt", "s", "hot"), ("tmax", "s", "hot"))):
        values = np.where(phantom.brain_mask[k], result.maps[name][k], np.nan)
        shown = ax.imshow(values, cmap=cmap, vmin=0, vmax=np.nanpercentile(values, 99))
        ax.set_title(f"{name.upper()} [{unit}]", fontsize=10)
        ax.axis("off")
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
    axes[-1].plot(result.times, result.aif, color="crimson", label="AIF")
    axes[-1].plot(result.times, result.tissue_curve, color="navy", label="tissue")
    axes[-1].set_xlabel("time (s)")
    axes[-1].set_title("delta R2* [1/s]", fontsize=10)
    axes[-1].legend(fontsize=8)
    fig.suptitle("DSC Deconvolution: perfusion maps of the DSC phantom (oSVD), computed by PerfusionAI", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    dsc_maps_picture(ROOT / "Resources" / "Screenshots" / "DSCDeconvolution-maps.png")
