import pytest
import torch

from mnist_tune.errors import MnistTuneError
from mnist_tune.models import MLP, Dropout, MLPMixer, build_model


@pytest.mark.parametrize("hp", [{}, {"hidden_sizes": (256,)}, {"hidden_sizes": (64, 64, 32), "dropout": 0.5}])
def test_mlp_shapes(hp):
    model = build_model("mlp", **hp)
    assert model(torch.rand(5, 1, 28, 28)).shape == (5, 10)


def test_mlp_is_the_seed_architecture():
    linears = [m for m in build_model("mlp") if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 100), (100, 80), (80, 10)]
    drops = [m.p for m in build_model("mlp", dropout=0.3) if isinstance(m, torch.nn.Dropout)]
    assert drops == [0.3, 0.3]


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_is_inverted_bernoulli_dropout(p):
    """The CPU mask path: each element kept with probability 1 - p and scaled by 1/(1 - p), the
    gradient masked the same way; in eval mode the identity."""
    torch.manual_seed(0)
    layer = Dropout(p)
    x = (torch.rand(400, 1000) + 1).requires_grad_()  # no zeros: a zero output means dropped
    y = layer(x)
    kept = y != 0
    assert kept.float().mean().item() == pytest.approx(1 - p, abs=0.005)  # 400k draws: std < 0.001
    torch.testing.assert_close(y[kept], (x / (1 - p))[kept])
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / (1 - p))
    assert torch.equal(layer.eval()(x), x)


def test_dropout_edge_cases_follow_nn_dropout():
    x = torch.rand(50, 50) + 1
    assert torch.equal(Dropout(0.0)(x), x)
    assert torch.equal(Dropout(1.0)(x), torch.zeros_like(x))  # no 1/0 scale
    y = x.clone()
    assert Dropout(0.5, inplace=True)(y) is y and (y == 0).any()  # in place, as asked
    half = Dropout(0.5)(x.bfloat16())  # bf16 (autocast) goes through nn.Dropout
    assert half.dtype == torch.bfloat16 and 0.4 < (half == 0).float().mean().item() < 0.6


def test_both_models_use_the_fast_dropout():
    for model in (build_model("mlp", dropout=0.1), build_model("mixer", depth=2, dropout=0.1)):
        drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
        assert drops and all(type(m) is Dropout for m in drops)


@pytest.mark.parametrize("hp", [
    {"patch_size": 7, "dim": 32, "depth": 1},
    {"patch_size": 4, "dim": 16, "depth": 2, "token_expansion": 0.5, "channel_expansion": 2},
    {"patch_size": 14, "dim": 8, "depth": 3, "dropout": 0.1},
])
def test_mixer_shapes(hp):
    model = build_model("mixer", **hp)
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)


def test_mixer_expansions_scale_the_right_mlp():
    model = MLPMixer(patch_size=7, dim=32, depth=1, token_expansion=2, channel_expansion=4)
    block = model[3]
    token_ff, channel_ff = block[0].fn[1], block[1].fn
    assert token_ff[0].in_features == 16 and token_ff[0].out_features == 32   # 16 patches x 2
    assert channel_ff[0].in_features == 32 and channel_ff[0].out_features == 128  # dim 32 x 4


@pytest.mark.parametrize("patch", [5, 0, 3])
def test_bad_patch_size_is_a_clear_error(patch):
    with pytest.raises(MnistTuneError, match="must divide the image size 28"):
        build_model("mixer", patch_size=patch)


def test_unknown_model_and_parameter():
    with pytest.raises(MnistTuneError, match="unknown model 'cnn'"):
        build_model("cnn")
    with pytest.raises(MnistTuneError, match="patch_size"):
        build_model("mlp", patch_size=7)


def test_models_normalise_their_own_input():
    model = MLP().eval()
    x = torch.full((2, 1, 28, 28), 0.1307)  # the mean pixel maps to zero input
    first = model[2]
    with torch.no_grad():
        assert torch.allclose(torch.nn.Sequential(*list(model)[:3])(x), first.bias.expand(2, -1), atol=1e-5)


def test_builders_take_exactly_the_model_tunables():
    """tunables.TUNABLES is the one list of hyperparameters: each builder's keywords are its model ones."""
    import inspect

    from mnist_tune.models import MODELS
    from mnist_tune.tunables import MODEL_NAMES, TUNABLES

    assert tuple(MODELS) == MODEL_NAMES
    for name, builder in MODELS.items():
        keywords = {p.name for p in inspect.signature(builder.__init__).parameters.values()
                    if p.kind is inspect.Parameter.KEYWORD_ONLY}
        assert keywords == {t.name for t in TUNABLES.values() if t.setting == "model" and name in t.models}, name
