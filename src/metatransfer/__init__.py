"""Meta-Transfer Learning for few-shot image classification (Sun et al., CVPR 2019; TPAMI 2022)."""

__version__ = "0.1.0"

__all__ = ["FewShotClassifier", "__version__"]


def __getattr__(name: str):
    # Lazy, so `import metatransfer` (and `mtl --help`) does not import torch.
    if name == "FewShotClassifier":
        from metatransfer.api import FewShotClassifier

        return FewShotClassifier
    raise AttributeError(f"module 'metatransfer' has no attribute {name!r}")
