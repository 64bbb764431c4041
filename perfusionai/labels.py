"""Names and display colours of every label map PerfusionAI writes.

One table per label map, shared by the core (reports, CSV columns), the
command line and the Slicer modules (segment names and colours), so a class is
called and coloured the same everywhere. Label 0 is always background and is
not listed.

Each table maps ``label value -> LabelInfo(name, short, rgb)`` with ``rgb`` in
0..1 floats (the convention of Slicer colour tables and matplotlib).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class LabelInfo:
    """One class of a label map.

    Attributes
    ----------
    name
        Human-readable name (segment name in Slicer, column title in reports).
    short
        Machine key (JSON keys, file names), lower case without spaces.
    rgb
        Display colour, three floats in 0..1.
    """

    name: str
    short: str
    rgb: tuple[float, float, float]


def _rgb255(r: int, g: int, b: int) -> tuple[float, float, float]:
    return (r / 255.0, g / 255.0, b / 255.0)


#: Parametric response map classes (ARCHITECTURE.md "PRM labels"; Galban 2012 colour convention).
PRM_LABELS: Mapping[int, LabelInfo] = {
    1: LabelInfo("Normal", "normal", _rgb255(0, 176, 0)),
    2: LabelInfo("fSAD", "fsad", _rgb255(255, 255, 0)),
    3: LabelInfo("Emphysema", "emph", _rgb255(255, 0, 0)),
    4: LabelInfo("Uncategorized", "uncategorized", _rgb255(255, 255, 255)),
}

#: Lung lobes (ARCHITECTURE.md "Lobe labels"). Colours are distinct pastel hues per lobe,
#: right lung in warm and left lung in cool/green tones, so left/right mix-ups are visible.
LOBE_LABELS: Mapping[int, LabelInfo] = {
    1: LabelInfo("Right upper lobe", "rul", _rgb255(177, 122, 101)),
    2: LabelInfo("Right middle lobe", "rml", _rgb255(111, 184, 210)),
    3: LabelInfo("Right lower lobe", "rll", _rgb255(216, 101, 79)),
    4: LabelInfo("Left upper lobe", "lul", _rgb255(128, 174, 128)),
    5: LabelInfo("Lingula", "lingula", _rgb255(183, 156, 220)),
    6: LabelInfo("Left lower lobe", "lll", _rgb255(241, 214, 145)),
}

#: Lung sides of the lung label maps (``lungs.nii.gz``, ``lung_mask.nii.gz``): 1 right, 2 left.
RIGHT_LUNG = 1
LEFT_LUNG = 2

#: The lobe-to-lung grouping (ARCHITECTURE.md "Lobe labels"): lobes 1-3 form the right lung,
#: 4-6 the left. :func:`perfusionai.lung.lungs_from_lobes` applies it; nothing else spells it out.
RIGHT_LOBES: tuple[int, ...] = (1, 2, 3)
LEFT_LOBES: tuple[int, ...] = (4, 5, 6)
LUNG_OF_LOBE: Mapping[int, int] = {**{lobe: RIGHT_LUNG for lobe in RIGHT_LOBES},
                                   **{lobe: LEFT_LUNG for lobe in LEFT_LOBES}}

#: Functional lung classes of the CT-to-perfusion translation (low / high perfusion).
FUNCTIONAL_LUNG_LABELS: Mapping[int, LabelInfo] = {
    1: LabelInfo("Low function", "low", _rgb255(60, 90, 220)),
    2: LabelInfo("High function", "high", _rgb255(250, 150, 30)),
}

