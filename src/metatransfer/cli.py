"""The `mtl` command: parses arguments and calls the functions the Python API calls. Nothing else.

    mtl data prepare fc100 --source cifar100_png.zip --root data
    mtl run --preset fc100-cpu --data-root data --out runs/fc100
    mtl run --resume runs/fc100          (after a kill: continue from the last checkpoints)
    torchrun --nproc_per_node=4 -m metatransfer run --preset fc100 --out runs/fc100   (docs/distributed.md)
    mtl pretrain | meta-train | meta-test --preset P --out RUN [section.key=value ...]
    mtl meta-test --resume RUN meta_test.checkpoint=last meta_test.n_way=5,20   (score a run another way)
    mtl predict --model RUN_OR_EXPORT --support SUPPORT_DIR --query QUERY_DIR [--out preds.csv]
    mtl export --model RUN --format safetensors|onnx|torchscript --out DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["main", "build_parser"]


def _add_run_arguments(parser: argparse.ArgumentParser, *, needs_out: bool = True) -> None:
    parser.add_argument("--preset", help="a shipped preset name (see `mtl presets`) or a YAML file")
    parser.add_argument("--data-root", help="where `mtl data prepare` wrote its caches (data.root)")
    parser.add_argument("--out", type=Path, help="the run directory" + (" (required unless --resume RUN_DIR)" if needs_out else ""))
    parser.add_argument("--resume", nargs="?", const=True, type=Path, metavar="RUN_DIR",
                        help="continue the run in RUN_DIR (or --out) from its last checkpoints, with the config saved there")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. meta_train.iterations=500")


def _add_init_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--init-from", type=Path, metavar="RUN_OR_BUNDLE",
                        help="start from this run's pre-trained backbone or `mtl export` bundle (transfer to a new domain; "
                             "same backbone and width; pretrain.epochs=0 keeps it as it is)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtl", description="Meta-Transfer Learning for few-shot image classification.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = commands.add_parser("data", help="prepare and inspect benchmark datasets").add_subparsers(dest="data_command", required=True, metavar="ACTION")
    prepare = data.add_parser("prepare", help="convert a raw dataset into the cache training reads")
    prepare.add_argument("name", help="omniglot, fc100, cifar-fs, miniimagenet, tieredimagenet or folder")
    prepare.add_argument("--source", type=Path, help="archive or folder holding the raw dataset")
    prepare.add_argument("--root", type=Path, required=True, help="folder that receives <name>/ with the cache")
    prepare.add_argument("--download", action="store_true", help="fetch the canonical archive (omniglot, fc100, cifar-fs) and check its md5")
    prepare.add_argument("--split-dir", type=Path, help="split files (Omniglot Vinyals txt, mini/tiered CSVs)")
    prepare.add_argument("--rotations", action="store_true", help="omniglot: add 90/180/270-degree rotations as classes")
    prepare.add_argument("--image-size", type=int, help="side of the stored square images (default per benchmark)")
    prepare.add_argument("--split-ratios", default="0.64,0.16,0.20", help="folder without split dirs: train,val,test class ratios")
    prepare.add_argument("--eval-only", action="store_true",
                         help="folder: every class in test (= --split-ratios 0,0,1), to score a model trained elsewhere")
    prepare.add_argument("--seed", type=int, default=0, help="folder: seed of the class split")
    prepare.add_argument("--name", dest="output_name", help="store under this name instead of the benchmark's")
    info = data.add_parser("info", help="classes and images per split, image size, checksums")
    info.add_argument("name")
    info.add_argument("--root", type=Path, required=True)

    run = commands.add_parser("run", help="all three phases: pre-train, meta-train, meta-test")
    _add_run_arguments(run)
    _add_init_argument(run)
    for name, text in (("pretrain", "phase 1: pre-train the backbone on the base classes"),
                       ("meta-train", "phase 2: meta-transfer (scaling-shifting + base-learner init, hard tasks)")):
        phase = commands.add_parser(name, help=text)
        _add_run_arguments(phase)
        _add_init_argument(phase)
    meta_test = commands.add_parser("meta-test", help="phase 3: few-shot accuracy with 95%% CI on unseen classes")
    _add_run_arguments(meta_test)
    meta_test.add_argument("--dataset", help="score the run on another prepared dataset (cross-domain); results go to "
                                             "results-<dataset>.json in the run, not over results.json")
    meta_test.add_argument("--split", choices=["train", "val", "test"], help="with --dataset: its split to score (default test)")

    ablate = commands.add_parser("ablate", help="the paper's ablation rows (FT/SS, with/without HT) on one pre-trained backbone")
    _add_run_arguments(ablate)
    ablate.add_argument("--shots", default="1,5", help="shots to meta-train and test, one model each (default 1,5)")
    ablate.add_argument("--seeds", default="0,1,2", help="seeds of the meta-trained rows (default 0,1,2)")
    ablate.add_argument("--pretrained", type=Path, help="reuse the pre-trained backbone of this run directory")
    ablate.add_argument("--rows", default="pretrained,ft,ft+ht,ss,ss+ht",
                        help="rows to run, in this order (default: all, pretrained,ft,ft+ht,ss,ss+ht)")
    ablate.add_argument("--report-only", action="store_true", help="only write the table and plots from the runs already in --out")

    commands.add_parser("presets", help="list the shipped presets")
    commands.add_parser("backbones", help="list the registered backbones")
    show = commands.add_parser("config", help="print the resolved config of a preset and overrides")
    _add_run_arguments(show, needs_out=False)

    predict = commands.add_parser("predict", help="classify your own images from a folder of labelled examples")
    predict.add_argument("--model", type=Path, required=True, help="a run directory or an `mtl export` folder")
    predict.add_argument("--support", type=Path, required=True, help="SUPPORT/<class name>/<images>, at least 2 classes")
    predict.add_argument("--query", type=Path, nargs="+", required=True, help="query image files or folders (QUERY/<class>/ folders give an accuracy)")
    predict.add_argument("--out", type=Path, help="write the predictions to a .csv or .json file")
    predict.add_argument("--top-k", type=int, default=3, help="classes listed per query (default 3)")
    predict.add_argument("--data-root", type=Path, help="run directories: where the prepared dataset lives now, if it moved")
    predict.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    predict.add_argument("--checkpoint", help="run directories: a meta_train checkpoint other than best (last, or best-5shot "
                         "from meta_train.val_shots for 5 support images a class)")
    export = commands.add_parser("export", help="write a run's model as a self-contained bundle (SS folded)")
    export.add_argument("--model", type=Path, required=True, help="the run directory")
    export.add_argument("--format", default="safetensors", choices=["safetensors", "onnx", "torchscript"], help="backbone file format")
    export.add_argument("--out", type=Path, required=True, help="the bundle folder to write")
    export.add_argument("--data-root", type=Path, help="where the run's prepared dataset lives now, if it moved")
    export.add_argument("--checkpoint", help="a meta_train checkpoint other than best (last, or best-5shot from meta_train.val_shots)")
    return parser


def _phases_of(command: str) -> tuple[str, ...]:
    from metatransfer.experiment import PHASES

    return (command,) if command in PHASES else PHASES


def _config_for(args: argparse.Namespace):
    """The checked config of the command (`experiment.experiment_config`, as the Python API builds it)."""
    from metatransfer.experiment import experiment_config

    return experiment_config(args.preset, args.overrides, data_root=args.data_root, init_from=getattr(args, "init_from", None),
                             resume=args.out if getattr(args, "resume", None) else None, phases=_phases_of(args.command),
                             dataset=getattr(args, "dataset", None), split=getattr(args, "split", None))


def _resolve_out(args: argparse.Namespace) -> None:
    """`--resume RUN_DIR` names the run directory as `--out RUN_DIR --resume` does."""
    if isinstance(args.resume, Path):
        if args.out is not None and args.out != args.resume:
            raise ValueError(f"--resume {args.resume} and --out {args.out} name two run directories; give one.")
        args.out = args.resume


def _run_phases(args: argparse.Namespace) -> None:
    """`experiment.run_experiment`, the function the Python API calls: check, lock, write config.yaml, run."""
    from metatransfer.experiment import run_experiment

    run_experiment(args.preset, args.out, data_root=args.data_root, overrides=args.overrides, init_from=getattr(args, "init_from", None),
                   resume=bool(args.resume), phases=_phases_of(args.command), dataset=getattr(args, "dataset", None),
                   split=getattr(args, "split", None))


def _ablate(args: argparse.Namespace) -> None:
    import os

    from metatransfer.run import lock_run_dir

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("mtl ablate runs as one process; start it without torchrun (its runs are small).")
    config = _config_for(args)
    with lock_run_dir(args.out):  # its runs and tables are written under --out
        _ablate_locked(args, config)


def _ablate_locked(args: argparse.Namespace, config) -> None:
    from metatransfer import ablate

    shots = [int(part) for part in args.shots.split(",")]
    seeds = [int(part) for part in args.seeds.split(",")]
    if args.report_only:
        records = ablate.collect_records(args.out)
        if not records:
            raise FileNotFoundError(f"{args.out} holds no finished ablation runs (no */results.json).")
        shots = sorted({r["shot"] for r in records})
        ablate.write_records(config, args.out, records)
    else:
        records = ablate.run_ablation(config, args.out, shots=shots, seeds=seeds, pretrained=args.pretrained,
                                      rows=ablate.parse_rows(args.rows))
    width = f" x{config.model.width:g}" if config.model.width != 1 else ""
    title = f"MTL ablation on {config.data.name} ({config.model.backbone}{width}, preset {args.preset or 'default'})"
    print(ablate.write_table(records, args.out / "ablation.md", title=title))
    from metatransfer.plots import plot_ablation, plot_convergence

    try:
        tables = {checkpoint: ablate.summarise(records, checkpoint) for checkpoint in ablate.checkpoints_of(records)}
        plot_ablation(tables, list(ablate.ROWS), args.out / "ablation.png", title=title)
        for shot in shots:
            curves = ablate.convergence_curves(records, shot)
            plot_convergence(curves, args.out / f"convergence-{shot}shot.png", title=f"{config.data.name}, 5-way {shot}-shot: validation during meta-training")
    except ImportError as error:
        print(f"mtl: no plots: {error}", file=sys.stderr)
        return
    print(f"wrote {args.out / 'ablation.md'}, ablation.png and convergence-*shot.png")


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse, accepting overrides on both sides of options (`mtl run X=1 --out R Y=2`).

    argparse fills a `nargs="*"` positional from one run of words only, so overrides after an option
    would be "unrecognized"; they come back as extras here and are appended in the order typed.
    """
    args, extras = parser.parse_known_args(argv)
    stray = [word for word in extras if word.startswith("-") or "=" not in word or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extras:
        args.overrides = [*args.overrides, *extras]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = _parse(parser, argv)
    if hasattr(args, "resume") and args.out is None and (args.resume is True or (args.resume is None and args.command != "config")):
        parser.error("the following arguments are required: --out (or --resume RUN_DIR)")
    try:
        if hasattr(args, "resume"):
            _resolve_out(args)
        if args.command == "data":
            if args.data_command == "prepare":
                from metatransfer.data.prepare import prepare_dataset

                ratios = (0.0, 0.0, 1.0) if args.eval_only else tuple(float(part) for part in args.split_ratios.split(","))
                prepare_dataset(
                    args.name, args.source, args.root, download=args.download, split_dir=args.split_dir,
                    rotations=args.rotations, image_size=args.image_size, split_ratios=ratios, seed=args.seed,
                    output_name=args.output_name,
                )
            else:
                from metatransfer.data.cache import describe

                print(describe(args.root, args.name))
        elif args.command in ("run", "pretrain", "meta-train", "meta-test"):
            _run_phases(args)
        elif args.command == "ablate":
            _ablate(args)
        elif args.command == "presets":
            from metatransfer.config import list_presets

            print("\n".join(list_presets()))
        elif args.command == "backbones":
            from metatransfer.models.backbones import list_backbones

            print("\n".join(list_backbones()))
        elif args.command == "config":
            import yaml

            from metatransfer.config import config_to_dict

            print(yaml.safe_dump(config_to_dict(_config_for(args)), sort_keys=False), end="")
        elif args.command == "predict":
            from metatransfer.predict import predict_folders

            predict_folders(args.model, args.support, args.query, out=args.out, top_k=args.top_k, data_root=args.data_root, device=args.device,
                            checkpoint=args.checkpoint)
        elif args.command == "export":
            from metatransfer.export import export_run

            export_run(args.model, args.out, args.format, data_root=args.data_root, checkpoint=args.checkpoint)
    except (ValueError, OSError, FloatingPointError) as error:  # OSError: disk full, no permission, missing file
        print(f"mtl: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mtl: interrupted; rerun with --resume to continue from the last checkpoint.", file=sys.stderr)
        return 130
    return 0

