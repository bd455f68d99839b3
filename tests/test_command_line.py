"""The command line on real formats: --data sources, recipes, prepare, and end-to-end runs on
small folders written by the exporters (single process here; torchrun at the end)."""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from csr_widgets.cli import _training_setup, main
from csr_widgets.config import CSRConfig
from csr_widgets.data import ISIC2018, SyntheticCXR, VinDrCXR
from csr_widgets.data.exporters import TBX11K_CATEGORIES, write_concept_csv, write_isic, write_tbx11k, write_vindr
from csr_widgets.data.isic import ISIC_ATTRIBUTES
from csr_widgets.data.prepared import PreparedImages
from csr_widgets.data.sources import DataSpecError, Holdout, in_holdout, parse_source
from csr_widgets.data.vindr import KAGGLE_FINDINGS
from csr_widgets.pretrained import RECIPES, recipe, recipe_config, recipe_names
from csr_widgets.training import TrainingPlan, cache_features, train
from csr_widgets.training.features import autocast
from tests.test_training import Squares, toy_model

REPO = Path(__file__).resolve().parent.parent
# A tiny model for every end-to-end run (the recipes' ConvNeXt-T is far too big for a test).
TINY = ["--backbone", "resnet18", "--config", "feature_stage=2", "--image-size", "64", "--config", "prototypes_per_concept=4",
        "--config", "embedding_dim=16", "--epochs", "1", "1", "1", "--batch-size", "16", "--accumulate", "2"]


def _cli_error(args) -> str:
    with pytest.raises(SystemExit) as stop:
        main(args)
    return str(stop.value)


# --------------------------------------------------------------------------- folders
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Each format written by its exporter from SyntheticCXR (small images, few of them)."""
    root = tmp_path_factory.mktemp("formats")
    data = {split: SyntheticCXR(n=n, seed=4, image_size=64, split=split) for split, n in (("train", 40), ("val", 12), ("test", 12))}
    for split in ("train", "val"):
        write_tbx11k(data[split], root / "tbx11k", split=split, image_size=64)
    for split in ("train", "test"):  # 12-bit DICOMs, every other one stored inverted (MONOCHROME1)
        write_vindr(data[split], root / "vindr", split=split, image_size=96, photometric="mixed")
    for split in ("train", "val", "test"):
        write_isic(data[split], root / "isic", split=split, image_size=64)
    write_concept_csv(data["train"], root / "csv")
    return root


# --------------------------------------------------------------------------- --data
@pytest.mark.parametrize("spec, message", [
    ("tbx", "unknown source 'tbx'; give one of: synthetic, tbx11k:ROOT"),
    ("tbx11k", "tbx11k needs a path: tbx11k:ROOT, the folder holding imgs/ and annotations/"),
    ("vindr:/no/such/folder", "no such folder /no/such/folder; vindr needs ROOT"),
    ("csv:/no/such.csv", "no such file /no/such.csv"),
    ("synthetic:/tmp", "the synthetic source takes no path"),
])
def test_a_bad_data_spec_names_the_problem_and_the_fix(spec, message):
    with pytest.raises(DataSpecError, match=message):
        parse_source(spec)
    assert message in _cli_error(["train", "--data", spec, "--out", "unused"])


def test_data_specs_parse_to_their_paths(folders):
    assert parse_source("synthetic").kind == "synthetic"
    source = parse_source(f"csv:{folders / 'csv' / 'labels.csv'}:{folders / 'csv'}")
    assert (source.kind, source.path.name, source.root) == ("csv", "labels.csv", folders / "csv")
    assert str(parse_source(f"tbx11k:{folders / 'tbx11k'}")) == f"tbx11k:{folders / 'tbx11k'}"
    assert parse_source(f"isic:{folders / 'isic'}").channels == 3 and parse_source("synthetic").channels == 1


def test_the_holdout_depends_on_ids_only_and_splits_cleanly(folders):
    ids = [f"image{i}" for i in range(2000)]
    share = np.mean([in_holdout(i) for i in ids])
    assert 0.08 < share < 0.12  # the 10 % holdout
    dataset = VinDrCXR(folders / "vindr", "train")
    held, rest = Holdout(dataset, "holdout"), Holdout(dataset, "rest")
    assert sorted(held.indices + rest.indices) == list(range(len(dataset)))
    assert {r.id for r in held.records} == {r.id for r in dataset.records if in_holdout(r.id)}
    assert held.concepts == dataset.concepts and held[0]["id"] == dataset[held.indices[0]]["id"]


# --------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("name", ["tbx11k", "vindr", "isic"])
def test_the_paper_recipes_are_valid_and_name_their_datasets_concepts(name):
    made = recipe(name)
    config = CSRConfig(**made.config)
    TrainingPlan(**made.plan)
    assert made.data == name and config.backbone in timm.list_models()
    assert (config.backbone, config.prototypes_per_concept, config.embedding_dim) == ("convnext_tiny", 100, 256)  # the paper's
    expected = {"tbx11k": list(TBX11K_CATEGORIES), "vindr": list(KAGGLE_FINDINGS), "isic": list(ISIC_ATTRIBUTES)}[name]
    assert config.concepts == expected
    lines = (REPO / "csr_widgets" / "recipes" / f"{name}.toml").read_text().splitlines()
    table = None
    for above, line in zip([""] + lines, lines):  # every setting says where it comes from, on its line or above it
        table = line if line.startswith("[") else table
        if table in ("[config]", "[plan]") and "=" in line and not line.startswith(("#", " ")):
            comment = line.partition("#")[2] or above.partition("#")[2]
            assert any(source in comment for source in ("paper", "dataset", "ours")), line


def test_the_synthetic_recipe_stays_where_it_was():
    assert "synthetic-cxr" in recipe_names() and recipe("synthetic-cxr") is RECIPES["synthetic-cxr"]
    assert recipe_config("synthetic-cxr") == CSRConfig(**RECIPES["synthetic-cxr"].config)


def test_the_box_weight_reaches_the_plan_and_is_checked():
    def plan(*extra):
        args = argparse.Namespace(recipe="synthetic-cxr", data=None, config=[], backbone=None, image_size=None, pretrained=False,
                                  epochs=None, batch_size=None, accumulate=None, bf16=None, channels_last=None, seed=0,
                                  workers=0, box_weight=None)
        for name, value in extra:
            setattr(args, name, value)
        return _training_setup(args)[3]

    assert plan().concept_box_weight == RECIPES["synthetic-cxr"].plan["concept_box_weight"] == 0.1
    assert plan(("box_weight", 0.0)).concept_box_weight == 0.0  # the paper's image-level supervision
    message = _cli_error(["train", "--recipe", "synthetic-cxr", "--box-weight", "-1", "--out", "unused"])
    assert "TrainingPlan.concept_box_weight must be >= 0" in message


def test_a_recipe_for_other_data_is_refused_with_the_fix(folders):
    message = _cli_error(["train", "--recipe", "tbx11k", "--data", f"isic:{folders / 'isic'}", "--out", "unused"])
    assert "--recipe tbx11k is made for --data tbx11k:ROOT" in message and "use --recipe isic" in message
    assert "give --data tbx11k:ROOT" in _cli_error(["train", "--recipe", "tbx11k", "--out", "unused"])
    # the isic recipe's Task 3 classes are not the exported set's
    message = _cli_error(["train", "--recipe", "isic", "--data", f"isic:{folders / 'isic'}", "--out", "unused"])
    assert "the recipe lists classes ['MEL'" in message and "['healthy', 'sick', 'tb']" in message and "--config" in message


def test_a_half_configured_launch_stops_the_command(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    message = _cli_error(["evaluate"])
    assert message.startswith("csr-widgets evaluate: RANK=1 is set but WORLD_SIZE is not") and "torchrun" in message


# --------------------------------------------------------------------------- prepare
def test_prepared_images_are_the_decoded_images_at_16_bits(folders, tmp_path, capsys):
    main(["prepare", "--data", f"vindr:{folders / 'vindr'}", "--out", str(tmp_path / "cache"), "--image-size", "64", "--workers", "0"])
    assert "--data prepared:" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "cache" / "prepared.json").read_text())
    assert manifest["format"] == "csr_widgets.prepared/1" and sorted(manifest["roles"]) == ["test", "train", "val"]
    shard = np.load(tmp_path / "cache" / "train-00000.npy", allow_pickle=False)  # plain arrays, no pickle
    assert shard.dtype == np.uint16 and shard.shape[1:] == (1, 64, 64)
    source = parse_source(f"vindr:{folders / 'vindr'}")
    prepared = parse_source(f"prepared:{tmp_path / 'cache'}")
    assert prepared.origin == "vindr"
    for role in ("train", "val", "test"):
        decoded = source.dataset(role, image_size=64, channels=1)
        stored = prepared.dataset(role, image_size=64, channels=1)
        assert len(stored) == len(decoded) and stored.concepts == decoded.concepts and stored.classes == decoded.classes
        for index in range(len(decoded)):
            a, b = decoded[index], stored[index]
            assert (a["id"], a["label"]) == (b["id"], b["label"]) and torch.equal(a["concepts"], b["concepts"])
            assert (a["image"] - b["image"]).abs().max() <= 0.5 / 65535 + 1e-7  # 16-bit rounding only
            assert [box[0] for box in a["boxes"]] == [box[0] for box in b["boxes"]]
            np.testing.assert_allclose([box[1:] for box in a["boxes"]], [box[1:] for box in b["boxes"]], atol=1e-4)
    resized = PreparedImages(tmp_path / "cache", "train", image_size=32, channels=3)[0]
    assert resized["image"].shape == (3, 32, 32)


# --------------------------------------------------------------------------- speed flags
def test_bf16_and_channels_last_run_on_the_cpu_and_leave_float32_weights():
    model = toy_model()
    plan = TrainingPlan(concept_epochs=1, prototype_epochs=1, task_epochs=1, batch_size=16, bf16=True, channels_last=True)
    assert not TrainingPlan().uses_bf16(torch.device("cpu")) and TrainingPlan().uses_bf16(torch.device("cuda"))
    images = torch.stack([Squares(4)[i]["image"] for i in range(4)])
    with torch.no_grad(), autocast(model, True):
        assert model.features(images).dtype == torch.bfloat16  # the flag does switch the precision
    train(model, Squares(32), None, plan, progress=False)
    assert all(p.dtype == torch.float32 and p.is_contiguous() for p in model.parameters())
    assert cache_features(model, Squares(8), progress=False, bf16=True).features.dtype == torch.float32


# --------------------------------------------------------------------------- end to end
def _source(kind: str, folders: Path, tmp_path: Path) -> str:
    if kind == "csv":
        return f"csv:{folders / 'csv' / 'labels.csv'}"
    if kind == "prepared":
        main(["prepare", "--data", f"vindr:{folders / 'vindr'}", "--out", str(tmp_path / "cache"), "--image-size", "64", "--workers", "0"])
        return f"prepared:{tmp_path / 'cache'}"
    return "synthetic" if kind == "synthetic" else f"{kind}:{folders / kind}"


@pytest.mark.parametrize("kind", [
    "tbx11k",
    pytest.param("vindr", marks=pytest.mark.slow), pytest.param("isic", marks=pytest.mark.slow),
    pytest.param("csv", marks=pytest.mark.slow), pytest.param("prepared", marks=pytest.mark.slow),
    pytest.param("synthetic", marks=pytest.mark.slow),
])
def test_train_and_evaluate_run_end_to_end_on_each_source(kind, folders, tmp_path, capsys):
    data = _source(kind, folders, tmp_path)
    extra = ["--n-train", "40"] if kind == "synthetic" else []
    main(["train", "--data", data, "--out", str(tmp_path / "run"), "--atlas", *TINY, *extra])
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} >= {"stage3.safetensors", "model.safetensors", "model.atlas.safetensors", "history.csv", "run.json"}
    assert json.loads((run / "run.json").read_text())["data"] == data
    capsys.readouterr()
    main(["evaluate", str(run / "model.safetensors"), "--data", data, "--n", "12", "--batch-size", "8"])
    printed = capsys.readouterr().out
    assert "Table 1. Classification" in printed and "Table 2. Pointing Game" in printed
    assert "after refinement" in printed  # the atlas was found and read against the training data


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_trains_and_evaluates_with_two_processes(folders, tmp_path):
    """`python -m torch.distributed.run --nproc_per_node=2 -m csr_widgets ...`, as a user runs it."""
    def torchrun(*args):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                   f"--master_port={_free_port()}", "-m", "csr_widgets", *args]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    data = f"tbx11k:{folders / 'tbx11k'}"
    printed = torchrun("train", "--data", data, "--out", str(tmp_path / "run"), "--atlas", *TINY)
    assert printed.count("stage  epoch") == 1  # the history, printed by rank 0 only
    assert json.loads((tmp_path / "run" / "run.json").read_text())["processes"] == 2
    printed = torchrun("evaluate", str(tmp_path / "run" / "model.safetensors"), "--data", data, "--batch-size", "8")
    assert printed.count("Table 1. Classification") == 1
    capsys_free = subprocess.run([sys.executable, "-c", "import sys; from csr_widgets.cli import main; sys.exit(main(sys.argv[1:]))",
                                  "evaluate", str(tmp_path / "run" / "model.safetensors"), "--data", data, "--batch-size", "8"],
                                 cwd=REPO, capture_output=True, text=True, timeout=600)
    assert capsys_free.stdout == printed  # the same tables from one process
