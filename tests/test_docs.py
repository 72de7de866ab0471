"""Every shell command in README.md and docs/*.md works as written.

Commands live in ```bash blocks (a test checks that no other block or indented text holds one). Each
document is walked in order, as a reader would type its commands:

- Every document, without training: each `mtl` command (also under `torchrun -m metatransfer`) is
  parsed by the real argument parser and its config built by the real loader and checks; a resumed
  run goes through `experiment_config`, as the CLI does; `--init-from` must name a run of the same
  backbone and width; every path a command reads must exist, or be written by an earlier command of
  the same document, or be one of the reader's own folders (`USER_FILES`). Benchmark scripts' arguments
  are parsed by their own parsers.
- README.md, run for real on small data: each benchmark's `mtl data prepare` is stood in for by a small
  cache of that name (after checking its source exists), the reader's folders are made, and every
  command that trains gets overrides that shrink its budget: one pre-training epoch, two
  meta-iterations, a few episodes, a quarter of its width (so runs that must match still match).
  Then the README's Python section runs as written, and the run directory it makes is read back
  by `FewShotClassifier.load`, `mtl meta-test --resume` and `--init-from`.
"""

from __future__ import annotations

import argparse
import os
import re
import runpy
import shlex
import shutil
import subprocess
import time
import sys
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from metatransfer.cli import _parse, _phases_of, build_parser, main
from metatransfer.config import Config, check_config, config_to_dict, load_config
from metatransfer.data.cache import SPLITS, load_split, write_cache

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# The reader's own files, which the documents ask for and no command makes.
USER_FILES = {"my_images", "my_support", "my_queries", "other_images", "mini_standard", "mini_by_image", "glyphs"}
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```[ \t]*$", re.M | re.S)
_COMMAND = re.compile(r"^\s*(\$ )?(mtl|\.venv/bin/|python3? |torchrun|srun|pip |bash )")
_ASSIGNMENT = re.compile(r"^[A-Za-z_]\w*=(\$\(.*\)|\S*)\s*$")
_TRAINING = ("run", "pretrain", "meta-train", "meta-test", "ablate")


class _Parsed(Exception):
    """A benchmark script's arguments were parsed; stop before it works."""


def _blocks(path: Path, language: str) -> list[str]:
    return [body for lang, body in _FENCE.findall(path.read_text()) if lang == language]


def _lines(block: str) -> list[str]:
    return [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def _commands(path: Path) -> list[list[str]]:
    """Each command of the document's bash blocks, in order, as words (comments and assignments dropped)."""
    commands = []
    for block in _blocks(path, "bash"):
        for line in _lines(block):
            if _ASSIGNMENT.match(line.strip()):
                continue
            words = shlex.split(line, comments=True)
            if words and words[0] == "export":  # sets the environment only
                continue
            while words and (words[0] == "srun" or re.match(r"^[A-Za-z_]\w*=", words[0])):  # srun CMD, VAR=value CMD
                words = words[1:]
            if words:
                commands.append(words)
    return commands


def _beside_shared(tmp_path: Path, *, with_repository: bool) -> Path:
    """A working folder beside ../shared, as a fresh clone is: no data/ or runs/ until a command makes them.

    With `with_repository`, it also holds the repository's own files (docs/, benchmarks/, ...) as links.
    """
    cwd = tmp_path / "main"
    cwd.mkdir()
    (tmp_path / "shared").symlink_to(REPO.parent / "shared")
    if with_repository:
        for name in ("benchmarks", "docs", "scripts", "src", "tests", "pyproject.toml"):
            (cwd / name).symlink_to(REPO / name)
    return cwd


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: p.name)
def test_shell_commands_sit_in_bash_blocks(path):
    text = _FENCE.sub(lambda match: "" if match.group(1) == "bash" else match.group(0), path.read_text())
    other_blocks = [body for lang, body in _FENCE.findall(text)]
    indented = [line for line in text.splitlines() if line.startswith("    ") and not line.lstrip().startswith(("-", "|"))]
    stray = [line for line in [*indented, *"\n".join(other_blocks).splitlines()] if _COMMAND.match(line)]
    assert not stray, f"commands outside ```bash blocks in {path.name}: {stray}"


class Walk:
    """A document's commands in order: what each reads must exist, what it writes is recorded.

    Args:
        cwd: where the commands run (paths in them are relative to it).
        scratch: a folder of the test's own, for the config.yaml of runs that were only checked.
        execute: run the commands (README) or only parse and check them (every document).
        budget: with `execute`, the overrides that shrink a training command, given its config.
        stand_in: with `execute`, writes a small cache for `mtl data prepare NAME` of a benchmark.
    """

    def __init__(self, cwd: Path, scratch: Path, execute: bool = False, budget=None, stand_in=None) -> None:
        self.cwd, self.scratch, self.execute, self.budget, self.stand_in = cwd, scratch, execute, budget, stand_in
        self.runs: dict[str, Config] = {}  # run directories written so far, with their configs
        self.made: set[str] = set()  # other paths written so far: caches, bundles, outputs

    def _key(self, text: str | Path) -> str:
        return os.path.normpath(str(text))

    def exists(self, text: str | Path) -> bool:
        key = self._key(text)
        written = [*self.made, *self.runs]
        return (key in written or Path(key).parts[0] in USER_FILES or (self.cwd / key).exists()
                or any(key.startswith(made + os.sep) or made.startswith(key + os.sep) for made in written))

    def need(self, text: str | Path | None, what: str, words: list[str]) -> None:
        if text is not None:
            assert self.exists(text), f"{' '.join(words)}: its {what} {text} does not exist at this point"

    def step(self, words: list[str]) -> None:
        if words[0] in ("mtl", ".venv/bin/mtl"):
            self.mtl(words[1:], words)
        elif words[0] == "torchrun":
            start = words.index("-m")
            assert words[start + 1] == "metatransfer", words
            self.mtl(words[start + 2 :], words, execute=False)  # several processes: checked, not run here
        elif words[0] in ("python", "python3", ".venv/bin/python") and words[1:3] == ["-m", "pytest"]:
            assert (REPO / "tests").is_dir()  # this suite itself
        elif words[0] in ("python", "python3", ".venv/bin/python") and words[1].startswith("benchmarks/"):
            self.benchmark(words)
        elif words[:2] == ["bash", "scripts/quickstart.sh"]:
            script = REPO / "scripts" / "quickstart.sh"
            assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
            self.made.update({".venv", "data/omniglot", "runs/omniglot-cpu"})  # what it makes, as it says
        elif words[0] == "pip":
            self.pip(words)
        else:
            pytest.fail(f"a command the docs test does not know: {' '.join(words)}")

    def pip(self, words: list[str]) -> None:
        assert words[1] == "install", words
        for word in words[2:]:
            if word.startswith((".[", "-e")) or word == ".":
                extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
                wanted = re.findall(r"\[([\w,]+)\]", word)
                assert all(extra in extras for group in wanted for extra in group.split(",")), word

    def benchmark(self, words: list[str]) -> None:
        """The script's own parser reads the words; the runs and data it names must exist."""
        script = REPO / words[1]
        assert script.is_file(), words
        parse_args, parsed = argparse.ArgumentParser.parse_args, []

        def parse_only(parser: argparse.ArgumentParser, args=None, namespace=None):
            parsed.append(parse_args(parser, words[2:], namespace))  # exits 2 on a word it does not know
            raise _Parsed

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
            patch.setattr(sys, "argv", [str(script), *words[2:]])
            with pytest.raises(_Parsed):
                runpy.run_path(str(script), run_name="__main__")
        for name, value in vars(parsed[0]).items():
            for item in value if isinstance(value, list) else [value]:
                if name in ("root", "run_dir", "runs", "run_a", "run_b", "run") and isinstance(item, (str, Path)):
                    self.need(item, name, words)

    def mtl(self, argv: list[str], words: list[str], execute: bool | None = None) -> None:
        execute = self.execute if execute is None else execute
        args = _parse(build_parser(), argv)
        command = args.command
        if command == "data" and args.data_command == "prepare":
            if not args.download:
                self.need(args.source, "--source", words)
            self.need(args.split_dir, "--split-dir", words)
            made = Path(args.root) / (args.output_name or args.name)
            if execute and args.name != "folder":
                self.stand_in(self.cwd / made, args.name)
            elif execute:
                assert main(argv) == 0, words
            self.made.add(self._key(made))
            return
        if command == "data":
            self.need(Path(args.root) / args.name, "dataset", words)
            if execute:
                assert main(argv) == 0, words
            return
        if command in ("presets", "backbones"):
            assert not execute or main(argv) == 0
            return
        if command == "predict":
            self.need(args.model, "--model", words)
            for path in [args.support, *args.query]:
                self.need(path, "images", words)
        elif command == "export":
            self.need(args.model, "--model", words)
        else:
            config = self.config(args, words)
            if command == "ablate":
                self.need(args.pretrained, "--pretrained", words)
            if execute and command in _TRAINING:
                argv = [*argv, *(self.budget(config) if not args.resume else ["meta_test.episodes=4"] if command == "meta-test" else [])]
        if execute:
            assert main(argv) == 0, words
        if command == "export" or (command == "predict" and args.out):
            self.made.add(self._key(args.out))
        elif command in _TRAINING and not args.resume:
            earlier = self.runs.setdefault(self._key(args.out), config)
            assert config_to_dict(earlier) == config_to_dict(config), (  # as prepare_run_dir refuses it
                f"{' '.join(words)}: {args.out} holds another configuration, made by an earlier command")

    def config(self, args: argparse.Namespace, words: list[str]) -> Config:
        """The command's config, as the CLI builds it (without reading checkpoints), checked against what it reads."""
        from metatransfer.experiment import experiment_config
        from metatransfer.run import prepare_run_dir

        if args.resume:
            run = self._key(args.resume if isinstance(args.resume, Path) else args.out)
            assert run in self.runs or (self.cwd / run / "config.yaml").is_file(), f"{' '.join(words)}: no run {run} to resume"
            config = self.runs.get(run) or Config()
            shadow = self.scratch / run if not self.execute else None
            if shadow is not None:  # experiment_config reads the run's config.yaml: give it the one recorded
                prepare_run_dir(shadow, config)
            experiment_config(args.preset, args.overrides, init_from=getattr(args, "init_from", None), resume=shadow or self.cwd / run,
                              phases=_phases_of(args.command), dataset=getattr(args, "dataset", None), split=getattr(args, "split", None))
            if getattr(args, "dataset", None):
                self.need(Path(args.data_root or config.data.root) / args.dataset, "--dataset", words)
            return config
        init_from = getattr(args, "init_from", None)
        overrides = [*([f"data.root={args.data_root}"] if args.data_root else []), *args.overrides,
                     *([f"transfer.source={init_from}"] if init_from else [])]
        config = load_config(args.preset, overrides)
        check_config(config)
        if args.command != "config":
            self.need(Path(config.data.root) / config.data.name, "dataset (--data-root, data.name)", words)
        if init_from is not None:
            self.need(init_from, "--init-from", words)
            source = self.runs.get(self._key(init_from))
            if source is not None:
                assert (source.model.backbone, source.model.width) == (config.model.backbone, config.model.width), (
                    f"{' '.join(words)}: --init-from {init_from} is {source.model.backbone} x{source.model.width:g}, "
                    f"this run {config.model.backbone} x{config.model.width:g}")
        if config.pretrain.distill_from:
            self.need(config.pretrain.distill_from, "pretrain.distill_from", words)
        return config


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: p.name)
def test_every_command_parses_and_reads_what_exists_at_its_point_of_the_document(path, shared_data, tmp_path):
    # shared_data: the documents prepare from ../shared/data; without it, as every test on real data, this skips
    walk = Walk(_beside_shared(tmp_path, with_repository=True), tmp_path / "scratch")
    for words in _commands(path):
        walk.step(words)


# The README, run for real ---------------------------------------------------------------------

def _budget(config: Config) -> list[str]:
    """Overrides that make a training command take seconds; the width scales, so matching runs still match."""
    return [f"model.width={config.model.width / 4:g}", f"pretrain.epochs={min(config.pretrain.epochs, 1)}", "pretrain.val_episodes=4",
            "meta_train.iterations=2", "meta_train.val_every=1", "meta_train.val_episodes=4", "meta_train.n_query=5",
            "meta_test.episodes=4", "meta_test.n_query=5", "device=cpu"]


def _subset(source: tuple[Path, str], target: Path, per_split: dict[str, tuple[int, int]]) -> None:
    """A small cache at `target` (ROOT/NAME): the first classes and images of each split of `source`."""
    splits = {}
    for split in SPLITS:
        data = load_split(*source, split)
        n_classes, n_images = per_split[split]
        keep = np.concatenate([np.flatnonzero(data.labels == c)[:n_images] for c in range(n_classes)])
        splits[split] = (np.asarray(data.images[keep]), data.labels[keep], data.class_names[:n_classes])
    write_cache(target.parent, target.name, splits, source_path=source[0] / source[1], source_sha256=None,
                protocol=f"a small stand-in of {target.name} (docs test)", options={})


def _image_folders(cwd: Path, make_images) -> None:
    """The reader's folders the README asks for: images to transfer to, support and query images."""
    make_images(cwd / "my_images", {f"kind{index:02d}": 12 for index in range(30)}, size=40)
    make_images(cwd / "my_support", {"kind00": 3, "kind01": 3}, size=40, seed=1)
    make_images(tmp := cwd / "unlabelled", {"kind00": 2}, size=40, seed=2)
    shutil.move(tmp / "kind00", cwd / "my_queries")  # my_queries/<image>
    tmp.rmdir()
    make_images(cwd / "other_images", {f"other{index}": 10 for index in range(5)}, size=24, mode="L", seed=3)


@pytest.mark.slow
def test_the_readme_runs_as_written_on_small_data(prepared_fc100, prepared_omniglot, make_images, tmp_path, monkeypatch):
    cwd = _beside_shared(tmp_path, with_repository=False)
    _image_folders(cwd, make_images)

    def stand_in(target: Path, name: str) -> None:
        if name == "omniglot":
            _subset(prepared_omniglot, target, {"train": (20, 20), "val": (5, 20), "test": (20, 20)})
        else:  # fc100, cifar-fs: FC100's images stand in for any CIFAR-100 benchmark here
            _subset(prepared_fc100, target, {"train": (60, 8), "val": (20, 8), "test": (20, 10)})

    monkeypatch.chdir(cwd)
    walk = Walk(cwd, tmp_path / "scratch", execute=True, budget=_budget, stand_in=stand_in)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest, and immune to a busy machine
    try:
        for words in _commands(REPO / "README.md"):
            started = time.time()
            walk.step(words)
            print(f"[docs test] {time.time() - started:5.1f} s  {' '.join(words)}")
        assert (cwd / "predictions.csv").is_file() and (cwd / "exported" / "bundle.json").is_file()
        assert (cwd / "runs" / "mine" / "results-other.json").is_file()
        _run_the_python_section(cwd)
    finally:
        torch.set_num_threads(threads)


def _run_the_python_section(cwd: Path) -> None:
    """The README's Python block as written; then FewShotClassifier.load, `mtl meta-test --resume` and `--init-from` read its run."""
    from metatransfer import FewShotClassifier

    (code,) = _blocks(REPO / "README.md", "python")
    namespace: dict[str, Any] = {"__name__": "__readme__"}
    started = time.time()
    exec(compile(code, "README.md (Python)", "exec"), namespace)
    print(f"[docs test] {time.time() - started:5.1f} s  the README's Python section")
    run_dir = Path(namespace["run_dir"])
    assert FewShotClassifier.load(run_dir).info
    assert main(["meta-test", "--resume", str(run_dir), "meta_test.episodes=4", "meta_test.n_way=5"]) == 0
    assert main(["run", "--preset", "omniglot-cpu", "--init-from", str(run_dir), "--data-root", "data", "--out", "runs/from-python",
                 "pretrain.epochs=0", "meta_train.iterations=1", "meta_train.val_episodes=4", "meta_test.episodes=4"]) == 0
    config = yaml.safe_load((cwd / "runs" / "from-python" / "config.yaml").read_text())
    assert config["transfer"]["source"] == str(run_dir.resolve())


def test_the_readme_layout_names_every_module():
    (layout,) = [body for lang, body in _FENCE.findall((REPO / "README.md").read_text()) if "src/metatransfer/" in body]
    package = REPO / "src" / "metatransfer"
    modules = sorted(path.relative_to(package) for path in package.rglob("*.py") if not path.name.startswith("_"))
    missing = [str(module) for module in modules if not re.search(rf"(^|[\s,(]){re.escape(module.name)}\b", layout, re.M)]
    assert not missing, f"README.md's layout does not name {missing}"
