"""A configured experiment, run into a run directory: what `mtl run` and each phase command do.

`experiment_config` builds a run's config and checks it: a preset with overrides for a new run, or
the config a run directory saved for a resumed one. `run_experiment` then holds the run directory
(one process at a time, `run.lock_run_dir`), writes its `config.yaml` and runs the phases in order.
The `mtl` command and the Python API both call these two, so a run started either way is checked,
locked and recorded alike, and what one writes the other reads (`FewShotClassifier.load`,
`mtl meta-test --resume`, `--init-from`).

    from metatransfer import run_experiment
    run_dir = run_experiment("omniglot-cpu", "runs/omniglot", data_root="data")
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

from metatransfer.config import Config, apply_overrides, check_config, check_shift_pixels, load_config

__all__ = ["PHASES", "experiment_config", "run_experiment"]

PHASES = ("pretrain", "meta-train", "meta-test")
# What rescoring a finished run (`mtl meta-test --resume RUN ...`) may change: how its model is scored, never the model.
_RESCORING = ("meta_test.", "views.flip=", "views.shift_pixels=")


def experiment_config(
    preset: str | Config | None = None,
    overrides: Sequence[str] = (),
    *,
    data_root: str | Path | None = None,
    init_from: str | Path | None = None,
    resume: str | Path | None = None,
    phases: Sequence[str] = PHASES,
    dataset: str | None = None,
    split: str | None = None,
) -> Config:
    """The checked config of an experiment, before anything is written.

    Args:
        preset: a shipped preset name (`mtl presets`), a YAML file or a `Config`; None: the defaults.
        overrides: `section.key=value` texts, applied in order after the preset and `data_root`.
        data_root: where `mtl data prepare` wrote its caches (`data.root`).
        init_from: a run directory or `mtl export` bundle whose backbone starts the run (`transfer.source`).
        resume: a run directory to continue with the config saved there; then `preset`, `init_from`
            and `overrides` must be left out, except that a rescoring (`phases` == ["meta-test"])
            takes meta_test.*, views.flip and views.shift_pixels overrides.
        phases: the phases that will run (what a resumed run may be told to change depends on them).
        dataset: score a resumed run on another prepared dataset (cross-domain).
        split: with `dataset`, the split to score (default test).

    Returns:
        The config: defaults, preset, overrides; checked (`config.check_config`), with the
        `init_from` source and a distillation teacher read and their checksums recorded.

    Raises:
        ValueError: a bad setting, a combination that does not work, an `init_from` of another
            architecture; the message names the key or option.
        FileNotFoundError: a preset file, `init_from` source or resumed run that does not exist.
    """
    from metatransfer.phases.pretrain import resolve_teacher
    from metatransfer.run import read_run_config
    from metatransfer.transfer import resolve_init

    if dataset and resume is None:
        raise ValueError("--dataset scores a trained run on another dataset: give the run with --resume RUN.")
    if resume is not None:
        rescoring = tuple(phases) == ("meta-test",) and all(text.startswith(_RESCORING) for text in overrides)
        if preset is not None or init_from or (overrides and not rescoring):
            raise ValueError("--resume continues a run as it was configured; leave out --preset, --init-from and overrides "
                             "(only `mtl meta-test --resume RUN` takes meta_test.*, views.flip and views.shift_pixels overrides).")
        config = apply_overrides(read_run_config(Path(resume)), overrides)
        check_shift_pixels(config.views.shift_pixels)  # the one model.* override a rescoring takes that can be out of range
        if split:
            config = apply_overrides(config, [f"meta_test.split={split}"])
        return config  # the init_from source is checked again only if pre-training still has to read it
    if split:
        raise ValueError("--split goes with `mtl meta-test --resume RUN --dataset NAME`.")
    overrides = [*([f"data.root={data_root}"] if data_root else []), *overrides, *([f"transfer.source={init_from}"] if init_from else [])]
    config = apply_overrides(preset, overrides) if isinstance(preset, Config) else load_config(preset, overrides)
    check_config(config)
    return resolve_teacher(resolve_init(config))


def run_experiment(
    preset: str | Config | None = None,
    out: str | Path | None = None,
    *,
    data_root: str | Path | None = None,
    overrides: Sequence[str] = (),
    init_from: str | Path | None = None,
    resume: bool = False,
    phases: Sequence[str] = PHASES,
    dataset: str | None = None,
    split: str | None = None,
) -> Path:
    """Run an experiment's phases into the run directory `out`, as `mtl run` (or one phase command) does.

    The config is built and checked first (`experiment_config`), so a bad setting fails before
    anything is written; then the run directory is locked against a second process, its resolved
    `config.yaml` written (a directory holding another configuration is refused), and the phases
    run in order. A phase already complete in `out` is skipped; a killed one continues from its last
    checkpoint with `resume=True`. Under torchrun every rank trains and rank 0 alone writes and meta-tests.

    Args:
        preset: a shipped preset name, a YAML file or a `Config` (None with `resume`).
        out: the run directory.
        data_root, overrides, init_from, dataset, split: as in `experiment_config`.
        resume: continue the run in `out` with the config saved there.
        phases: which of "pretrain", "meta-train", "meta-test" to run, in that order (default all).

    Returns:
        `out`, as a Path: a run directory `FewShotClassifier.load`, `mtl meta-test --resume` and
        `--init-from` accept.

    Raises:
        ValueError, FileNotFoundError: see `experiment_config`; the run directory is in use by
            another process; a phase's data or checkpoint is missing.
    """
    from metatransfer import distributed
    from metatransfer.phases import meta_test, meta_train, pretrain
    from metatransfer.run import lock_run_dir, prepare_run_dir

    if out is None:
        raise ValueError("run_experiment needs the run directory `out`.")
    unknown = [phase for phase in phases if phase not in PHASES]
    if unknown or not phases:
        raise ValueError(f"phases {list(phases)}: give some of {', '.join(PHASES)}.")
    out = Path(out)
    config = experiment_config(preset, overrides, data_root=data_root, init_from=init_from, resume=out if resume else None,
                               phases=phases, dataset=dataset, split=split)
    distributed.init_distributed(config.device)
    held = contextlib.ExitStack()
    try:
        if distributed.is_main():  # one process per run directory; the ranks of one torchrun are one user of it
            held.enter_context(lock_run_dir(out))
        if distributed.is_main() and not resume:  # a resumed run has its config.yaml
            prepare_run_dir(out, config)
        distributed.barrier()
        for phase in (name for name in PHASES if name in phases):
            if phase == "meta-test":
                if distributed.is_main():  # rank 0 alone scores and writes
                    meta_test.run(config, out, dataset=dataset, data_root=data_root)
            else:
                {"pretrain": pretrain, "meta-train": meta_train}[phase].run(config, out)
            distributed.barrier()
    finally:
        held.close()
        distributed.cleanup()
    return out
