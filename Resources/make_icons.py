"""Draw the extension and module icons (128x128 PNG) with matplotlib: ``python Resources/make_icons.py``."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _figure():
    fig = plt.figure(figsize=(1.28, 1.28), dpi=100)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.axis("off")
    return fig, ax


def extension_icon(path: Path) -> None:
    """A brain-like ellipse filled with a perfusion-map gradient and a bolus curve."""
    fig, ax = _figure()
    y, x = np.mgrid[0:1:128j, 0:1:128j]
    inside = ((x - 0.5) / 0.42) ** 2 + ((y - 0.52) / 0.36) ** 2 <= 1
    field = np.exp(-(((x - 0.35) ** 2 + (y - 0.6) ** 2) / 0.05)) + 0.6 * np.exp(-(((x - 0.68) ** 2 + (y - 0.4) ** 2) / 0.03))
    ax.imshow(np.where(inside, field, np.nan), extent=(0, 1, 0, 1), origin="lower", cmap="jet", vmin=0, vmax=1.1)
    t = np.linspace(0.0, 1.0, 200)
    x_curve = np.clip((t - 0.2) / 0.15, 0, None)
    bolus = x_curve ** 3 * np.exp(3 * (1 - x_curve))  # gamma variate, peak 1 at t = 0.35
    ax.plot(0.12 + 0.76 * t, 0.2 + 0.45 * bolus, color="white", lw=3)
    fig.savefig(path, transparent=True)
    plt.close(fig)


def dsc_icon(path: Path) -> None:
    """The signal drop of a DSC bolus over a CBF-coloured square."""
    fig, ax = _figure()
    y, x = np.mgrid[0:1:64j, 0:1:64j]
    ax.imshow(np.sin(3 * x) * np.cos(2 * y), extent=(0.08, 0.92, 0.08, 0.92), origin="lower", cmap="jet", alpha=0.85)
    t = np.linspace(0, 1, 200)
    signal = 0.8 - 0.55 * np.clip((t - 0.3) / 0.12, 0, None) ** 3 * np.exp(3 * (1 - np.clip((t - 0.3) / 0.12, 0, None))) / 1.0
    ax.plot(0.08 + 0.84 * t, np.clip(signal, 0.12, 0.9), color="white", lw=3)
    fig.savefig(path, transparent=True)
    plt.close(fig)


if __name__ == "__main__":
    extension_icon(ROOT / "Resources" / "Icons" / "PerfusionAI.png")
    dsc_icon(ROOT / "DSCDeconvolution" / "Resources" / "Icons" / "DSCDeconvolution.png")
