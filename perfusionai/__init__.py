"""PerfusionAI: quantitative functional maps from the images clinicians already have.

Domains (each a subpackage over the shared core):

* :mod:`perfusionai.dsc` -- DSC-MRI deconvolution (CBV, CBF, MTT, Tmax, TTP) and learned methods;
* :mod:`perfusionai.prm` -- CT parametric response mapping and its MRI prediction;
* :mod:`perfusionai.ctpm` -- CT to SPECT-like lung perfusion translation;
* :mod:`perfusionai.dr` -- diffusion-relaxation fits and learned protocol prediction.

Shared pieces: :mod:`perfusionai.geometry` (the voxel grid and the image types),
:mod:`perfusionai.io` and :mod:`perfusionai.dicom` (reading and writing them, atomic output
folders), :mod:`perfusionai.errors`, :mod:`perfusionai.jobs` (one serialisable job
specification per verb), :mod:`perfusionai.deps` (optional dependencies by capability),
:mod:`perfusionai.progress`, :mod:`perfusionai.metrics`, :mod:`perfusionai.nn`,
:mod:`perfusionai.phantoms`, :mod:`perfusionai.report`, and :mod:`perfusionai.mrml`
(the only bridge to 3D Slicer). The core never imports Slicer.
"""

__version__ = "0.1.0"
