"""One frozen options object for every loss entry point, validated once at the public API.

:class:`KDOptions` holds the divergence, its parameters, the temperature, the weights, ``ignore_index`` and the
reduction. The public functions build it with :func:`loss_options` (which checks every value and names the
argument it refuses); the backends and launchers take it whole. Only the registered ops need primitive
arguments: :func:`op_args` flattens it to ``(params, divergence, ignore_index)`` and :func:`from_op` rebuilds it.

``params`` is a float64 **CPU** tensor of the float options, not a tuple of Python floats, so that
``torch.compile`` traces a changing temperature or weight (a schedule) as a graph input instead of
specialising a graph to each value. The ops read it on the host: it never lives on a device, so reading it
is a memory read, not a device synchronisation.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from kdkernels.torch_ops import validate
from kdkernels.torch_ops.reference import DIVERGENCES, REDUCTIONS


class KDOptions(NamedTuple):
    """Everything a loss needs besides its tensors (SPEC §2-3); build it with :func:`loss_options`.

    divergence: ``"fkl"``, ``"rkl"``, ``"akl"``, ``"todi"``, ``"sfkl"``, ``"srkl"``, ``"jsd"`` or ``"tvd"``.
    temperature: divides student and teacher logits (``> 0``); the loss is not multiplied by ``T**2``.
    akl_alpha: AKL's tail mass, in (0, 1). todi_beta: ToDi's sigmoid slope, ``> 0``.
    skew_lambda: the skewed KLs' mixing weight, in (0, 1). jsd_beta: the generalized JSD's weight, in [0, 1].
    kd_weight, ce_weight: ``row = kd_weight * divergence + ce_weight * CE(student_logits, labels)``.
    ignore_index: label value of ignored rows. reduction: ``"mean"``, ``"sum"`` or ``"none"``.
    """

    divergence: str = "fkl"
    temperature: float = 1.0
    akl_alpha: float = 0.5
    todi_beta: float = 1.0
    skew_lambda: float = 0.1
    jsd_beta: float = 0.5
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    ignore_index: int = -100
    reduction: str = "mean"


# The float options, in the order of the ``params`` tensor, with their bounds: (low, high, closed).
FLOAT_BOUNDS = {
    "temperature": (0.0, None, False),
    "akl_alpha": (0.0, 1.0, False),
    "todi_beta": (0.0, None, False),
    "skew_lambda": (0.0, 1.0, False),
    "jsd_beta": (0.0, 1.0, True),
    "kd_weight": (None, None, False),
    "ce_weight": (None, None, False),
}
OPTION_NAMES = KDOptions._fields


def loss_options(divergence: object = "fkl", **options: object) -> KDOptions:
    """Checked :class:`KDOptions` from keyword arguments; an unknown keyword is a ``TypeError`` naming it."""
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {unknown}; the loss options are {list(OPTION_NAMES)}")
    validate.check_choice("divergence", divergence, DIVERGENCES)
    defaults = KDOptions()
    values = {"divergence": divergence}
    for name, (low, high, closed) in FLOAT_BOUNDS.items():
        value = options.get(name, getattr(defaults, name))
        values[name] = validate.check_number(name, value, low=low, high=high, closed=closed)
    ignore_index = options.get("ignore_index", defaults.ignore_index)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    reduction = options.get("reduction", defaults.reduction)
    validate.check_choice("reduction", reduction, REDUCTIONS)
    return KDOptions(ignore_index=ignore_index, reduction=reduction, **values)


def op_args(opts: KDOptions) -> tuple[torch.Tensor, str, int]:
    """``(params, divergence, ignore_index)``: the options as the registered ops take them."""
    floats = [getattr(opts, name) for name in FLOAT_BOUNDS]
    if torch.compiler.is_compiling():
        # Under torch.compile a changing float is symbolic; torch.tensor() of it would specialise the graph to
        # its value, while this sum of constant basis vectors keeps it a graph input.
        basis = torch.eye(len(floats), dtype=torch.float64)
        params = sum(basis[i] * value for i, value in enumerate(floats))
    else:
        params = torch.tensor(floats, dtype=torch.float64)
    return params, opts.divergence, opts.ignore_index


def from_op(params: torch.Tensor, divergence: str, ignore_index: int) -> KDOptions:
    """The :class:`KDOptions` that :func:`op_args` flattened (its reduction, applied outside the ops, is dropped).

    ``params`` is a CPU tensor (see the module docstring): reading it involves no device.
    """
    if params.device.type != "cpu" or params.shape != (len(FLOAT_BOUNDS),):
        raise ValueError(f"params must be a CPU tensor of {len(FLOAT_BOUNDS)} floats, got {params.shape} on "
                         f"{params.device}")
    floats = dict(zip(FLOAT_BOUNDS, params.tolist()))  # a host read of a CPU tensor, not a device sync
    return canonical(KDOptions(divergence=divergence, ignore_index=ignore_index, **floats))


def canonical(opts: KDOptions) -> KDOptions:
    """``opts`` with jsd at ``jsd_beta`` 0 or 1 run as fkl or rkl (TRL's endpoint convention, SPEC §2b)."""
    if opts.divergence == "jsd" and opts.jsd_beta in (0.0, 1.0):
        return opts._replace(divergence="fkl" if opts.jsd_beta == 0.0 else "rkl")
    return opts
