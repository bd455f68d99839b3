"""The `csr-widgets` command: explain, train, evaluate, demo."""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="csr-widgets", description="Concept-based Similarity Reasoning: train, evaluate, explore.")
    commands = parser.add_subparsers(dest="command")

    explain = commands.add_parser("explain", help="print the bundled model's reasoning for one synthetic image")
    explain.add_argument("--index", type=int, default=0, help="index of the held-out synthetic image")
    explain.add_argument("--reject", nargs="*", default=[], help="concepts to reject")

    train = commands.add_parser("train", help="train a model in three stages")
    train.add_argument("--recipe", default=None, help="a bundled recipe, e.g. synthetic-cxr")
    train.add_argument("--config", type=Path, default=None, help="a JSON file of CSRConfig fields (with --recipe: overrides)")
    train.add_argument("--out", type=Path, required=True, help="run folder: stage checkpoints, history, model (resumes if present)")
    train.add_argument("--epochs", type=int, nargs=3, metavar=("CONCEPTS", "PROTOTYPES", "TASK"), default=None)
    train.add_argument("--n-train", type=int, default=None, help="synthetic training images")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--atlas", action="store_true", help="also build the prototype atlas next to the model")
    train.add_argument("--install", action="store_true", help="copy the result into the package as the bundled model")

    evaluate = commands.add_parser("evaluate", help="paper-style tables for a checkpoint on a dataset")
    evaluate.add_argument("checkpoint", nargs="?", default="synthetic-cxr", help="a .safetensors file or a bundled name")
    evaluate.add_argument("--n", type=int, default=1000, help="held-out synthetic images")
    evaluate.add_argument("--seed", type=int, default=None, help="seed of the held-out synthetic set (default: the recipe's)")
    evaluate.add_argument("--markdown", action="store_true")

    demo = commands.add_parser("demo", help="open the teaching notebook with the live explorer in JupyterLab")
    demo.add_argument("--port", type=int, default=8888)
    demo.add_argument("--no-browser", action="store_true")

    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["explain"])
    return {"explain": _explain, "train": _train, "evaluate": _evaluate, "demo": _demo}[args.command](args)


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
    from .config import CSRConfig
    from .data import SyntheticCXR
    from .model import CSRModel
    from .pretrained import RECIPES, bundled_path
    from .training import TrainingPlan, train

    if args.recipe is None and args.config is None:
        raise SystemExit("csr-widgets train: give --recipe synthetic-cxr and/or --config config.json")
    if args.recipe is not None and args.recipe not in RECIPES:
        raise SystemExit(f"csr-widgets train: unknown recipe {args.recipe!r}; known: {sorted(RECIPES)}")
    recipe = RECIPES[args.recipe or "synthetic-cxr"]
    fields = dict(recipe.config)
    if args.config is not None:
        fields.update(json.loads(args.config.read_text()))
    config = CSRConfig(**fields)
    plan = TrainingPlan(**{**recipe.plan, "seed": args.seed})
    if args.epochs:
        plan = dataclasses.replace(plan, concept_epochs=args.epochs[0], prototype_epochs=args.epochs[1], task_epochs=args.epochs[2])
    train_kwargs = {**recipe.train, **({"n": args.n_train} if args.n_train else {})}
    size = {"image_size": config.image_size}
    train_set, val_set = SyntheticCXR(**{**train_kwargs, **size}), SyntheticCXR(**{**recipe.val, **size})
    model = CSRModel(config)
    history = train(model, train_set, val_set, plan, out_dir=args.out)
    if not history.empty:
        print(history.groupby("stage").tail(1).to_string(index=False))
    if args.atlas or args.install:
        from .evaluation.atlas import build_atlas

        build_atlas(model, train_set).save(args.out / "model.atlas.safetensors")
    if args.install:
        target = bundled_path(args.recipe or "synthetic-cxr")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.out / "model.safetensors", target)
        shutil.copyfile(args.out / "model.atlas.safetensors", target.with_suffix(".atlas.safetensors"))
        print(f"installed as {target}")
    return 0


def _evaluate(args) -> int:
    from .data import SyntheticCXR
    from .evaluation import off_target_prototypes, paper_tables
    from .evaluation.atlas import load_atlas
    from .model import CSRModel
    from .pretrained import RECIPES, load_pretrained

    bundled = args.checkpoint in RECIPES
    model = load_pretrained(args.checkpoint) if bundled else CSRModel.load(args.checkpoint)
    recipe = RECIPES[args.checkpoint if bundled else "synthetic-cxr"]
    size = {"image_size": model.config.image_size}
    seed = {} if args.seed is None else {"seed": args.seed}
    test_set = SyntheticCXR(**{**recipe.test, "n": args.n, **size, **seed})
    refined = None
    try:  # "after atlas refinement": prune prototypes whose atlas match misses their concept
        atlas = load_atlas(args.checkpoint if bundled else Path(args.checkpoint).with_suffix(".atlas.safetensors"))
        train_set = SyntheticCXR(**{**recipe.train, **size})  # the set the atlas indexes
        refined = model.prototype_mask.cpu() & ~off_target_prototypes(atlas, train_set, tolerance=model.grid.stride)
    except FileNotFoundError:
        pass
    print(paper_tables(model, test_set, refined=refined, markdown=args.markdown, progress=True))
    return 0


DEMO_CELLS = [
    "# csr_widgets demo\n\nDraw a **negative** box (press `n`, then drag) over the brightest region of the heatmap, "
    "or untick a concept, and watch the prediction change. `u` undoes, `r` redoes.",
    "from csr_widgets import CSRExplorer, SyntheticCXR, load_pretrained\n\n"
    "model = load_pretrained(\"synthetic-cxr\")\n"
    "image = SyntheticCXR(n=20, split=\"test\", image_size=model.config.image_size)[3][\"image\"]\n"
    "explorer = CSRExplorer(model, image)\nexplorer",
    "explorer.result.probs  # the current reasoning, as model.reason returns it",
]


def _demo(args) -> int:
    import subprocess

    import nbformat

    path = Path("csr-widgets-demo.ipynb")
    if not path.exists():  # never overwrite a notebook the user has changed
        notebook = nbformat.v4.new_notebook()
        notebook.cells = [nbformat.v4.new_markdown_cell(DEMO_CELLS[0])] + [nbformat.v4.new_code_cell(c) for c in DEMO_CELLS[1:]]
        nbformat.write(notebook, path)
    command = [sys.executable, "-m", "jupyter", "lab", str(path), "--ip=127.0.0.1", f"--port={args.port}"]
    if args.no_browser:
        command.append("--no-browser")
    print(f"opening {path.resolve()} in JupyterLab on http://127.0.0.1:{args.port}")
    return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(main())
