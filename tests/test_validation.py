"""Argument validation (issue 6, item 1): misuse raises ``TypeError``/``ValueError`` naming the argument.

Every test checks the exception type and that the message names the offending argument, and runs with
the op and the reference replaced by functions that fail the test, so a check that happens only inside a
kernel (or not at all) is caught: validation must come before any kernel runs.
"""

from __future__ import annotations

import pytest
import torch

import kdkernels as kd
from kdkernels.torch_ops import functional

N, V = 3, 8


def _kernel_reached(*args, **kwargs):
    raise AssertionError("a kernel ran before the arguments were validated")


@pytest.fixture(autouse=True)
def no_kernels(monkeypatch):
    """Make any kernel launch (custom op or reference) fail the test."""
    monkeypatch.setattr(functional, "kd_forward", _kernel_reached)
    monkeypatch.setattr(functional, "kd_loss_reference", _kernel_reached)


def logits(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(dtype=dtype, device=device)


def check(exc_type, names, /, *args, **kwargs):
    """``kd.kd_loss(*args, **kwargs)`` raises ``exc_type`` and its message contains every one of ``names``."""
    with pytest.raises(exc_type) as info:
        kd.kd_loss(*args, **kwargs)
    for name in names:
        assert name in str(info.value), (name, str(info.value))


def test_shape_mismatch():
    """Student and teacher of different shapes: ValueError naming both."""
    check(ValueError, ["teacher_logits", "student_logits"], logits(N, V), logits(N, V + 1))
    check(ValueError, ["teacher_logits", "student_logits"], logits(2, N, V), logits(N * 2, V))


def test_labels_wrong_shape():
    """Labels must have the logits' leading shape."""
    check(ValueError, ["labels"], logits(N, V), logits(N, V), labels=torch.zeros(N + 1, dtype=torch.long))
    check(ValueError, ["labels"], logits(2, N, V), logits(2, N, V), labels=torch.zeros(2 * N, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool, torch.complex64])
def test_labels_wrong_dtype(dtype):
    """Float, boolean or complex labels: TypeError naming labels."""
    check(TypeError, ["labels"], logits(N, V), logits(N, V), labels=torch.zeros(N, dtype=dtype))


def test_labels_not_a_tensor():
    """A list of labels is refused (TypeError), not silently converted."""
    check(TypeError, ["labels"], logits(N, V), logits(N, V), labels=[0] * N)


def test_ignore_index_not_an_int():
    """ignore_index must be a Python int."""
    labels = torch.zeros(N, dtype=torch.long)
    check(TypeError, ["ignore_index"], logits(N, V), logits(N, V), labels=labels, ignore_index=-100.0)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
@pytest.mark.parametrize("which", ["student_logits", "teacher_logits"])
def test_integer_logits(which, dtype):
    """Integer (or boolean) logits: TypeError naming the argument."""
    args = {"student_logits": logits(N, V), "teacher_logits": logits(N, V)}
    args[which] = args[which].to(dtype)
    check(TypeError, [which], args["student_logits"], args["teacher_logits"])


@pytest.mark.parametrize("which", ["student_logits", "teacher_logits"])
def test_complex_logits(which):
    """Complex logits: TypeError naming the argument."""
    args = {"student_logits": logits(N, V), "teacher_logits": logits(N, V)}
    args[which] = args[which].to(torch.complex64)
    check(TypeError, [which], args["student_logits"], args["teacher_logits"])


@pytest.mark.parametrize("which", ["student_logits", "teacher_logits"])
def test_logits_not_a_tensor(which):
    """A list or a NumPy-like object instead of a tensor: TypeError naming the argument."""
    args = {"student_logits": logits(N, V), "teacher_logits": logits(N, V)}
    args[which] = args[which].tolist()
    check(TypeError, [which], args["student_logits"], args["teacher_logits"])


@pytest.mark.parametrize("shape", [(), (N, 0)])
def test_logits_without_vocabulary(shape):
    """A 0-d tensor or an empty vocabulary (V = 0) has no distribution: ValueError."""
    check(ValueError, ["student_logits"], torch.zeros(shape), torch.zeros(shape))


def test_unknown_divergence():
    """divergence outside fkl/rkl/akl/todi, including another spelling: ValueError naming divergence."""
    check(ValueError, ["divergence"], logits(N, V), logits(N, V), "kl")
    check(ValueError, ["divergence"], logits(N, V), logits(N, V), "FKL")


def test_labels_given_positionally():
    """``kd_loss(z, t, labels)`` puts the labels in ``divergence``: the message says they are keyword-only."""
    check(ValueError, ["divergence", "keyword-only", "labels="], logits(N, V), logits(N, V), torch.zeros(N).long())


def test_unknown_reduction():
    """reduction outside mean/sum/none: ValueError naming reduction."""
    check(ValueError, ["reduction"], logits(N, V), logits(N, V), reduction="batchmean")


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf"), float("nan")])
def test_temperature_not_positive_or_not_finite(temperature):
    """temperature <= 0, inf or NaN: ValueError naming temperature."""
    check(ValueError, ["temperature"], logits(N, V), logits(N, V), temperature=temperature)


@pytest.mark.parametrize(
    "temperature", ["2.0", torch.tensor([2.0]), torch.tensor(True), torch.tensor(2 + 0j), None, 2 + 0j]
)
def test_temperature_not_a_number(temperature):
    """temperature given as a string, a tensor that is not a 0-dim real number, a complex number or None:
    TypeError naming temperature."""
    check(TypeError, ["temperature"], logits(N, V), logits(N, V), temperature=temperature)


@pytest.mark.parametrize("name", ["temperature", "akl_alpha", "todi_beta", "kd_weight", "ce_weight"])
def test_option_tensor_on_a_device(name):
    """A 0-dim tensor on a device (meta stands in for CUDA) is refused: reading it would be a host sync."""
    check(TypeError, [name, "synchronise", "Python float"], logits(N, V), logits(N, V), "akl",
          labels=torch.zeros(N, dtype=torch.long), **{name: torch.tensor(0.5, device="meta")})


def test_option_tensor_requiring_grad():
    """A 0-dim tensor that requires grad is refused: the loss has no gradient for the option."""
    check(ValueError, ["temperature", "detach"], logits(N, V), logits(N, V),
          temperature=torch.tensor(2.0, requires_grad=True))


@pytest.mark.parametrize("temperature", [torch.tensor(0.0), torch.tensor(float("nan")), torch.tensor(-1)])
def test_option_tensor_values_checked(temperature):
    """A 0-dim tensor's value is checked like a float's."""
    check(ValueError, ["temperature"], logits(N, V), logits(N, V), temperature=temperature)


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_akl_alpha_outside_unit_interval(alpha):
    """akl_alpha must lie in the open interval (0, 1)."""
    check(ValueError, ["akl_alpha"], logits(N, V), logits(N, V), "akl", akl_alpha=alpha)


@pytest.mark.parametrize("beta", [0.0, -1.0, float("inf")])
def test_todi_beta_not_positive(beta):
    """todi_beta <= 0 or infinite: ValueError naming todi_beta."""
    check(ValueError, ["todi_beta"], logits(N, V), logits(N, V), "todi", todi_beta=beta)


@pytest.mark.parametrize("name", ["kd_weight", "ce_weight"])
def test_weights_not_finite(name):
    """kd_weight and ce_weight must be finite numbers."""
    labels = torch.zeros(N, dtype=torch.long)
    check(ValueError, [name], logits(N, V), logits(N, V), labels=labels, **{name: float("nan")})


def test_ce_weight_without_labels():
    """A hard-label term with no labels: ValueError naming ce_weight and labels."""
    check(ValueError, ["ce_weight", "labels"], logits(N, V), logits(N, V), ce_weight=0.5)


def test_tensors_on_different_devices():
    """Student and teacher (or labels) on two devices: ValueError naming the argument.

    The meta device stands in for a second device, so this runs without a GPU.
    """
    check(ValueError, ["teacher_logits"], logits(N, V), logits(N, V, device="meta"))
    labels = torch.zeros(N, dtype=torch.long, device="meta")
    check(ValueError, ["labels"], logits(N, V), logits(N, V), labels=labels)


def test_teacher_requires_grad():
    """A teacher that requires grad: ValueError naming teacher_logits and telling to detach it."""
    teacher = logits(N, V).requires_grad_(True)
    check(ValueError, ["teacher_logits", "detach"], logits(N, V), teacher)


def test_unknown_backend():
    """backend outside auto/triton/torch/reference: ValueError naming backend."""
    check(ValueError, ["backend"], logits(N, V), logits(N, V), backend="cuda")


def test_triton_backend_without_gpu_or_interpreter(monkeypatch):
    """backend="triton" on CPU tensors without TRITON_INTERPRET=1: ValueError naming backend."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    check(ValueError, ["backend"], logits(N, V), logits(N, V), backend="triton")


@pytest.mark.parametrize("which", ["student_logits", "teacher_logits"])
def test_triton_backend_refuses_float64(which):
    """The Triton kernels take 16- and 32-bit floats; float64 is a TypeError naming the argument."""
    args = {"student_logits": logits(N, V), "teacher_logits": logits(N, V)}
    args[which] = args[which].double()
    check(TypeError, [which], args["student_logits"], args["teacher_logits"], backend="triton")


@pytest.mark.parametrize("divergence", ["fkl", "rkl", "akl", "todi"])
def test_shortcuts_validate(divergence):
    """The per-divergence shortcuts run the same checks."""
    fn = {"fkl": kd.forward_kl, "rkl": kd.reverse_kl, "akl": kd.adaptive_kl, "todi": kd.todi}[divergence]
    with pytest.raises(ValueError, match="temperature"):
        fn(logits(N, V), logits(N, V), temperature=0.0)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"divergence": "js"}, "divergence"),
        ({"reduction": "avg"}, "reduction"),
        ({"temperature": -2.0}, "temperature"),
        ({"akl_alpha": 1.0}, "akl_alpha"),
        ({"todi_beta": 0.0}, "todi_beta"),
        ({"backend": "gpu"}, "backend"),
    ],
)
def test_module_validates_at_construction(kwargs, name):
    """KDLoss checks its options when it is built, not at the first call deep inside training."""
    with pytest.raises(ValueError) as info:
        kd.KDLoss(**kwargs)
    assert name in str(info.value)


def test_module_validates_inputs():
    """KDLoss also checks the tensors of each call."""
    with pytest.raises(ValueError, match="teacher_logits"):
        kd.KDLoss("fkl")(logits(N, V), logits(N, V).requires_grad_(True))


def test_causal_lm_labels_already_shifted():
    """Labels shifted by the user, ``(B, S - 1)``: the message says that labels align with ``input_ids``, instead of
    comparing the loss's internal shifted shapes."""
    from kdkernels.integrations.transformers import shifted_labels

    input_ids = torch.arange(30).reshape(2, 15)
    with pytest.raises(ValueError, match=r"labels must have the shape of input_ids \(2, 15\), got \(2, 14\): labels "
                                         r"align with input_ids"):
        shifted_labels(input_ids, labels=input_ids[:, 1:])
