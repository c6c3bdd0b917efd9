"""Merge engine: methods against mergekit 0.1.5 tensor by tensor, exact maths, settings, in-place swaps.

The comparisons call mergekit's own merge methods (``mergekit.merge_methods.get``) on
real SmolLM2 tensors with seeded perturbations. Whole-checkpoint runs of mergekit are in
``test_merge_mergekit.py``.
"""

import math

import pytest
import torch
from mergekit.config import ConditionalParameter
from mergekit.config import evaluate_setting as mergekit_evaluate_setting
from mergekit.merge_methods import TensorGroup
from mergekit.merge_methods import get as mergekit_method
from mergekit.sparsify import bernoulli, della_magprune, magnitude, magnitude_outliers

from hm_utils.merge import (
    METHODS,
    TaskVectors,
    apply_delta_,
    decoder_layer_of,
    load_state_dict,
    merge_deltas,
    merge_tensor,
)
from hm_utils.merge.params import evaluate_setting, layer_position
from hm_utils.merge.sparsify import della_prune, kth_largest, magnitude_prune, outlier_prune, random_prune

@pytest.fixture(autouse=True, scope="module")
def single_thread():
    # Two torch threads on a CPU shared with other jobs run several times slower than one.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


REAL_TENSORS = [
    "model.layers.3.self_attn.k_proj.weight",
    "model.layers.3.mlp.down_proj.weight",
    "model.layers.3.input_layernorm.weight",
]


@pytest.fixture(scope="module")
def real_tensors(base_checkpoint):
    """Three real base tensors and, per tensor, three perturbed versions (dense plus rank-2 noise)."""
    base = load_state_dict(base_checkpoint, names=REAL_TENSORS)
    generator = torch.Generator().manual_seed(7)
    variants = {}
    for name, tensor in base.items():
        versions = []
        for _ in range(3):
            noise = torch.randn(tensor.shape, generator=generator) * 1e-3
            if tensor.dim() == 2:
                noise += torch.randn(tensor.shape[0], 2, generator=generator) @ torch.randn(2, tensor.shape[1], generator=generator) * 2e-3
            versions.append(tensor + noise)
        variants[name] = versions
    return base, variants


def boundary_ties(delta, low_rank, high_rank):
    """Positions whose |delta| equals a kept-range boundary value that occurs more than once.

    The kept entries are ascending magnitude ranks [low_rank, high_rank] (0-based).
    mergekit breaks ties by an unstable sort and the engine by flat index, so the two
    may keep different members of a tied group, and only there.
    """
    magnitudes = delta.abs().reshape(-1)
    ascending = torch.sort(magnitudes).values
    positions = torch.zeros_like(magnitudes, dtype=torch.bool)
    for rank in (low_rank, high_rank):
        value = ascending[rank]
        same = magnitudes == value
        if int(same.sum()) > 1:
            positions |= same
    return positions.reshape(delta.shape)


def magnitude_ties(delta, density):
    n = delta.numel()
    k = max(1, int(density * n))
    return boundary_ties(delta, n - k, n - 1)


def outlier_ties(delta, density, gamma):
    n = delta.numel()
    keep = int(density * n)
    bottom = max(0, n - keep - int(gamma * n))
    return boundary_ties(delta, bottom, bottom + keep - 1)


def mergekit_result(method, base, tensors, **parameters):
    if base is None:
        group = TensorGroup.from_tensors(tensors)
    else:
        group = TensorGroup.from_tensors([base, *tensors], base_index=0)
    (result,) = mergekit_method(method)([group], parameters=parameters)
    return result


# --- layers and settings -------------------------------------------------------------


def test_decoder_layer_of_names():
    assert decoder_layer_of("model.layers.0.self_attn.q_proj.weight") == 0
    assert decoder_layer_of("model.layers.29.mlp.down_proj.weight") == 29
    assert decoder_layer_of("transformer.h.11.attn.c_attn.weight") == 11
    assert decoder_layer_of("model.embed_tokens.weight") is None
    assert decoder_layer_of("model.norm.weight") is None
    assert decoder_layer_of("lm_head.weight") is None


@pytest.mark.parametrize(
    "setting",
    [
        0.5,
        [0.1, 0.9],
        [0.1, 0.5, 0.2, 0.8],
        [0.01 * i for i in range(30)],
        [{"filter": "mlp", "value": [0.2, 0.4]}, {"value": 0.7}],
        [{"filter": "self_attn", "value": 0.3}],
    ],
)
def test_settings_match_mergekit(setting):
    # mergekit's YAML schema turns filter entries into ConditionalParameter objects.
    mergekit_setting = setting
    if isinstance(setting, list) and isinstance(setting[0], dict):
        mergekit_setting = [ConditionalParameter(**entry) for entry in setting]
    for tensor_name in ("model.layers.7.mlp.up_proj.weight", "model.layers.20.self_attn.q_proj.weight"):
        for layer in (0, 7, 13, 29):
            t = layer / 29
            expected = mergekit_evaluate_setting(tensor_name, mergekit_setting, t, validate=float)
            assert evaluate_setting(setting, tensor_name, t) == expected


def test_gradient_of_layer_count_gives_layer_values():
    values = [0.1 + 0.02 * i for i in range(30)]
    for layer in range(30):
        t = layer_position(f"model.layers.{layer}.mlp.up_proj.weight", 30)
        assert evaluate_setting(values, "x", t) == pytest.approx(values[layer], rel=1e-12)


def test_layer_position_non_layer_is_zero():
    assert layer_position("model.embed_tokens.weight", 30) == 0.0
    assert layer_position("model.norm.weight", 30) == 0.0
    assert layer_position("model.layers.29.mlp.up_proj.weight", 30) == 1.0


# --- sparsification against mergekit ----------------------------------------------------


@pytest.mark.parametrize("size", [1000, 100_000, 3_000_000])
@pytest.mark.parametrize("distribution", ["normal", "ties", "zeros_half"])
def test_kth_largest_exact(size, distribution):
    generator = torch.Generator().manual_seed(size)
    if distribution == "normal":
        values = torch.randn(size, generator=generator).abs()
    elif distribution == "ties":
        values = torch.randint(0, 50, (size,), generator=generator).float()
    else:
        values = torch.randn(size, generator=generator).abs()
        values[: size // 2] = 0
    for k in (1, size // 10, size // 2, size - 1, size):
        expected = torch.sort(values, descending=True).values[k - 1]
        assert kth_largest(values, k) == expected


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_magnitude_prune_matches_mergekit(real_tensors, density):
    # Real fp32 deltas: the two kept sets can differ only where |delta| equals the threshold.
    base, variants = real_tensors
    for name in REAL_TENSORS:
        delta = variants[name][0] - base[name]
        ours = magnitude_prune(delta, density)
        theirs = magnitude(delta, density)
        ties = magnitude_ties(delta, density)
        assert torch.equal(ours[~ties], theirs[~ties])
        assert int(torch.count_nonzero(ours)) == int(torch.count_nonzero(theirs))


def test_magnitude_prune_ties_keep_k():
    delta = torch.tensor([3.0, -1.0, 1.0, 1.0, -1.0, 0.5, 2.0, 1.0])
    pruned = magnitude_prune(delta, 0.5)
    assert int(torch.count_nonzero(pruned)) == 4
    assert pruned.tolist() == [3.0, -1.0, 1.0, 0.0, 0.0, 0.0, 2.0, 0.0]


def test_magnitude_prune_rescale_l1(real_tensors):
    base, variants = real_tensors
    delta = variants[REAL_TENSORS[1]][1] - base[REAL_TENSORS[1]]
    pruned = magnitude_prune(delta, 0.3, rescale=True)
    ties = magnitude_ties(delta, 0.3)
    # A tie swap can reorder the L1 sum, so the scale factor may differ in the last bit.
    assert torch.allclose(pruned[~ties], magnitude(delta, 0.3, rescale_norm="l1")[~ties], rtol=1e-6, atol=0)
    assert float(pruned.abs().sum()) == pytest.approx(float(delta.abs().sum()), rel=1e-5)


@pytest.mark.parametrize("density,gamma", [(0.5, 0.01), (0.8, 0.05), (0.3, 0.0)])
def test_outlier_prune_matches_mergekit(real_tensors, density, gamma):
    base, variants = real_tensors
    for name in REAL_TENSORS:
        delta = variants[name][2] - base[name]
        ours = outlier_prune(delta, density, gamma)
        theirs = magnitude_outliers(delta, density, gamma=gamma)
        ties = outlier_ties(delta, density, gamma)
        assert torch.equal(ours[~ties], theirs[~ties])
        assert int(torch.count_nonzero(ours)) == int(torch.count_nonzero(theirs))


@pytest.mark.parametrize("rescale", [True, False])
def test_random_prune_same_draws(real_tensors, rescale):
    base, variants = real_tensors
    delta = variants[REAL_TENSORS[1]][0] - base[REAL_TENSORS[1]]
    torch.manual_seed(11)
    theirs = bernoulli(delta, 0.4, rescale_norm="l1" if rescale else None)
    torch.manual_seed(11)
    ours = random_prune(delta, 0.4, rescale)
    assert torch.equal(ours, theirs)


def test_random_prune_keeps_density_fraction(real_tensors):
    base, variants = real_tensors
    delta = variants[REAL_TENSORS[1]][0] - base[REAL_TENSORS[1]]
    kept = random_prune(delta, 0.3, rescale=False, generator=torch.Generator().manual_seed(0))
    fraction = int(torch.count_nonzero(kept)) / delta.numel()
    standard_error = math.sqrt(0.3 * 0.7 / delta.numel())
    assert abs(fraction - 0.3) < 5 * standard_error
    assert torch.equal(kept[kept != 0], delta[kept != 0])


@pytest.mark.parametrize("name", REAL_TENSORS)
def test_della_prune_same_draws(real_tensors, name):
    base, variants = real_tensors
    delta = variants[name][1] - base[name]
    torch.manual_seed(5)
    theirs = della_magprune(delta, 0.5, 0.2, rescale_norm="l1")
    torch.manual_seed(5)
    ours = della_prune(delta, 0.5, 0.2, rescale=True)
    assert torch.equal(ours, theirs)


def test_della_rejects_epsilon_too_large():
    with pytest.raises(ValueError, match="epsilon"):
        della_prune(torch.randn(4, 4), 0.5, 0.5)


# --- whole methods against mergekit ------------------------------------------------------------


DETERMINISTIC_CASES = [
    ("task_arithmetic", {}),
    ("task_arithmetic", {"normalize": True, "lambda": 0.7}),
    ("ties", {}),
    ("ties", {"normalize": False, "rescale": True}),
    ("breadcrumbs", {}),
    ("breadcrumbs_ties", {"gamma": 0.02}),
]


@pytest.mark.parametrize("method,options", DETERMINISTIC_CASES)
def test_method_matches_mergekit(real_tensors, method, options):
    # After sparsification the engine runs mergekit's float32 operations in the same
    # order, so the results are bit-identical except at entries where magnitude ties at
    # a trim boundary let the two pick different members (see boundary_ties). With
    # rescale, such a swap can move the L1 scale factor by one rounding step.
    base, variants = real_tensors
    weights = [1.0, 0.6, -0.3]
    densities = [0.5, 0.7, 0.9]
    shared = {key: value for key, value in options.items() if key != "gamma"}
    gamma = options.get("gamma", 0.01)
    per_model = {"gamma": [gamma] * 3} if "gamma" in options else {}
    sparsification = METHODS[method].sparsification
    for name in REAL_TENSORS:
        tensors = variants[name]
        deltas = [tensor - base[name] for tensor in tensors]
        theirs = mergekit_result(method, base[name], tensors, weight=weights, density=densities, **shared, **per_model)
        delta = merge_tensor(
            deltas,
            method,
            weights,
            densities,
            normalize=shared.get("normalize"),
            rescale=shared.get("rescale"),
            scale=shared.get("lambda", 1.0),
            gammas=per_model.get("gamma"),
        )
        ours = base[name] + delta

        ties = torch.zeros_like(ours, dtype=torch.bool)
        for model_delta, density in zip(deltas, densities):
            if sparsification is not None and sparsification.value == "magnitude":
                ties |= magnitude_ties(model_delta, density)
            elif sparsification is not None:
                ties |= outlier_ties(model_delta, density, gamma)
        assert int(ties.sum()) < 100
        if shared.get("rescale"):
            # Entries whose elected-sign sum is zero up to rounding may flip sign with a
            # one-step change of the scale factor; they are excluded too.
            kept = torch.stack([magnitude(d, p, rescale_norm="l1") * w for d, p, w in zip(deltas, densities, weights)])
            undecided = kept.sum(0).abs() <= 1e-6 * kept.abs().sum(0)
            differ = ~torch.isclose(ours, theirs, rtol=1e-5, atol=1e-7)
            assert not torch.any(differ & ~ties & ~undecided), name
        else:
            assert torch.equal(ours[~ties], theirs[~ties]), name


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_random_method_same_seed(real_tensors, method):
    base, variants = real_tensors
    weights = [0.8, 0.5, 0.4]
    densities = [0.5, 0.6, 0.7]
    for name in REAL_TENSORS:
        tensors = variants[name]
        torch.manual_seed(3)
        theirs = mergekit_result(method, base[name], tensors, weight=weights, density=densities)
        torch.manual_seed(3)
        delta = merge_tensor([tensor - base[name] for tensor in tensors], method, weights, densities)
        assert torch.equal(base[name] + delta, theirs)


@pytest.mark.parametrize("normalize", [True, False])
def test_linear_matches_mergekit(real_tensors, normalize):
    # mergekit averages the full weights; the engine averages deltas and adds the base,
    # which differs only by float32 rounding.
    base, variants = real_tensors
    weights = [0.5, 0.3, 0.4]
    for name in REAL_TENSORS:
        tensors = variants[name]
        theirs = mergekit_result("linear", None, tensors, weight=weights, normalize=normalize)
        delta = merge_tensor([tensor - base[name] for tensor in tensors], "linear", weights, base=base[name], normalize=normalize)
        assert torch.allclose(base[name] + delta, theirs, rtol=1e-6, atol=1e-7)


# --- exact values fixed by the maths ---------------------------------------------------------------


@pytest.fixture(scope="module")
def small_deltas():
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(64, 48, generator=generator) for _ in range(3)]


def test_task_arithmetic_weighted_sum(small_deltas):
    weights = [1.0, 0.5, -0.25]
    merged = merge_tensor(small_deltas, "task_arithmetic", weights)
    expected = sum(weight * delta for weight, delta in zip(weights, small_deltas))
    assert torch.allclose(merged, expected, rtol=0, atol=1e-6)


def test_task_arithmetic_lambda_scales(small_deltas):
    plain = merge_tensor(small_deltas, "task_arithmetic", [1.0, 1.0, 1.0])
    scaled = merge_tensor(small_deltas, "task_arithmetic", [1.0, 1.0, 1.0], scale=0.5)
    assert torch.equal(scaled, plain * 0.5)


def test_linear_weighted_mean(small_deltas):
    weights = [3.0, 1.0, 1.0]
    merged = merge_tensor(small_deltas, "linear", weights)
    expected = (3 * small_deltas[0] + small_deltas[1] + small_deltas[2]) / 5
    assert torch.allclose(merged, expected, rtol=0, atol=1e-6)


def test_ties_density_one_sign_elected_mean(small_deltas):
    merged = merge_tensor(small_deltas, "ties", [1.0, 1.0, 1.0], [1.0, 1.0, 1.0])
    stacked = torch.stack(small_deltas)
    elected = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = torch.sign(stacked) == elected
    expected = (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)
    assert torch.allclose(merged, expected, rtol=0, atol=1e-6)


def test_ties_single_model_unnormalized_scales(small_deltas):
    # Model-wise pruning and scaling: one model, no normalisation gives s * top_p(delta).
    merged = merge_tensor(small_deltas[:1], "ties", [0.9], [0.1], normalize=False)
    assert torch.equal(merged, magnitude_prune(small_deltas[0], 0.1) * 0.9)


def test_dare_linear_density_one_is_task_arithmetic(small_deltas):
    dare = merge_tensor(small_deltas, "dare_linear", [1.0, 0.5, 0.2], [1.0, 1.0, 1.0])
    plain = merge_tensor(small_deltas, "task_arithmetic", [1.0, 0.5, 0.2])
    assert torch.equal(dare, plain)


def test_unknown_method_lists_valid(small_deltas):
    with pytest.raises(ValueError, match="valid methods: linear, task_arithmetic, ties"):
        merge_tensor(small_deltas, "slerp", [1.0, 1.0, 1.0])


def test_methods_cover_mergekit_family():
    assert set(METHODS) == {
        "linear",
        "task_arithmetic",
        "ties",
        "dare_ties",
        "dare_linear",
        "breadcrumbs",
        "breadcrumbs_ties",
        "della",
        "della_linear",
    }
    for name, spec in METHODS.items():
        mergekit_names = {parameter.name for parameter in mergekit_method(name).spec.parameters}
        assert set(spec.parameter_names) == mergekit_names, name


# --- task vectors, per-layer settings, in-place swaps ------------------------------------------------


@pytest.fixture(scope="module")
def task_vectors():
    """Task vectors of a 4-layer toy state (names follow the Llama layout)."""
    generator = torch.Generator().manual_seed(2)
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    names += [f"model.layers.{layer}.mlp.up_proj.weight" for layer in range(4)]
    names += [f"model.layers.{layer}.self_attn.q_proj.weight" for layer in range(4)]
    base = {name: torch.randn(12, 8, generator=generator) for name in names}
    specialists = [
        {name: tensor + 0.1 * torch.randn(tensor.shape, generator=generator) for name, tensor in base.items()}
        for _ in range(2)
    ]
    return TaskVectors.from_checkpoints(base, specialists, names=["a", "b"])


def test_task_vectors_deltas(task_vectors):
    assert task_vectors.names == ["a", "b"]
    assert task_vectors.num_layers == 4
    assert len(task_vectors) == 2
    assert set(task_vectors.deltas[0]) == set(task_vectors.base)


def test_merge_deltas_per_layer_lists(task_vectors):
    densities = {"a": [0.2, 0.4, 0.6, 0.8], "b": 0.5}
    weights = [[1.0, 0.5, 0.5, 1.0], 0.3]
    merged = merge_deltas(task_vectors, "ties", weights, densities, normalize=False)
    for name, delta in merged.items():
        layer = decoder_layer_of(name)
        index = 0 if layer is None else layer
        expected = merge_tensor(
            [deltas[name] for deltas in task_vectors.deltas],
            "ties",
            [[1.0, 0.5, 0.5, 1.0][index], 0.3],
            [[0.2, 0.4, 0.6, 0.8][index], 0.5],
            normalize=False,
        )
        assert torch.allclose(delta, expected, rtol=1e-6, atol=1e-7), name


def test_merge_deltas_filter_settings(task_vectors):
    weights = [[{"filter": "mlp", "value": 2.0}, {"value": 1.0}]] * 2
    merged = merge_deltas(task_vectors, "task_arithmetic", weights)
    for name, delta in merged.items():
        weight = 2.0 if "mlp" in name else 1.0
        expected = weight * (task_vectors.deltas[0][name] + task_vectors.deltas[1][name])
        assert torch.allclose(delta, expected, rtol=0, atol=1e-6), name


def test_merge_deltas_layers_subset(task_vectors):
    merged = merge_deltas(task_vectors, "task_arithmetic", 1.0, layers=[2])
    assert sorted(merged) == ["model.layers.2.mlp.up_proj.weight", "model.layers.2.self_attn.q_proj.weight"]


def test_merge_deltas_rejects_bad_density(task_vectors):
    with pytest.raises(ValueError, match="outside \\(0, 1\\]"):
        merge_deltas(task_vectors, "ties", 1.0, [0.5, [0.5, 1.5]])


def test_merge_deltas_rejects_zero_density(task_vectors):
    with pytest.raises(ValueError, match="outside \\(0, 1\\]"):
        merge_deltas(task_vectors, "ties", 1.0, 0.0)


def test_merge_deltas_rejects_unknown_option(task_vectors):
    with pytest.raises(ValueError, match="valid parameters: int8_mask, normalize, rescale, lambda, weight, density"):
        merge_deltas(task_vectors, "ties", 1.0, 0.5, temperature=2.0)


def test_merge_deltas_rejects_nan_weight(task_vectors):
    with pytest.raises(ValueError, match="non-finite"):
        merge_deltas(task_vectors, "task_arithmetic", [1.0, float("nan")])


def test_merge_deltas_rejects_wrong_model_count(task_vectors):
    with pytest.raises(ValueError, match="3 entries for 2 models"):
        merge_deltas(task_vectors, "task_arithmetic", [1.0, 1.0, 1.0])


def test_task_vectors_reject_nan():
    base = {"model.layers.0.mlp.up_proj.weight": torch.zeros(2, 2)}
    bad = {"model.layers.0.mlp.up_proj.weight": torch.tensor([[0.0, float("nan")], [0.0, 0.0]])}
    with pytest.raises(ValueError, match="NaN or infinity"):
        TaskVectors.from_checkpoints(base, [bad])


def test_task_vectors_reject_missing_tensor():
    base = {"a.weight": torch.zeros(2), "b.weight": torch.zeros(2)}
    with pytest.raises(ValueError, match="missing \\['b.weight'\\]"):
        TaskVectors.from_checkpoints(base, [{"a.weight": torch.ones(2)}])


@pytest.fixture(scope="module")
def real_model(base_checkpoint):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_checkpoint, dtype=torch.float32)


@pytest.fixture(scope="module")
def real_task_vectors(base_checkpoint):
    """Base state of the real checkpoint and one specialist perturbing layers 3 and 4 only."""
    base = load_state_dict(base_checkpoint)
    generator = torch.Generator().manual_seed(4)
    specialist = {
        name: tensor + 1e-2 * torch.randn(tensor.shape, generator=generator) if decoder_layer_of(name) in (3, 4) else tensor
        for name, tensor in base.items()
    }
    return TaskVectors.from_checkpoints(base, [specialist], names=["s"])


def test_apply_delta_layers_only(real_model, real_task_vectors):
    tv = real_task_vectors
    delta = merge_deltas(tv, "task_arithmetic", 1.0)
    written = apply_delta_(real_model, tv.base, delta, layers=[3])
    parameters = dict(real_model.named_parameters())
    assert written == tv.layer_tensor_names([3])
    for name in written:
        assert torch.equal(parameters[name].data, tv.base[name] + delta[name]), name
    untouched = tv.layer_tensor_names([4])
    for name in untouched:
        assert torch.equal(parameters[name].data, tv.base[name]), name

    apply_delta_(real_model, tv.base, {})
    for name in written:
        assert torch.equal(parameters[name].data, tv.base[name]), name


def test_apply_delta_whole_model_matches_loaded(real_model, real_task_vectors, tmp_path):
    tv = real_task_vectors
    delta = merge_deltas(tv, "task_arithmetic", 0.5)
    apply_delta_(real_model, tv.base, delta)
    state = real_model.state_dict()
    for name in tv.tensor_names:
        assert torch.equal(state[name], tv.base[name] + delta[name]), name
    apply_delta_(real_model, tv.base, {})


def test_apply_delta_bfloat16_rounds_sum():
    model = torch.nn.Linear(4, 3, bias=False).to(torch.bfloat16)
    base = {"weight": torch.full((3, 4), 1.0)}
    delta = {"weight": torch.full((3, 4), 1e-3)}
    apply_delta_(model, base, delta)
    assert torch.equal(model.weight.data, torch.full((3, 4), 1.001).to(torch.bfloat16))


def test_apply_delta_rejects_unknown_name():
    model = torch.nn.Linear(4, 3, bias=False)
    with pytest.raises(KeyError, match="no tensors named"):
        apply_delta_(model, {"other.weight": torch.zeros(3, 4)}, {})
