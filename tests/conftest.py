import pytest
import torch

from csr_widgets import CSRConfig, CSRModel

# The suite's tensors are tiny: on a shared 2-core machine a second intra-op thread only
# spins (the widget tests ran 4x slower with two).
torch.set_num_threads(1)


def small_config(**overrides) -> CSRConfig:
    """A tiny but real model: resnet18 cut after its second stage (stride 8)."""
    fields = dict(
        concepts=["nodule", "effusion", "cavity"],
        classes=["healthy", "sick", "tb"],
        backbone="resnet18",
        feature_stage=2,
        image_size=64,
        prototypes_per_concept=4,
        embedding_dim=16,
    )
    fields.update(overrides)
    return CSRConfig(**fields)


@pytest.fixture
def config() -> CSRConfig:
    return small_config()


@pytest.fixture
def model(config) -> CSRModel:
    torch.manual_seed(0)
    model = CSRModel(config).eval()
    # Non-trivial task head and standardisation, so that every term of H is exercised.
    with torch.no_grad():
        model.task_head.linear.weight.normal_()
        model.task_head.linear.bias.normal_()
        model.task_head.score_mean.uniform_(0.0, 0.2)
        model.task_head.score_std.uniform_(0.5, 1.5)
        model.absent_baseline.uniform_(0.0, 0.3)
    return model


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(1))
