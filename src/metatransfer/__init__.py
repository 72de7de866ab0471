"""Meta-Transfer Learning for few-shot image classification (Sun et al., CVPR 2019; TPAMI 2022)."""

__version__ = "0.1.0"
