"""The `csr-widgets` command: explain, train, evaluate, demo."""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="csr-widgets", description="Concept-based Similarity Reasoning: train, evaluate, explore.")
    commands = parser.add_subparsers(dest="command")

    explain = commands.add_parser("explain", help="print the bundled model's reasoning for one synthetic image")
    explain.add_argument("--index", type=int, default=0, help="index of the held-out synthetic image")
    explain.add_argument("--reject", nargs="*", default=[], help="concepts to reject")

    train = commands.add_parser("train", help="train a model in three stages (under torchrun: on every process)",
                                description="Train a CSR model; docs/training.md has the recipes, data sources and torchrun.")
    train.add_argument("--recipe", default=None, help="a recipe: synthetic-cxr, tbx11k, vindr or isic (the config and the plan)")
    train.add_argument("--data", default=None, help=f"the images: {DATA_HELP} (default: the recipe's; synthetic)")
    train.add_argument("--config", action="append", default=[], metavar="FILE.json | FIELD=VALUE",
                       help="CSRConfig fields: a JSON file, or one field (VALUE as JSON, else a string); repeatable, overrides the recipe")
    train.add_argument("--backbone", default=None, help="a timm model name, e.g. convnext_tiny")
    train.add_argument("--pretrained", action="store_true", help="start from timm's pretrained weights (downloads them: online only)")
    train.add_argument("--image-size", type=int, default=None, help="side of the square training images, in pixels")
    train.add_argument("--out", type=Path, required=True, help="run folder: stage checkpoints, history, model (resumes if present)")
    train.add_argument("--epochs", type=int, nargs=3, metavar=("CONCEPTS", "PROTOTYPES", "TASK"), default=None)
    train.add_argument("--batch-size", type=int, default=None, help="stage-1 images per process per step")
    train.add_argument("--accumulate", type=int, default=None, help="stage-1 batches per optimiser step (gradient accumulation)")
    train.add_argument("--n-train", type=int, default=None, help="synthetic training images")
    train.add_argument("--box-weight", type=float, default=None, metavar="W",
                       help="weight of stage 1's box term, which asks each present concept's evidence to lie on its boxes "
                            "(0: image-level labels only, the paper's; default: the recipe's, 0.1 for synthetic-cxr)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--atlas", action="store_true", help="also build the prototype atlas next to the model")
    train.add_argument("--install", action="store_true", help="copy the result into the package as the bundled model")
    _add_runtime_arguments(train)
    train.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="bfloat16 autocast (default: on CUDA only)")
    train.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                       help="NHWC memory layout for the convolutions (default: on CUDA only)")

    evaluate = commands.add_parser("evaluate", help="paper-style tables for a checkpoint on a dataset (under torchrun: split between processes)")
    evaluate.add_argument("checkpoint", nargs="?", default="synthetic-cxr", help="a .safetensors file or a bundled name")
    evaluate.add_argument("--data", default=None, help=f"the images: {DATA_HELP} (default: synthetic)")
    evaluate.add_argument("--split", default=None, help="the format's own split to evaluate (default: the source's test role)")
    evaluate.add_argument("--n", type=int, default=1000, help="held-out synthetic images")
    evaluate.add_argument("--batch-size", type=int, default=32, help="images per process per batch")
    evaluate.add_argument("--seed", type=int, default=None, help="seed of the held-out synthetic set (default: the recipe's)")
    evaluate.add_argument("--markdown", action="store_true")
    _add_runtime_arguments(evaluate)

    prepare = commands.add_parser("prepare", help="decode a dataset once at the training size, for fast training (--data prepared:CACHE)")
    prepare.add_argument("--data", required=True, help=f"the images: {DATA_HELP}")
    prepare.add_argument("--out", type=Path, required=True, help="the cache folder to write")
    prepare.add_argument("--image-size", type=int, required=True, help="side of the square images, in pixels (the training size)")
    prepare.add_argument("--channels", type=int, choices=(1, 3), default=None, help="image channels (default: the source's)")
    prepare.add_argument("--recipe", default=None, help="take the loader's options (e.g. VinDr's presence rule) from a recipe")
    prepare.add_argument("--workers", type=int, default=2, help="DataLoader worker processes decoding in parallel")

    demo = commands.add_parser("demo", help="open the teaching notebook with the live explorer in JupyterLab")
    demo.add_argument("--port", type=int, default=8888)
    demo.add_argument("--no-browser", action="store_true")

    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["explain"])
    return {"explain": _explain, "train": _train, "evaluate": _evaluate, "prepare": _prepare, "demo": _demo}[args.command](args)


DATA_HELP = "synthetic | tbx11k:ROOT | vindr:ROOT | isic:ROOT | csv:FILE[:ROOT] | prepared:CACHE"


def _add_runtime_arguments(parser) -> None:
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes reading images (per process)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: this process's GPU when there is one)")


def _explain(args) -> int:
    import torch

    from . import Interaction, load_pretrained
    from .data import SyntheticCXR
    from .pretrained import RECIPES

    model = load_pretrained("synthetic-cxr", device="cpu")
    item = SyntheticCXR(**RECIPES["synthetic-cxr"].test)[args.index]
    with torch.inference_mode():
        out = model(item["image"][None], Interaction(rejected=set(args.reject)))
    predicted = int(out.probs[0].argmax())
    truth = [name for name, present in zip(model.concepts, item["concepts"]) if present]
    print(f"image {args.index}: true label {model.classes[item['label']]!r}, true findings {truth or 'none'}")
    print("prediction: " + ", ".join(f"{c} {p:.2f}" for c, p in zip(model.classes, out.probs[0].tolist())))
    print(f"needs review: {bool(out.needs_review[0])}")
    print(f"\n{'concept':<14}{'p(concept)':>11}{'max score':>11}   contribution to {model.classes[predicted]!r}")
    for k, name in enumerate(model.concepts):
        mark = "  (rejected)" if name in args.reject else ""
        print(f"{name:<14}{out.concept_probs[0, k].item():>11.2f}{out.scores[0, k].max().item():>11.2f}"
              f"   {out.contributions[0, predicted, k].item():+.2f}{mark}")
    return 0


def _train(args) -> int:
    from ._distributed import shutdown
    from .model import CSRModel
    from .pretrained import bundled_path
    from .training import train

    group = _launch("train")
    say = print if group.is_main else _quiet
    try:
        with _usage_errors("train"):
            recipe, source, config_fields, plan = _training_setup(args)
            options = _loader_options(recipe, source)
            size = {"image_size": config_fields["image_size"], "channels": config_fields["in_channels"]}
            train_set = source.dataset("train", **size, **options("train", n=args.n_train))
            val_set = source.dataset("val", **size, **options("val"))
            config = _named_config(config_fields, train_set, source, recipe)
        _seed(args.seed)
        with group.main_first():  # --pretrained downloads once, then the others read timm's cache
            model = CSRModel(config).to(_device(args, group))
        if group.is_main:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / RUN_FILE).write_text(json.dumps({"data": str(source), "recipe": args.recipe, "processes": group.world_size}, indent=1))
        history = train(model, train_set, val_set, plan, out_dir=args.out, progress=group.is_main)
        if not history.empty:
            say(history.groupby("stage").tail(1).to_string(index=False))
        if args.atlas or args.install:
            from .evaluation.atlas import build_atlas

            atlas = build_atlas(model, train_set, progress=group.is_main)  # every process takes part
            if group.is_main:
                atlas.save(args.out / "model.atlas.safetensors")
        if args.install and group.is_main:
            target = bundled_path(args.recipe or "synthetic-cxr")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(args.out / "model.safetensors", target)
            shutil.copyfile(args.out / "model.atlas.safetensors", target.with_suffix(".atlas.safetensors"))
            say(f"installed as {target}")
    finally:
        shutdown()
    return 0


def _evaluate(args) -> int:
    from ._distributed import shutdown
    from .data.sources import parse_source
    from .evaluation import off_target_prototypes, paper_tables
    from .evaluation.atlas import load_atlas
    from .model import CSRModel
    from .pretrained import RECIPES, load_pretrained
    from .pretrained import recipe as find_recipe

    group = _launch("evaluate")
    try:
        device = _device(args, group)
        bundled = args.checkpoint in RECIPES
        model = load_pretrained(args.checkpoint, device=device) if bundled else CSRModel.load(args.checkpoint, device=device)
        run = _run_record(None if bundled else Path(args.checkpoint))
        with _usage_errors("evaluate"):
            # the recipe it was trained with: its split keywords (synthetic) or loader options (e.g. VinDr's presence rule)
            recipe = find_recipe(args.checkpoint if bundled else run.get("recipe") or "synthetic-cxr")
            source = parse_source(args.data or "synthetic")
            options = _loader_options(recipe, source)
            size = {"image_size": model.config.image_size, "channels": model.config.in_channels}
            chosen = {"split": args.split} if args.split else {}
            if args.seed is not None and source.kind == "synthetic":
                chosen["seed"] = args.seed
            test_set = source.dataset("test", **size, **{**options("test", n=args.n), **chosen})
        refined = None
        try:  # "after atlas refinement": prune prototypes whose atlas match misses their concept
            atlas = load_atlas(args.checkpoint if bundled else Path(args.checkpoint).with_suffix(".atlas.safetensors"))
            trained_on = parse_source(run["data"]) if "data" in run else source  # the set the atlas indexes
            train_set = trained_on.dataset("train", **size, **_loader_options(recipe, trained_on)("train"))
            refined = model.prototype_mask.cpu() & ~off_target_prototypes(atlas, train_set, tolerance=model.grid.stride)
        except FileNotFoundError:
            pass
        tables = paper_tables(model, test_set, refined=refined, markdown=args.markdown, progress=group.is_main,
                              batch_size=args.batch_size, num_workers=args.workers)
        if group.is_main:
            print(tables)
    finally:
        shutdown()
    return 0


def _prepare(args) -> int:
    from .data.prepared import prepare
    from .data.sources import ROLES, parse_source
    from .pretrained import recipe as find_recipe

    with _usage_errors("prepare"):
        source = parse_source(args.data)
        recipe = find_recipe(args.recipe or "synthetic-cxr")
        _check_recipe(recipe, args.recipe, source)
        options = _loader_options(recipe, source)
        manifest = prepare(source, args.out, args.image_size, args.channels, num_workers=args.workers,
                           options={role: options(role) for role in ROLES})
    roles = json.loads(manifest.read_text())["roles"]
    counts = ", ".join(f"{role} {info['images']}" for role, info in roles.items())
    print(f"prepared {counts} images at {args.image_size} px in {args.out}; train with --data prepared:{args.out}")
    return 0


# --------------------------------------------------------------------------- shared by the commands
RUN_FILE = "run.json"  # in a run folder: the --data and recipe the model was trained with


def _quiet(*_args, **_kwargs) -> None:
    """print on every process but the main one."""


def _launch(command: str):
    """The process group torchrun describes (one process without torchrun)."""
    from ._distributed import LaunchError, launch

    try:
        return launch()
    except LaunchError as error:
        raise SystemExit(f"csr-widgets {command}: {error}") from None


@contextmanager
def _usage_errors(command: str):
    """Bad input (a --data spec, a missing folder, a recipe that does not fit) -> one line, no traceback."""
    from .data.sources import DataSpecError

    try:
        yield
    except (DataSpecError, FileNotFoundError, ValueError) as error:
        raise SystemExit(f"csr-widgets {command}: {error}") from None


def _seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)  # the same initial weights on every process


def _device(args, group):
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return torch.device("cuda", group.local_rank) if device.type == "cuda" and device.index is None else device


def _training_setup(args):
    """(recipe, data source, CSRConfig fields without the names the data supplies, TrainingPlan)."""
    import dataclasses

    from .config import CSRConfig
    from .data.sources import parse_source
    from .pretrained import RECIPES
    from .pretrained import recipe as find_recipe
    from .training import TrainingPlan

    if args.recipe is None and not args.config and args.data is None:
        raise ValueError("give --recipe (synthetic-cxr, tbx11k, vindr, isic), or --data SOURCE (with --config for the settings)")
    recipe = find_recipe(args.recipe) if args.recipe is not None else None
    if args.data is None and recipe is not None and recipe.data != "synthetic":
        raise ValueError(f"--recipe {args.recipe} trains on {recipe.data} data: give --data {recipe.data}:ROOT.")
    source = parse_source(args.data or "synthetic")
    _check_recipe(recipe, args.recipe, source)
    if recipe is None and source.kind == "synthetic":
        recipe = RECIPES["synthetic-cxr"]  # synthetic data without a recipe: its split keywords and settings
    defaults = {f.name: f.default for f in dataclasses.fields(CSRConfig) if f.default is not dataclasses.MISSING}
    fields = {"image_size": defaults["image_size"], "in_channels": source.channels, **(recipe.config if recipe else {})}
    for entry in args.config:
        fields.update(_config_entry(entry))
    given = {"backbone": args.backbone, "image_size": args.image_size, "pretrained": args.pretrained or None}
    fields.update({k: v for k, v in given.items() if v is not None})
    plan = dict(recipe.plan) if recipe is not None else {}
    if args.epochs:
        plan.update(concept_epochs=args.epochs[0], prototype_epochs=args.epochs[1], task_epochs=args.epochs[2])
    given = {"batch_size": args.batch_size, "accumulation_steps": args.accumulate, "bf16": args.bf16,
             "channels_last": args.channels_last, "concept_box_weight": args.box_weight}
    plan.update({k: v for k, v in given.items() if v is not None}, seed=args.seed, num_workers=args.workers)
    return recipe, source, fields, TrainingPlan(**plan)


def _check_recipe(recipe, name: str | None, source) -> None:
    """Refuse a recipe made for another kind of data, naming both and the fix."""
    if recipe is not None and name is not None and recipe.data != source.origin:
        raise ValueError(f"--recipe {name} is made for --data {recipe.data}{'' if recipe.data == 'synthetic' else ':ROOT'}, "
                         f"but --data is {source} ({source.origin} data): use --recipe {source.origin} if there is one, "
                         "or leave --recipe out and give the settings with --config.")


def _loader_options(recipe, source):
    """role -> the keywords of that role's dataset: a synthetic recipe's SyntheticCXR
    keywords of the split, or a dataset recipe's loader options (none for a prepared cache)."""
    def options(role: str, n: int | None = None) -> dict:
        if source.kind == "synthetic":  # the size and channels are the model's
            keywords = {k: v for k, v in getattr(recipe, role).items() if k not in ("image_size", "channels")}
            return {**keywords, **({"n": n} if n else {})}
        return dict(getattr(recipe, role)) if recipe is not None and recipe.data == source.kind else {}
    return options


def _config_entry(entry: str) -> dict:
    """``--config`` FILE.json (fields) or FIELD=VALUE (VALUE parsed as JSON, else kept as a string)."""
    name, equals, value = entry.partition("=")
    if not equals:
        path = Path(entry)
        if not path.is_file():
            raise FileNotFoundError(f"--config {entry}: no such JSON file (or give FIELD=VALUE).")
        return json.loads(path.read_text())
    try:
        return {name.strip(): json.loads(value)}
    except json.JSONDecodeError:
        return {name.strip(): value}


def _named_config(fields: dict, train_set, source, recipe):
    """The CSRConfig, its concept and class names from the training data unless given; names
    that differ from the data's are refused with both lists and the fix."""
    from .config import CSRConfig

    data_names = {"concepts": list(train_set.concepts), "classes": list(train_set.classes)}
    for field, names in data_names.items():
        given = fields.setdefault(field, names)
        if list(given) != names:
            origin = "the recipe" if recipe is not None and field in recipe.config else "--config"
            raise ValueError(f"{origin} lists {field} {list(given)}, but {source} has {names}: give --config "
                             f"'{field}={json.dumps(names)}' (or leave --recipe out to take the data's names).")
    return CSRConfig(**fields)


def _run_record(checkpoint: Path | None) -> dict:
    """The run.json beside a checkpoint in a run folder ({} when there is none)."""
    path = None if checkpoint is None else checkpoint.parent / RUN_FILE
    return json.loads(path.read_text()) if path is not None and path.is_file() else {}


DEMO_CELLS = [
    "# csr_widgets demo\n\nDraw a **negative** box (press `n`, then drag) over the brightest region of the heatmap, "
    "or untick a concept, and watch the prediction change. `z` undoes, `y` redoes; keys go to the image while "
    "the pointer is over it.",
    "from csr_widgets import CSRExplorer, SyntheticCXR, load_pretrained\n\n"
    "model = load_pretrained(\"synthetic-cxr\")\n"
    "image = SyntheticCXR(n=20, split=\"test\", image_size=model.config.image_size)[3][\"image\"]\n"
    "explorer = CSRExplorer(model, image)\nexplorer",
    "explorer.result.probs  # the current reasoning, as model.reason returns it",
]


KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
NODELAY_EXTENSION = "csr_widgets.widgets.server"  # TCP_NODELAY on the kernel websockets


# The teaching quickstart, where the package runs from a checkout (pip install -e .).
QUICKSTART = Path(__file__).resolve().parents[1] / "notebooks" / "01_quickstart.ipynb"


def demo_notebook(path: Path, quickstart: Path = QUICKSTART) -> bool:
    """Write the demo notebook: a copy of the quickstart notebook when the checkout has it,
    else a three-cell explorer demo; with a kernelspec (no "Select Kernel" dialog). Never
    overwrites one the user has changed. True when it was written."""
    import nbformat

    if path.exists():
        return False
    if quickstart.is_file():
        notebook = nbformat.read(quickstart, as_version=4)
        for cell in notebook.cells:  # its links to the other notebooks, from where the copy lives
            if cell.cell_type == "markdown":
                cell.source = relink(cell.source, quickstart.parent, path.resolve().parent)
    else:  # installed from a wheel: the notebooks are not in the package
        notebook = nbformat.v4.new_notebook()
        notebook.cells = [nbformat.v4.new_markdown_cell(DEMO_CELLS[0])] + [nbformat.v4.new_code_cell(c) for c in DEMO_CELLS[1:]]
    notebook.metadata["kernelspec"] = dict(KERNELSPEC)
    notebook.metadata.setdefault("language_info", {"name": "python"})
    nbformat.write(notebook, path)
    return True


MARKDOWN_LINK = re.compile(r"(\]\()([^)\s#]+)(#[^)\s]*)?\)")


def relink(markdown: str, origin: Path, folder: Path) -> str:
    """Markdown with its relative links, written for a file in ``origin``, made to work from
    a copy in ``folder`` (JupyterLab opens them as long as both lie under its root)."""

    def moved(match: re.Match) -> str:
        opening, target, anchor = match.group(1), match.group(2), match.group(3) or ""
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, flags=re.IGNORECASE) or target.startswith("/"):
            return match.group(0)  # a URL or an absolute path
        return f"{opening}{Path(os.path.relpath(origin / target, folder)).as_posix()}{anchor})"

    return MARKDOWN_LINK.sub(moved, markdown)


def demo_command(path: Path, port: int, no_browser: bool, as_root: bool) -> list[str]:
    """The JupyterLab command of ``csr-widgets demo``: on 127.0.0.1, with the package's
    TCP_NODELAY server extension enabled (added to the extensions enabled elsewhere)."""
    command = [sys.executable, "-m", "jupyter", "lab", str(path), "--ip=127.0.0.1", f"--port={port}",
               f"--ServerApp.jpserver_extensions={NODELAY_EXTENSION}=True"]
    if as_root:
        command.append("--allow-root")  # Jupyter refuses to start as root without it
    if no_browser:
        command.append("--no-browser")
    return command


def _demo(args) -> int:
    import subprocess

    path = Path("csr-widgets-demo.ipynb")
    demo_notebook(path)
    as_root = hasattr(os, "geteuid") and os.geteuid() == 0
    if as_root:
        print("running as root (e.g. in a container): starting JupyterLab with --allow-root", flush=True)
    print(f"opening {path.resolve()} in JupyterLab on http://127.0.0.1:{args.port} (TCP_NODELAY extension on)", flush=True)
    return subprocess.call(demo_command(path, args.port, args.no_browser, as_root))


if __name__ == "__main__":
    sys.exit(main())
