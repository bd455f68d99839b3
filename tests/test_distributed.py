"""Several processes (torch.distributed, gloo on 127.0.0.1): the launch, the shards, and a
real 2-process run against a 1-process one: identical ranks, the same atlas and
evaluation, matching metrics, and resuming after an interruption."""
from __future__ import annotations

import json
import os
import socket

import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from csr_widgets import CSRModel
from csr_widgets._distributed import LaunchError, ProcessGroup, _from_environment, launch, shutdown
from csr_widgets.evaluation import classification_summary, evaluate
from csr_widgets.evaluation.atlas import Atlas, build_atlas
from csr_widgets.training import TrainingPlan, train
from tests.test_training import Squares, toy_model

WORLD = 2
# The toy of test_training (squares: one process learns it to > 80 % in these epochs), in
# batches of 16 per process: a global batch of 32.
PLAN = dict(concept_epochs=4, prototype_epochs=10, task_epochs=30, batch_size=16, concept_lr=3e-3)


# --------------------------------------------------------------------------- the launch
@pytest.mark.parametrize("environ, message", [
    ({"RANK": "1"}, "RANK=1 is set but WORLD_SIZE is not"),
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set but RANK is not"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR and MASTER_PORT are not set"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}, "MASTER_PORT is not set"),
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}, "need 0 <= RANK < WORLD_SIZE"),
    ({"RANK": "one", "WORLD_SIZE": "2"}, "RANK='one' is not an integer"),
])
def test_a_half_configured_launch_is_refused_with_what_is_missing(environ, message):
    with pytest.raises(LaunchError, match=message) as error:
        _from_environment(environ, backend="gloo")
    assert "torchrun --nproc_per_node=N -m csr_widgets" in str(error.value)  # and the fix


def test_without_torchrun_the_group_is_one_process():
    for environ in ({}, {"RANK": "0", "WORLD_SIZE": "1"}):
        group = _from_environment(environ, backend=None)
        assert (group.rank, group.world_size, group.distributed, group.is_main) == (0, 1, False, True)
    group = ProcessGroup()
    rows = torch.arange(6).view(3, 2)
    assert group.gather_rows(rows) is rows and torch.equal(group.total(rows), rows) and group.mean(2.5) == 2.5
    frame = pd.DataFrame({"a": [1, 2]})
    assert group.gather_frame(frame) is frame


@pytest.mark.parametrize("n, unit, world", [(160, 64, 2), (10, 3, 4), (5, 8, 3), (0, 4, 2), (1000, 64, 7)])
def test_shards_are_contiguous_batch_aligned_and_cover_every_row_once(n, unit, world):
    shards = [ProcessGroup(rank, world).shard(n, unit) for rank in range(world)]
    assert [i for shard in shards for i in shard] == list(range(n))  # in order, each row once
    for shard in shards:
        assert shard.start % unit == 0 or shard.start == n  # batches as in one process
    if n == 160:  # by hand: 3 batches of 64, the first two to rank 0
        assert shards == [range(0, 128), range(128, 160)]


# --------------------------------------------------------------------------- 2 processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, port: int) -> ProcessGroup:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return launch(backend="gloo")


def _collectives(rank: int, port: int, out: str):
    """Each collective with uneven and empty shares; what rank 0 saw, written under ``out``."""
    group = _join(rank, port)
    try:
        rows = torch.arange(3 * rank, dtype=torch.float32).view(-1, 3)  # rank 0: no rows, rank 1: 1 row
        flags = torch.tensor([True, False, True][: 2 + rank])
        module = torch.nn.Linear(2, 2)
        torch.nn.init.constant_(module.weight, float(rank))
        group.broadcast_module(module)
        frame = pd.DataFrame() if rank == 0 else pd.DataFrame({"index": [5, 6], "concept": ["nodule", "cavity"], "kept": [0.5, 1.0]})
        gathered = group.gather_frame(frame)
        result = {"rows": group.gather_rows(rows).tolist(), "flags": group.gather_rows(flags).tolist(),
                  "total": group.total(torch.tensor([rank + 1.0])).tolist(), "mean": group.mean(rank),
                  "weight": module.weight.flatten().tolist(), "frame": gathered.to_dict("list"),
                  "dtypes": [str(t) for t in gathered.dtypes]}
        with open(f"{out}/rank{rank}.json", "w") as handle:
            json.dump(result, handle)
    finally:
        shutdown()


@pytest.mark.slow
def test_collectives_gather_uneven_shares_in_rank_order(tmp_path):
    mp.spawn(_collectives, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert seen["rows"] == [[0.0, 1.0, 2.0]] and seen["flags"] == [True, False, True, False, True]
        assert seen["total"] == [3.0] and seen["mean"] == 0.5 and seen["weight"] == [0.0] * 4  # rank 0's weights
        assert seen["frame"] == {"index": [5, 6], "concept": ["nodule", "cavity"], "kept": [0.5, 1.0]}
        expected = pd.DataFrame({"index": [5], "concept": ["nodule"], "kept": [0.5]}).dtypes  # as the sender's
        assert seen["dtypes"] == [str(t) for t in expected]


def _datasets():
    return Squares(240), Squares(60, seed=1), Squares(100, seed=2)


class Interrupted(Exception):
    pass


class InterruptAt(torch.utils.data.Dataset):
    """A dataset that stops the run after ``after`` items (the same point on every process)."""

    def __init__(self, dataset, after: int):
        self.dataset, self.after, self.served = dataset, after, 0
        self.concepts, self.classes = dataset.concepts, dataset.classes

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        self.served += 1
        if self.served > self.after:
            raise Interrupted
        return self.dataset[index]


def _worker(rank: int, port: int, out: str, interrupt_after: int | None):
    """One process of a 2-process run: train, atlas, evaluation; results under ``out``."""
    group = _join(rank, port)
    try:
        train_set, val_set, test_set = _datasets()
        model = toy_model(seed=rank)  # different initial weights: training must start from rank 0's
        if interrupt_after is not None:
            try:
                train(model, InterruptAt(train_set, interrupt_after), val_set, TrainingPlan(**PLAN), out_dir=out, progress=False)
            except Interrupted:
                return
        history = train(model, train_set, val_set, TrainingPlan(**PLAN), out_dir=out, progress=False)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{out}/rank{rank}.safetensors")
        atlas = build_atlas(model, train_set, crop_size=16, progress=False)
        frame = evaluate(model, test_set, batch_size=16, progress=False)
        if group.is_main:
            atlas.save(f"{out}/atlas.safetensors")
            frame.to_csv(f"{out}/evaluate.csv", index=False)
            history.to_csv(f"{out}/history-returned.csv", index=False)
    finally:
        shutdown()


def _run(out, interrupt_after=None):
    mp.spawn(_worker, args=(_free_port(), str(out), interrupt_after), nprocs=WORLD, join=True)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("two-processes")
    _run(out)
    return out


@pytest.mark.slow
def test_every_process_ends_with_the_same_weights(two_processes):
    ranks = [load_file(two_processes / f"rank{r}.safetensors") for r in range(WORLD)]
    assert ranks[0].keys() == ranks[1].keys()
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    saved = load_file(two_processes / "model.safetensors")
    for name in ranks[0]:
        assert torch.equal(saved[name], ranks[0][name]), name


@pytest.mark.slow
def test_the_atlas_and_the_evaluation_of_two_processes_equal_those_of_one(two_processes):
    torch.set_num_threads(1)
    train_set, _, test_set = _datasets()
    model = CSRModel.load(two_processes / "model.safetensors").eval()
    two, one = Atlas.load(two_processes / "atlas.safetensors"), build_atlas(model, train_set, crop_size=16, progress=False)
    for name in ("image_index", "location", "usage", "crop_boxes", "crops"):
        assert torch.equal(getattr(two, name), getattr(one, name)), name
    torch.testing.assert_close(two.similarity, one.similarity, equal_nan=True, rtol=0, atol=0)
    assert (one.image_index >= 128).any()  # some matches lie in the second process's rows (128-239)
    shared = pd.read_csv(two_processes / "evaluate.csv")
    alone = evaluate(model, test_set, batch_size=16, progress=False)
    pd.testing.assert_frame_equal(shared, alone.reset_index(drop=True), check_dtype=False)


@pytest.mark.slow
def test_two_processes_learn_what_one_process_learns(two_processes):
    """The same data in global batches of 32: one process of 32 against two of 16. Only
    batch norm's statistics (per process) and rounding differ."""
    torch.set_num_threads(1)
    train_set, val_set, test_set = _datasets()
    model = toy_model(seed=0)
    history = train(model, train_set, val_set, TrainingPlan(**{**PLAN, "batch_size": 32}), progress=False)
    shared = pd.read_csv(two_processes / "history.csv")
    # stages 1 and 2 run their epochs; stage 3 stops at its optimum, after as many L-BFGS
    # iterations as the (slightly different) scores need
    fixed = [stage_epoch for stage_epoch in history[["stage", "epoch"]].values.tolist() if stage_epoch[0] < 3]
    assert [stage_epoch for stage_epoch in shared[["stage", "epoch"]].values.tolist() if stage_epoch[0] < 3] == fixed
    assert (shared.stage == 3).any() and (history.stage == 3).any()
    for stage, column, tolerance in ((1, "train_loss", 0.05), (1, "val_concept_auc", 0.05), (3, "val_macro_f1", 0.1)):
        mine = history[history.stage == stage][column].to_numpy()[-1]
        theirs = shared[shared.stage == stage][column].to_numpy()[-1]
        assert abs(mine - theirs) < tolerance, (stage, column, mine, theirs)
    alone = classification_summary(evaluate(model, test_set, progress=False))
    two = classification_summary(evaluate(CSRModel.load(two_processes / "model.safetensors").eval(), test_set, progress=False))
    assert alone["accuracy"] > 0.8 and two["accuracy"] > 0.8  # both learnt it (chance: about 0.5)
    for metric in ("macro_f1", "concept_auc"):
        assert abs(alone[metric] - two[metric]) < 0.1, (metric, alone[metric], two[metric])


@pytest.mark.slow
def test_an_interrupted_two_process_run_resumes_to_the_same_weights(two_processes, tmp_path):
    # 240 images, 2 processes, batches of 16: 120 images each per epoch; stop in epoch 2
    _run(tmp_path, interrupt_after=120 + 2 * 16)
    progress = json.loads(load_file_metadata(tmp_path / "stage1-progress.safetensors")["epoch"])
    assert progress == 1 and not (tmp_path / "stage1.safetensors").exists()
    _run(tmp_path)
    resumed, straight = load_file(tmp_path / "rank0.safetensors"), load_file(two_processes / "rank0.safetensors")
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name
    history = pd.read_csv(tmp_path / "history.csv")
    assert history[history.stage == 1]["epoch"].tolist() == [0, 1, 2, 3]  # epoch 0 kept from the first run
    straight_history = pd.read_csv(two_processes / "history.csv")
    pd.testing.assert_frame_equal(history, straight_history)


def load_file_metadata(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()
