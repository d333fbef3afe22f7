"""Hugging Face ``transformers`` causal LMs: distillation loss from last hidden states, no full logits.

:func:`causal_lm_kd_loss` runs the body of a student and a teacher causal LM (``model.get_decoder()``) to
their last hidden states and applies :func:`kdkernels.fused_linear_kd_loss` with each model's output
embedding (``model.get_output_embeddings()``: weight ``(V, H)``, bias if any) after the causal shift:
position ``i`` predicts token ``i + 1``. This equals distilling ``model(...).logits`` only when the logits
are exactly ``hidden @ weight.T + bias``; models that change them afterwards (final logit soft-capping,
a logit scale or multiplier) are refused with a ``ValueError`` instead of silently changing the objective.
``transformers`` is needed (``pip install kdkernels[transformers]``) and imported on the first call.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from kdkernels.torch_ops.fused_linear import fused_linear_kd_loss

# Config fields with which a model's logits are not the plain output layer, and their neutral value.
LOGIT_TRANSFORMS = {
    "final_logit_softcapping": None,  # Gemma 2/3: cap * tanh(logits / cap)
    "logit_scale": 1.0,  # Cohere: logits * scale
    "logits_scaling": 1.0,  # Granite: logits / scaling
    "output_multiplier": 1.0,  # logits * multiplier
}
IGNORE_INDEX = -100  # the transformers convention for positions without a label


def _pretrained_model_class():
    try:
        from transformers import PreTrainedModel
    except ImportError as err:
        raise ImportError("causal_lm_kd_loss needs transformers: pip install 'kdkernels[transformers]'") from err
    return PreTrainedModel


def _configs(model) -> list:
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return [config] if text is config else [config, text]


def _check_plain_logits(name: str, model) -> None:
    """Refuse models whose logits are not ``hidden @ weight.T + bias``."""
    for config in _configs(model):
        for field, neutral in LOGIT_TRANSFORMS.items():
            value = getattr(config, field, None)
            if value is not None and value != neutral:
                raise ValueError(
                    f"{name}: config.{field}={value!r} transforms the logits after the output layer, which the "
                    "fused loss does not reproduce; compute the logits and use kdkernels.kd_loss instead"
                )


def _body_and_head(name: str, model) -> tuple[torch.nn.Module, torch.nn.Linear]:
    """The module producing the last hidden states and the output layer of a causal LM."""
    if not isinstance(model, _pretrained_model_class()):
        raise TypeError(f"{name} must be a transformers PreTrainedModel, got {type(model).__name__}")
    _check_plain_logits(name, model)
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"{name}.get_output_embeddings() must be a torch.nn.Linear, got {type(head).__name__}")
    body = model.get_decoder() if hasattr(model, "get_decoder") else None
    if body is None or body is model:
        body = model.base_model
    if body is model:
        raise TypeError(f"{name}: cannot find the body of {type(model).__name__} (get_decoder / base_model)")
    return body, head


def _last_hidden(body: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
    out = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out[0]


def shifted_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   labels: torch.Tensor | None = None) -> torch.Tensor:
    """Targets ``(B, S - 1)`` of positions ``0 .. S-2``: ``labels[:, 1:]`` (``input_ids`` if no labels).

    A position is ignored (``-100``) when its target label is ``-100`` or when it or its target is padding
    (``attention_mask`` 0): a padding position's hidden state has no context to predict from.
    """
    target = (input_ids if labels is None else labels)[:, 1:]
    keep = target != IGNORE_INDEX
    if attention_mask is not None:
        keep = keep & attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    return torch.where(keep, target, IGNORE_INDEX)


def causal_lm_kd_loss(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    batch: Mapping[str, torch.Tensor],
    divergence: str = "fkl",
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
    akl_alpha: float = 0.5,
    todi_beta: float = 1.0,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Distillation loss of two causal LMs on a batch, through the fused output layer.

    Args:
        student, teacher: ``transformers`` causal LMs with the same vocabulary size ``V`` (hidden sizes may
            differ). The teacher runs under ``torch.no_grad()``; its output weight is detached.
        batch: mapping with ``input_ids`` ``(B, S)``, optional ``attention_mask`` ``(B, S)`` and ``labels``
            ``(B, S)`` (``-100`` where unlabelled; ``input_ids`` when absent), as a ``Trainer`` passes it.
        divergence and the other keywords: as in :func:`kdkernels.fused_linear_kd_loss`; rows are the
            ``B * (S - 1)`` shifted positions, those whose target is ignored (see :func:`shifted_labels`)
            count 0 and get no gradient. ``ce_weight`` adds the usual next-token cross-entropy.

    Returns the float32 loss (``(B, S - 1)`` for ``reduction="none"``); its gradient reaches every student
    parameter, the output layer included.

    Raises ``ValueError`` for models whose logits are not ``hidden @ weight.T + bias`` (soft-capping, logit
    scale) and for different vocabulary sizes, ``TypeError`` for models without a linear output layer.
    """
    s_body, s_head = _body_and_head("student", student)
    t_body, t_head = _body_and_head("teacher", teacher)
    if s_head.weight.shape[0] != t_head.weight.shape[0]:
        raise ValueError(
            f"student vocabulary size {s_head.weight.shape[0]} != teacher vocabulary size "
            f"{t_head.weight.shape[0]}: the fused loss compares distributions over one vocabulary"
        )
    if "input_ids" not in batch:
        raise ValueError("batch must contain 'input_ids'")
    input_ids, attention_mask = batch["input_ids"], batch.get("attention_mask")
    labels = shifted_labels(input_ids, attention_mask, batch.get("labels"))
    student_hidden = _last_hidden(s_body, input_ids, attention_mask)[:, :-1]
    with torch.no_grad():
        teacher_hidden = _last_hidden(t_body, input_ids, attention_mask)[:, :-1]
    teacher_bias = None if t_head.bias is None else t_head.bias.detach()
    return fused_linear_kd_loss(
        student_hidden, s_head.weight, teacher_hidden, t_head.weight.detach(), divergence,
        student_bias=s_head.bias, teacher_bias=teacher_bias, labels=labels, ignore_index=IGNORE_INDEX,
        temperature=temperature, reduction=reduction, akl_alpha=akl_alpha, todi_beta=todi_beta,
        kd_weight=kd_weight, ce_weight=ce_weight, backend=backend, chunk_size=chunk_size,
    )
