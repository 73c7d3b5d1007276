"""wsimil: weakly supervised whole-slide image classification with attention-based deep MIL.

Stages (each a module named like its command): :mod:`wsimil.synth`, :mod:`wsimil.tile`,
:mod:`wsimil.embed`, :mod:`wsimil.train`, :mod:`wsimil.heatmap`, and :mod:`wsimil.demo` which
runs them all on a generated sample cohort.
"""

__version__ = "0.1.0"
