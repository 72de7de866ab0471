"""The linear base-learner: closed-form inner loop against autograd, meta-gradients, batching."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metatransfer.models.head import (
    BaseLearner,
    adapt_head,
    expand_head,
    head_logits,
    init_head_weight,
    per_class_accuracy,
)

T, N, K, Q, D = 3, 4, 2, 3, 6


def _task(dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    support = torch.randn(T, N * K, D, generator=generator, dtype=dtype)
    query = torch.randn(T, N * Q, D, generator=generator, dtype=dtype)
    support_labels = torch.arange(N).repeat_interleave(K).expand(T, -1)
    query_labels = torch.arange(N).repeat_interleave(Q).expand(T, -1)
    weight = torch.randn(N, D, generator=generator, dtype=dtype) * 0.5
    bias = torch.randn(N, generator=generator, dtype=dtype) * 0.1
    return support, support_labels, query, query_labels, weight, bias


def _reference_adapt(features, labels, weight, bias, steps, lr, create_graph):
    """One task: plain SGD on mean cross-entropy of a linear layer, with autograd."""
    for _ in range(steps):
        loss = F.cross_entropy(F.linear(features, weight, bias), labels)
        grad_weight, grad_bias = torch.autograd.grad(loss, (weight, bias), create_graph=create_graph)
        weight, bias = weight - lr * grad_weight, bias - lr * grad_bias
    return weight, bias


def test_head_logits_is_a_batched_linear_layer():
    support, _, _, _, weight, bias = _task()
    logits = head_logits(support, weight.expand(T, -1, -1), bias.expand(T, -1))
    assert logits.shape == (T, N * K, N)
    assert torch.allclose(logits, F.linear(support, weight, bias))


def test_one_step_equals_autograd_sgd_of_an_nn_linear():
    support, labels, _, _, weight, bias = _task(dtype=torch.float32)
    lr = 0.3
    new_weight, new_bias = adapt_head(support, labels, weight.expand(T, -1, -1), bias.expand(T, -1), steps=1, lr=lr)
    for t in range(T):
        layer = torch.nn.Linear(D, N)
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
        optimizer = torch.optim.SGD(layer.parameters(), lr=lr)
        F.cross_entropy(layer(support[t]), labels[t]).backward()
        optimizer.step()
        assert torch.allclose(new_weight[t], layer.weight, atol=1e-5)
        assert torch.allclose(new_bias[t], layer.bias, atol=1e-5)


@pytest.mark.parametrize("second_order", [False, True])
def test_many_steps_equal_autograd_sgd(second_order):
    support, labels, _, _, weight, bias = _task()
    new_weight, new_bias = adapt_head(
        support, labels, weight.expand(T, -1, -1), bias.expand(T, -1), steps=7, lr=0.5, second_order=second_order
    )
    for t in range(T):
        w, b = _reference_adapt(support[t], labels[t], weight.clone().requires_grad_(), bias.clone().requires_grad_(), 7, 0.5, False)
        assert torch.allclose(new_weight[t], w, atol=1e-10)
        assert torch.allclose(new_bias[t], b, atol=1e-10)


def test_adaptation_lowers_the_support_loss():
    support, labels, _, _, weight, bias = _task()
    weight, bias = weight.expand(T, -1, -1), bias.expand(T, -1)
    before = F.cross_entropy(head_logits(support, weight, bias).flatten(0, 1), labels.flatten())
    adapted = adapt_head(support, labels, weight, bias, steps=20, lr=0.5)
    after = F.cross_entropy(head_logits(support, *adapted).flatten(0, 1), labels.flatten())
    assert after < before


def test_zero_steps_returns_the_initialisation():
    support, labels, _, _, weight, bias = _task()
    w, b = adapt_head(support, labels, weight.expand(T, -1, -1), bias.expand(T, -1), steps=0, lr=0.5)
    assert torch.equal(w, weight.expand(T, -1, -1)) and torch.equal(b, bias.expand(T, -1))


def test_second_order_meta_gradient_matches_unrolled_autograd():
    support, labels, query, query_labels, weight, bias = _task()
    steps, lr = 4, 0.7

    support_a = support.clone().requires_grad_()
    theta_w, theta_b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    w, b = expand_head(theta_w, theta_b, N, T)
    w, b = adapt_head(support_a, labels, w, b, steps=steps, lr=lr, second_order=True)
    loss = F.cross_entropy(head_logits(query, w, b).flatten(0, 1), query_labels.flatten())
    grads = torch.autograd.grad(loss, (support_a, theta_w, theta_b))

    support_r = support.clone().requires_grad_()
    ref_w, ref_b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    losses = []
    for t in range(T):
        w_t, b_t = _reference_adapt(support_r[t], labels[t], ref_w, ref_b, steps, lr, create_graph=True)
        losses.append(F.cross_entropy(F.linear(query[t], w_t, b_t), query_labels[t], reduction="sum"))
    ref_loss = torch.stack(losses).sum() / (T * N * Q)
    ref_grads = torch.autograd.grad(ref_loss, (support_r, ref_w, ref_b))

    assert torch.allclose(loss, ref_loss)
    for ours, reference in zip(grads, ref_grads):
        assert reference.abs().max() > 1e-4  # the gradient is not trivially zero
        assert torch.allclose(ours, reference, atol=1e-4)


def test_first_order_support_gets_no_gradient_and_theta_gets_the_adapted_weight_gradient():
    support, labels, query, query_labels, weight, bias = _task()
    support_a = support.clone().requires_grad_()
    theta_w, theta_b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    w, b = expand_head(theta_w, theta_b, N, T)
    w, b = adapt_head(support_a, labels, w, b, steps=5, lr=0.5, second_order=False)
    w.retain_grad()
    b.retain_grad()
    loss = F.cross_entropy(head_logits(query, w, b).flatten(0, 1), query_labels.flatten())
    loss.backward()
    assert support_a.grad is None  # no path from the query loss to the support features
    assert torch.allclose(theta_w.grad, w.grad.sum(dim=0))  # d adapted / d theta = identity
    assert torch.allclose(theta_b.grad, b.grad.sum(dim=0))
    assert theta_w.grad.abs().max() > 0


def test_first_and_second_order_give_different_theta_gradients():
    support, labels, query, query_labels, weight, bias = _task()
    gradients = []
    for second_order in (False, True):
        theta = weight.clone().requires_grad_()
        w, b = adapt_head(support, labels, theta.expand(T, -1, -1), bias.expand(T, -1), steps=5, lr=0.5, second_order=second_order)
        F.cross_entropy(head_logits(query, w, b).flatten(0, 1), query_labels.flatten()).backward()
        gradients.append(theta.grad)
    assert not torch.allclose(*gradients)


def test_tasks_batched_equal_separate_calls():
    support, labels, _, _, weight, bias = _task()
    # each task its own initial head
    weights = weight.expand(T, -1, -1) + torch.arange(T, dtype=weight.dtype).view(T, 1, 1) * 0.1
    biases = bias.expand(T, -1) - torch.arange(T, dtype=bias.dtype).view(T, 1) * 0.1
    batched_w, batched_b = adapt_head(support, labels, weights, biases, steps=6, lr=0.4)
    for t in range(T):
        w, b = adapt_head(support[t : t + 1], labels[t : t + 1], weights[t : t + 1], biases[t : t + 1], steps=6, lr=0.4)
        assert torch.allclose(batched_w[t], w[0], atol=1e-12)
        assert torch.allclose(batched_b[t], b[0], atol=1e-12)


def test_expand_head_same_way_copies_theta():
    weight, bias = torch.randn(5, 3), torch.randn(5)
    w, b = expand_head(weight, bias, 5, 4)
    assert w.shape == (4, 5, 3) and b.shape == (4, 5)
    assert torch.equal(w[2], weight) and torch.equal(b[3], bias)


def test_expand_head_other_way_starts_every_row_at_the_mean_row():
    weight, bias = torch.randn(5, 3), torch.randn(5)
    w, b = expand_head(weight, bias, 20, 2)
    assert w.shape == (2, 20, 3) and b.shape == (2, 20)
    assert torch.allclose(w, weight.mean(dim=0).expand(2, 20, 3))
    assert torch.allclose(b, bias.mean().expand(2, 20))


def test_per_class_accuracy_on_a_hand_example():
    # one task, 3 classes, 2 queries each; predictions: class 0 both right, class 1 one right, class 2 none
    labels = torch.tensor([[0, 0, 1, 1, 2, 2]])
    predictions = torch.tensor([[0, 0, 1, 2, 0, 1]])
    logits = F.one_hot(predictions, 3).float()
    accuracy = per_class_accuracy(logits, labels, 3)
    assert torch.allclose(accuracy, torch.tensor([[1.0, 0.5, 0.0]]))


def test_per_class_accuracy_per_task():
    labels = torch.tensor([[0, 1], [0, 1]])
    logits = F.one_hot(torch.tensor([[0, 0], [1, 1]]), 2).float()
    assert torch.equal(per_class_accuracy(logits, labels, 2), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))


@pytest.mark.parametrize("kind", ["kaiming", "xavier", "zeros"])
def test_init_head_weight_shapes_and_seeding(kind):
    a = init_head_weight(5, 8, kind, generator=torch.Generator().manual_seed(0))
    b = init_head_weight(5, 8, kind, generator=torch.Generator().manual_seed(0))
    assert a.shape == (5, 8)
    assert torch.equal(a, b)
    assert (a == 0).all() == (kind == "zeros")


def test_init_head_weight_unknown_kind():
    with pytest.raises(ValueError, match="orthogonal"):
        init_head_weight(5, 8, "orthogonal")


# --- BaseLearner: the options on top of the linear inner loop --------------------------------------


def test_base_learner_by_default_is_the_closed_form_linear_loop():
    support, labels, query, _, weight, bias = _task()
    learner = BaseLearner(steps=5, lr=0.5)
    expected = adapt_head(support, labels, *expand_head(weight, bias, N, T), steps=5, lr=0.5)
    adapted = learner.with_theta(weight, bias).adapt(support, labels, N)
    assert all(torch.equal(a, e) for a, e in zip(adapted, expected))
    assert torch.equal(learner.logits_of(query, *adapted), head_logits(query, *expected))


def test_prototype_init_starts_at_the_class_means_plus_theta():
    support, labels, _, _, weight, bias = _task()
    means = torch.stack([support[:, labels[0] == c].mean(1) for c in range(N)], dim=1)  # (T, N, D)
    start, _ = BaseLearner(steps=0, lr=0.1, fc_init="prototypes").with_theta(weight, bias).adapt(support, labels, N)
    assert torch.allclose(start, means + weight)
    shaped = BaseLearner(steps=0, lr=0.1, fc_init="prototypes", prototype_normalise=True)
    start, _ = shaped.with_theta(torch.zeros_like(weight), bias).adapt(support, labels, N)
    assert torch.allclose(start, means / means.norm(dim=-1, keepdim=True))


def test_a_bundle_with_a_removed_prototype_setting_is_read_only_at_its_old_default():
    assert BaseLearner.from_config({"steps": 1, "lr": 0.1, "prototype_centre": False, "prototype_scale": 1.0}).steps == 1
    with pytest.raises(ValueError, match="base_learner.prototype_scale=3.0, an option that has been removed"):
        BaseLearner.from_config({"steps": 1, "lr": 0.1, "prototype_scale": 3.0})


def test_cosine_logits_are_temperature_times_cosine_plus_bias():
    support, _, _, _, weight, bias = _task()
    logits = BaseLearner(steps=0, lr=0.1, logits="cosine", temperature=7.0).logits_of(support, *expand_head(weight, bias, N, T))
    expected = 7.0 * F.cosine_similarity(support.unsqueeze(2), weight.view(1, 1, N, D), dim=-1) + bias
    assert torch.allclose(logits, expected)


def test_cosine_inner_loop_is_gradient_descent_on_each_task_and_lowers_its_loss():
    support, labels, _, _, weight, bias = _task()
    learner = BaseLearner(steps=4, lr=0.3, logits="cosine").with_theta(weight, bias, 5.0)
    adapted_w, adapted_b = learner.adapt(support, labels, N)
    for t in range(T):  # the reference: one task, plain SGD with autograd
        w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        for _ in range(4):
            logits = 5.0 * F.normalize(support[t], dim=-1) @ F.normalize(w, dim=-1).T + b
            grad_w, grad_b = torch.autograd.grad(F.cross_entropy(logits, labels[t]), (w, b))
            w, b = w - 0.3 * grad_w, b - 0.3 * grad_b
        assert torch.allclose(adapted_w[t], w) and torch.allclose(adapted_b[t], b)
    before = F.cross_entropy(learner.logits_of(support, *expand_head(weight, bias, N, T)).flatten(0, 1), labels.flatten())
    after = F.cross_entropy(learner.logits_of(support, adapted_w, adapted_b).flatten(0, 1), labels.flatten())
    assert after < before


def test_cosine_second_order_reaches_features_and_temperature_first_order_only_theta_and_temperature():
    for second_order in (True, False):
        support, labels, query, query_labels, weight, bias = _task()
        support.requires_grad_()
        theta, temperature = weight.clone().requires_grad_(), torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
        learner = BaseLearner(steps=3, lr=0.3, logits="cosine").with_theta(theta, bias, temperature)
        w, b = learner.adapt(support, labels, N, second_order=second_order)
        F.cross_entropy(learner.logits_of(query, w, b).flatten(0, 1), query_labels.flatten()).backward()
        assert theta.grad is not None and theta.grad.abs().sum() > 0 and temperature.grad is not None
        assert (support.grad is not None and support.grad.abs().sum() > 0) == second_order


def test_base_learner_reads_config_and_older_bundles():
    from metatransfer.config import BaseLearnerConfig

    learner = BaseLearner.from_config(BaseLearnerConfig(fc_init="prototypes", logits="cosine", steps=7))
    assert (learner.fc_init, learner.logits, learner.steps) == ("prototypes", "cosine", 7)
    assert BaseLearner.from_config(learner.to_dict()) == learner
    assert BaseLearner.from_config({"steps": 3, "lr": 0.2}) == BaseLearner(steps=3, lr=0.2)  # a bundle from before the options


# --- E3BM: the ensemble over the inner steps ------------------------------------------------------

E3BM_VARIANTS = {  # E3BM's own classifier (cosine, centred features, prototype start) and the linear one of MTL
    "linear": dict(steps=4, lr=0.5),
    "cosine": dict(steps=4, lr=0.5, logits="cosine", fc_init="prototypes", feature_centre=True),
}


def _e3bm(variant: str, init: str = "last", mapping_scale: float = 0.0, seed: int = 0) -> BaseLearner:
    """An E3BM learner in float64; its hyperprior mappings are zero (mapping_scale 0) or large random ones."""
    learner = BaseLearner(**E3BM_VARIANTS[variant], ensemble="e3bm", ensemble_init=init)
    learner = learner.with_untrained_hyperprior(D, torch.Generator().manual_seed(seed))
    learner.hyperprior.double()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in learner.hyperprior.named_parameters():
            if not name.endswith("_init"):
                parameter.copy_(mapping_scale * torch.randn(parameter.shape, generator=generator, dtype=torch.float64))
    return learner


@pytest.mark.parametrize("second_order", [False, True])
@pytest.mark.parametrize("variant", list(E3BM_VARIANTS))
def test_e3bm_with_the_last_step_only_and_fixed_step_sizes_is_the_plain_base_learner(variant, second_order):
    """v = (0, ..., 0, 1) and a_k = lr (hyperprior mappings at zero): the same logits and meta-gradients."""
    support, labels, query, query_labels, weight, bias = _task()
    results = []
    for learner in (_e3bm(variant), BaseLearner(**E3BM_VARIANTS[variant])):
        theta = weight.clone().requires_grad_()
        features = support.clone().requires_grad_()
        learner = learner.with_theta(theta, bias, 5.0)
        w, b = learner.adapt(features, labels, N, second_order=second_order)
        logits = learner.logits_of(query, w, b)
        F.cross_entropy(logits.flatten(0, 1), query_labels.flatten()).backward()
        results.append((logits.detach(), theta.grad, features.grad))
    (ensemble_logits, ensemble_theta, ensemble_features), (plain_logits, plain_theta, plain_features) = results
    torch.testing.assert_close(ensemble_logits, plain_logits, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ensemble_theta, plain_theta, rtol=1e-10, atol=1e-12)
    if second_order:
        torch.testing.assert_close(ensemble_features, plain_features, rtol=1e-10, atol=1e-12)


def _e3bm_reference(learner: BaseLearner, support, labels, query, weight, bias, temperature: float) -> torch.Tensor:
    """One task as E3BM's code runs it: step k's gradient by autograd, a_k and v_k from the hyperprior
    learners on [mean support feature, mean gradient row], and the sum over steps of v_k times the query logits."""
    prior = learner.hyperprior
    if learner.feature_centre:
        support, query = support - support.mean(-1, keepdim=True), query - query.mean(-1, keepdim=True)
    if learner.fc_init == "prototypes":
        weight = weight + torch.stack([support[labels == c].mean(0) for c in range(N)])

    def logits_of(x, w, b):
        if learner.logits == "cosine":
            return temperature * F.normalize(x, dim=-1) @ F.normalize(w, dim=-1).T + b
        return x @ w.T + b

    total = 0.0
    for k in range(learner.steps):
        with torch.enable_grad():
            w, b = weight.detach().requires_grad_(), bias.detach().requires_grad_()
            grad_w, grad_b = torch.autograd.grad(F.cross_entropy(logits_of(support, w, b), labels), (w, b))
        context = torch.cat([support.mean(0), grad_w.mean(0)])
        step_size = prior.step_size_init[k] + 1e-4 * (prior.step_size_weight[k] @ context + prior.step_size_bias[k])
        combination = prior.combination_init[k] + 1e-4 * (prior.combination_weight[k] @ context + prior.combination_bias[k])
        weight, bias = weight - step_size * grad_w, bias - step_size * grad_b
        total = total + combination * logits_of(query, weight, bias)
    return total


@pytest.mark.parametrize("variant", list(E3BM_VARIANTS))
def test_e3bm_is_the_codes_per_task_sum_of_the_steps_query_logits_with_task_conditioned_steps(variant):
    """All tasks at once, one combined head, equal the code's loop task by task; the tasks' step sizes differ."""
    support, labels, query, _, weight, bias = _task()
    learner = _e3bm(variant, init="equal", mapping_scale=300.0)  # large enough to move a_k and v_k visibly
    with torch.no_grad():
        adapted = learner.with_theta(weight, bias, 5.0)
        logits = adapted.logits_of(query, *adapted.adapt(support, labels, N))
        for t in range(T):
            expected = _e3bm_reference(learner, support[t], labels[t], query[t], weight, bias, 5.0)
            torch.testing.assert_close(logits[t], expected, rtol=1e-9, atol=1e-10)
        context = torch.cat([support.mean(1), torch.randn(T, D, dtype=support.dtype)], dim=-1)
        step_sizes, combinations = learner.hyperprior(0, context)
    assert step_sizes.shape == combinations.shape == (T,)
    assert len(set(step_sizes.tolist())) == T and len(set(combinations.tolist())) == T  # one per task
    assert (step_sizes - 0.5).abs().max() > 0.01  # the mapping moves them off their initial values


@pytest.mark.parametrize("second_order", [False, True])
def test_meta_gradients_reach_every_hyperprior_parameter(second_order):
    support, labels, query, query_labels, weight, bias = _task()
    learner = _e3bm("cosine", mapping_scale=1.0).with_theta(weight, bias, 5.0)
    w, b = learner.adapt(support, labels, N, second_order=second_order)
    F.cross_entropy(learner.logits_of(query, w, b).flatten(0, 1), query_labels.flatten()).backward()
    for name, parameter in learner.hyperprior.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_e3bm_learner_round_trips_through_its_tensors_and_refuses_a_checkpoint_without_them():
    support, labels, query, _, weight, bias = _task()
    learner = _e3bm("linear", mapping_scale=10.0)
    learner.hyperprior.float()  # as saved
    tensors = learner.tensors()
    assert set(tensors) == {f"hyperprior.{name}" for name, _ in learner.hyperprior.named_parameters()}
    assert tensors["hyperprior.step_size_weight"].shape == (4, 2 * D)
    settings = learner.to_dict()
    assert "hyperprior" not in settings and settings["ensemble"] == "e3bm"
    loaded = BaseLearner.from_config(settings, {"head.weight": weight, "head.bias": bias, **tensors})
    assert loaded == learner and loaded.theta_weight.equal(weight.float()) and loaded.theta_bias.equal(bias.float())
    learner = learner.with_theta(weight, bias, 1.0)
    with torch.no_grad():
        for one in (learner, loaded.with_theta(weight, bias, 1.0)):
            one_logits = one.logits_of(query, *one.adapt(support, labels, N))
            assert torch.equal(one_logits, learner.logits_of(query, *learner.adapt(support, labels, N)))
    with pytest.raises(ValueError, match="meta-trained without E3BM"):
        BaseLearner.from_config(settings, {"head.weight": weight, "head.bias": bias})
    with pytest.raises(ValueError, match="needs its hyperprior learners"):
        BaseLearner(steps=4, lr=0.5, ensemble="e3bm").with_theta(weight, bias).adapt(support, labels, N)
    with pytest.raises(ValueError, match="meta-trained for 4 inner steps"):
        BaseLearner.from_config({**settings, "steps": 5}, tensors).with_theta(weight, bias).adapt(support, labels, N)


def test_e3bm_starts_at_the_base_rate_with_the_last_step_or_equal_weights():
    for init, expected in (("last", [0.0, 0.0, 1.0]), ("equal", [1 / 3] * 3)):
        learner = BaseLearner(steps=3, lr=0.01, ensemble="e3bm", ensemble_init=init).with_untrained_hyperprior(D)
        assert learner.hyperprior.combination_init.tolist() == pytest.approx(expected)
        assert learner.hyperprior.step_size_init.tolist() == pytest.approx([0.01] * 3)
    assert BaseLearner(steps=3, lr=0.01).with_untrained_hyperprior(D).hyperprior is None
    first = BaseLearner(steps=3, lr=0.01, ensemble="e3bm").with_untrained_hyperprior(D, torch.Generator().manual_seed(4)).tensors()
    again = BaseLearner(steps=3, lr=0.01, ensemble="e3bm").with_untrained_hyperprior(D, torch.Generator().manual_seed(4)).tensors()
    assert all(torch.equal(first[k], again[k]) for k in first)  # seeded: the start is the same wherever it is drawn


# --- BaseLearner owns theta, its temperature and what meta-training learns ------------------------


def test_untrained_learner_is_seeded_and_its_tensors_are_named_as_checkpoints_store_them():
    from metatransfer.config import BaseLearnerConfig

    config = BaseLearnerConfig(init="kaiming", ensemble="e3bm", steps=3)
    one, other = (BaseLearner.untrained(config, D, n_way=N, seed=5) for _ in range(2))
    tensors = one.tensors()
    assert {"head.weight", "head.bias", "head.temperature"} <= set(tensors) and any(k.startswith("hyperprior.") for k in tensors)
    assert all(tensors[k].equal(other.tensors()[k]) for k in tensors)  # the same seed draws the same start
    assert tensors["head.weight"].shape == (N, D) and not tensors["head.bias"].any()
    assert float(tensors["head.temperature"]) == config.temperature
    loaded = BaseLearner.from_config(config, {**tensors, "head.temperature": torch.tensor(4.0)})
    assert loaded == one and loaded.temperature == 4.0 and loaded.theta_weight.equal(one.theta_weight)
    assert all(loaded.tensors()[k].equal(tensors[k]) for k in tensors if k != "head.temperature")


@pytest.mark.parametrize("learn_theta, learn_temperature", [(True, False), (False, True)])
def test_trainable_learner_learns_what_its_settings_say_and_resumes_from_its_tensors(learn_theta, learn_temperature):
    from metatransfer.config import BaseLearnerConfig

    config = BaseLearnerConfig(learn_theta=learn_theta, learn_temperature=learn_temperature)
    learner = BaseLearner.untrained(config, D, n_way=N, seed=0).trainable(torch.device("cpu"))
    expected = ([learner.theta_weight, learner.theta_bias] if learn_theta else []) + ([learner.temperature] if learn_temperature else [])
    assert [id(p) for p in learner.head_parameters()] == [id(p) for p in expected]
    learned = {id(p) for p in expected}
    assert all(p.requires_grad == (id(p) in learned) for p in (learner.theta_weight, learner.theta_bias, learner.temperature))
    saved = {"head.weight": torch.ones(N, D), "head.bias": torch.ones(N), "head.temperature": torch.tensor(3.0)}
    learner.load_tensors_(saved)
    assert learner.theta_weight.eq(1).all() and float(learner.temperature.detach()) == 3.0
    assert not learner.detached().theta_weight.requires_grad


def test_untrained_theta_and_hyperprior_layers_come_from_different_draws_and_theta_is_the_plain_learner_s():
    """theta and the hyperprior's kaiming layers are drawn in turn from one generator: the layers are not
    a rescaled copy of theta, and theta is what the plain learner (no E3BM) starts at for the same seed."""
    from metatransfer.config import BaseLearnerConfig

    e3bm = BaseLearner.untrained(BaseLearnerConfig(init="kaiming", ensemble="e3bm", steps=3), D, n_way=N, seed=5)
    plain = BaseLearner.untrained(BaseLearnerConfig(init="kaiming", steps=3), D, n_way=N, seed=5)
    assert e3bm.theta_weight.equal(plain.theta_weight)
    theta = e3bm.theta_weight.flatten()
    for layer in (e3bm.hyperprior.step_size_weight, e3bm.hyperprior.combination_weight):
        drawn = layer.detach().flatten()[: theta.numel()]
        assert not torch.allclose(theta, 2**0.5 * drawn) and abs(torch.corrcoef(torch.stack([theta, drawn]))[0, 1]) < 0.5


def test_moving_a_learner_copies_its_hyperprior_and_leaves_the_original_where_it_was():
    from metatransfer.config import BaseLearnerConfig

    learner = BaseLearner.untrained(BaseLearnerConfig(init="kaiming", ensemble="e3bm", steps=3), D, n_way=N, seed=0)
    before = {k: v.clone() for k, v in learner.tensors().items()}
    for moved in (learner.to(torch.float64), learner.to("meta"), learner.trainable(torch.device("meta"))):
        assert moved.hyperprior is not learner.hyperprior
    assert learner.to(torch.float64).hyperprior.step_size_weight.dtype == torch.float64
    assert learner.to("meta").hyperprior.step_size_weight.device.type == "meta"
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in learner.hyperprior.parameters())
    assert all(learner.tensors()[k].equal(before[k]) for k in before)


def test_hyperprior_tensors_missing_or_partial_are_refused_naming_the_file_and_the_keys():
    from metatransfer.config import BaseLearnerConfig

    config = BaseLearnerConfig(init="kaiming", ensemble="e3bm", steps=3)
    tensors = BaseLearner.untrained(config, D, n_way=N, seed=0).tensors()
    theta = {k: v for k, v in tensors.items() if k.startswith("head.")}
    with pytest.raises(ValueError, match="checkpoint /runs/x/meta_train/best holds no hyperprior"):
        BaseLearner.from_config(config, theta, source="checkpoint /runs/x/meta_train/best")
    partial = {k: v for k, v in tensors.items() if k != "hyperprior.combination_init"}
    with pytest.raises(ValueError, match=r"bundle /b/head.safetensors .*missing hyperprior\.combination_init"):
        BaseLearner.from_config(config, partial, source="bundle /b/head.safetensors")
    learner = BaseLearner.untrained(config, D, n_way=N, seed=1).trainable(torch.device("cpu"))
    with pytest.raises(ValueError, match=r"missing hyperprior\.combination_init"):
        learner.load_tensors_(partial)
    learner.load_tensors_(tensors)  # the whole set loads
    assert all(learner.tensors()[k].equal(tensors[k]) for k in tensors if k != "head.temperature")
