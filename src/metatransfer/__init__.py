"""Meta-Transfer Learning for few-shot image classification (Sun et al., CVPR 2019; TPAMI 2022).

The Python API: `run_experiment` runs a configured experiment into a run directory as `mtl run`
does (metatransfer/experiment.py); `FewShotClassifier` loads a trained run or an exported bundle
and classifies new images from a few labelled ones (metatransfer/api.py).
"""

__version__ = "0.1.0"

__all__ = ["FewShotClassifier", "run_experiment", "__version__"]


def __getattr__(name: str):
    # Lazy, so `import metatransfer` (and `mtl --help`) does not import torch.
    if name == "FewShotClassifier":
        from metatransfer.api import FewShotClassifier

        return FewShotClassifier
    if name == "run_experiment":
        from metatransfer.experiment import run_experiment

        return run_experiment
    raise AttributeError(f"module 'metatransfer' has no attribute {name!r}")
