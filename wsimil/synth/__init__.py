"""Synthetic H&E-like whole-slide images: a deterministic sample cohort for demos and tests.

Each slide is a pyramidal, tiled, JPEG-compressed BigTIFF that OpenSlide opens as a
``generic-tiff`` slide with several levels and ``openslide.mpp-x``/``mpp-y``. It shows a bright
background with a few irregular pieces of pink, fibrous stroma sprinkled with small purple
nuclei. Positive slides also carry ``n_lesions`` small lesions: densely packed, large, dark,
irregular nuclei on a dark purple background. The ground truth is a lesion mask at a fixed
downsample, saved as an 8-bit PNG (0/255) next to the cohort.

How a slide is made (memory stays bounded for any slide size):

1. :mod:`~wsimil.synth.scene`: a *scene* is computed once per slide on a coarse grid (one
   value per 32 x 32 level-0 px): signed tissue and lesion fields in level-0 pixel units
   (positive inside), eosin and fibre orientation fields and a cellularity field, plus small
   periodic textures. :mod:`~wsimil.synth.sampling` samples it at level-0 positions.
2. :mod:`~wsimil.synth.render`: level 0 is rendered in horizontal bands of 512 x 512 px blocks
   whose pixels are a function of the absolute position only (nuclei from counter-based
   random numbers per grid cell, never cut), so they do not depend on the band size.
3. :mod:`~wsimil.synth.slide_writer`: the bands are streamed as tiles to the shared pyramid
   writer :func:`wsimil.pyramid.write_tiff_pyramid` and reduced on the fly (4 x 4 block mean,
   level by level) into the reduced levels, kept in memory or, above 256 MB, in a raw
   temporary file; these are then written as pages with ``subfiletype=1``.

:mod:`~wsimil.synth.cohort` writes a cohort: slides, lesion-mask PNGs and ``manifest.csv``.

Peak memory is about 200 MB for 10,000 and for 40,000 px square slides.
"""

from __future__ import annotations

from .cohort import SynthSlide, load_lesion_mask, make_cohort
from .scene import BACKGROUND_RGB as BACKGROUND_RGB
from .slide_writer import write_synthetic_slide

__all__ = ["SynthSlide", "write_synthetic_slide", "make_cohort", "load_lesion_mask"]
