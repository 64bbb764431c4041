"""DL-CTPM: CT-to-perfusion translation (Ren et al., IJROBP 2021).

* :mod:`.preprocessing` -- lung split, crop + resample to 128x64x64, CT enhancement (Eq. 1),
  SPECT normalisation and discretisation (Eq. 2);
* :mod:`.arnn` -- the 3D attention residual network and the lung-masked BCE (Eq. 3);
* :mod:`.training` -- cohort CSV -> per-lung samples -> :func:`perfusionai.nn.fit`;
* :mod:`.predict` -- both lungs predicted and put back on the CT grid;
* :mod:`.evaluation` -- Spearman R, SSIM, Dice high/low with the pinned definitions;
* :mod:`.cli` -- ``perfusionai ctpm train|predict|evaluate|phantoms``; :mod:`.demo` -- the demo section.
"""
