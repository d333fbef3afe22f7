"""TRL's distillation trainers with the loss computed by kdkernels from hidden states (no full logits).

``from kdkernels.integrations.trl import GKDTrainer, DistillationTrainer`` in place of TRL's
(``trl.experimental.gkd.GKDTrainer``, ``trl.DistillationTrainer``; tested with trl 1.16): the same constructors,
configs, data, generation and training loop, plus ``divergence=`` and the kdkernels loss options. Only the loss
changes: :func:`~kdkernels.integrations.transformers.causal_lm_kd_loss` runs both models up to their last hidden
states and passes them through the output layers a chunk of tokens at a time (:func:`kdkernels.fused_linear_kd_loss`).

Defaults give TRL's own objective: ``divergence="jsd"`` with ``jsd_beta = args.beta`` (TRL's convention: 0 is forward
KL(teacher || student), 1 is reverse KL, in between the generalized JSD with mixture ``beta p + (1 - beta) q``), and
TRL's temperature rules: ``GKDTrainer`` computes its loss at ``T = 1`` (``GKDConfig.temperature`` only samples),
``DistillationTrainer`` at ``args.temperature``; neither multiplies by ``T**2``. A ``temperature=`` or ``jsd_beta=``
given here overrides them. Reduction as TRL's: the sum over the completion tokens divided by ``num_items_in_batch``
when the trainer gives it, else their mean.

Differences from TRL's own loss: logits that are not ``hidden @ W.T + b`` (final soft-capping, a logit scale:
Gemma 2/3, Cohere, Granite) are refused, not reproduced; PEFT students, vision inputs and sharded (FSDP, DeepSpeed
ZeRO-3) teachers are not supported; the student's entropy is not logged (no logits exist to take it from). Heads
padded to different sizes over one tokenizer (Qwen2.5: 151936 and 152064 rows), which TRL refuses, train with
``vocab_size=`` (the first rows of each head).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Mapping

import torch

try:
    import trl
    from trl.experimental import gkd as _trl_gkd
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("kdkernels.integrations.trl needs trl: pip install 'kdkernels[trl]'") from err

from kdkernels.integrations.transformers import IGNORE_INDEX, _fused_options, causal_lm_kd_loss
from kdkernels.torch_ops.options import OPTION_NAMES

# Loss keywords taken beside the trainer's own (ignore_index is fixed at -100 by the shifted labels).
LOSS_KEYWORDS = tuple(name for name in OPTION_NAMES if name not in ("divergence", "ignore_index"))
# Inputs of TRL's vision-language path, which the fused loss does not forward.
VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
               "token_type_ids", "mm_token_type_ids", "image_position_ids")


@contextlib.contextmanager
def _vocab_sizes_matched(model: object, teacher: object, vocab_size: int | None):
    """With ``vocab_size``, let TRL's ``__init__`` pass its equal-``config.vocab_size`` check (restored after)."""
    if vocab_size is None:
        yield
        return
    if not all(isinstance(m, torch.nn.Module) for m in (model, teacher)):
        raise TypeError("vocab_size needs the student and the teacher as instantiated models, not model ids")
    for name, m in (("student", model), ("teacher", teacher)):
        rows = m.get_output_embeddings().weight.shape[0]
        if rows < vocab_size:
            raise ValueError(f"vocab_size={vocab_size} exceeds the {name}'s output layer ({rows} rows)")
    config = teacher.config.get_text_config()
    saved = config.vocab_size
    config.vocab_size = model.config.get_text_config().vocab_size
    try:
        yield
    finally:
        config.vocab_size = saved


class _FusedLoss:
    """The kdkernels loss options of a TRL trainer subclass (``_default_temperature`` names TRL's rule)."""

    def __init__(self, *args, divergence: str = "jsd", backend: str = "auto", chunk_size: int | None = None,
                 vocab_size: int | None = None, **kwargs):
        options = {name: kwargs.pop(name) for name in LOSS_KEYWORDS if name in kwargs}
        bound = inspect.signature(super().__init__).bind_partial(*args, **kwargs).arguments
        with _vocab_sizes_matched(bound.get("model"), bound.get("teacher_model"), vocab_size):
            super().__init__(*args, **kwargs)
        if divergence == "jsd":
            options.setdefault("jsd_beta", self.args.beta)
        options.setdefault("temperature", self._default_temperature())
        _fused_options(divergence, options, None)  # refuse bad options now, not at the first step
        self.divergence = divergence
        self.loss_options = dict(options, backend=backend, chunk_size=chunk_size, vocab_size=vocab_size)

    def _kd_loss(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor],
                 num_items_in_batch: int | torch.Tensor | None) -> torch.Tensor:
        return causal_lm_kd_loss(model, self.teacher_model, batch, self.divergence,
                                 num_items_in_batch=num_items_in_batch, **self.loss_options)


class GKDTrainer(_FusedLoss, _trl_gkd.GKDTrainer):
    """TRL's ``GKDTrainer`` (``trl.experimental.gkd``) with the loss computed by kdkernels, fused.

    Args:
        divergence: any kdkernels divergence; default ``"jsd"`` at ``jsd_beta = args.beta``, TRL's loss.
        temperature, jsd_beta, kd_weight, ce_weight, akl_alpha, todi_beta, skew_lambda, reduction: the kdkernels loss
            options (:class:`kdkernels.KDOptions`); ``temperature`` defaults to 1, as TRL computes the GKD loss
            (``GKDConfig.temperature`` is the sampling temperature of on-policy generation only).
        backend, chunk_size, vocab_size: as in :func:`~kdkernels.integrations.transformers.causal_lm_kd_loss`.
        *args, **kwargs: ``GKDTrainer``'s (``model``, ``teacher_model``, ``args``, ``train_dataset``, ...).

    Batches (from TRL's ``DataCollatorForChatML``, on-policy generation or ``seq_kd``) hold ``input_ids``,
    ``attention_mask`` and ``labels`` ``(B, S)``; position ``i`` is distilled on token ``i + 1`` where
    ``labels[:, i + 1] != -100`` (the completion), as in TRL, and positions that are padding are skipped. The loss
    is the sum over them divided by ``num_items_in_batch`` (the ``Trainer``'s count of labelled tokens over the
    accumulation step) when given, else their mean. ``compute_loss(..., return_outputs=True)`` returns
    ``(loss, {})``: there are no logits.
    """

    def _default_temperature(self) -> float:
        return 1.0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The fused distillation loss on ``input_ids``, ``attention_mask`` and ``labels`` (see the class)."""
        batch = {key: inputs[key] for key in ("input_ids", "attention_mask", "labels")}
        loss = self._kd_loss(model, batch, num_items_in_batch)
        return (loss, {}) if return_outputs else loss


class DistillationTrainer(_FusedLoss, trl.DistillationTrainer):
    """TRL's ``DistillationTrainer`` (on-policy distillation) with the loss computed by kdkernels, fused.

    Args:
        divergence: any kdkernels divergence; default ``"jsd"`` at ``jsd_beta = args.beta`` (TRL's default 1.0:
            reverse KL), TRL's loss.
        temperature, jsd_beta, kd_weight, ce_weight, akl_alpha, todi_beta, skew_lambda, reduction: the kdkernels loss
            options; ``temperature`` defaults to ``args.temperature``, which TRL applies to both the sampling and the
            loss (no ``T**2`` factor). ``ce_weight`` adds the cross-entropy on the sampled completion tokens.
        backend, chunk_size, vocab_size: as in :func:`~kdkernels.integrations.transformers.causal_lm_kd_loss`.
        *args, **kwargs: ``DistillationTrainer``'s (``model``, ``teacher_model``, ``args``, ``train_dataset``,
            ``processing_class``, ...).

    Each batch is TRL's generated one: ``prompt_ids``/``prompt_mask`` ``(B, P)``, ``completion_ids``/
    ``completion_mask`` ``(B, C)`` (and ``tool_mask``); the completion tokens kept by the masks are the distilled
    positions, as in TRL. During training the loss is their sum divided by TRL's count over the generation batch
    (``num_items_in_batch``, divided by the number of processes, whose gradients DDP averages), else their mean.
    """

    def _default_temperature(self) -> float:
        return self.args.temperature

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The fused distillation loss on the prompts and their sampled completions (see the class)."""
        vision = [key for key in VISION_KEYS if key in inputs]
        if vision:
            raise ValueError(f"kdkernels' DistillationTrainer does not forward vision inputs {vision}; use TRL's own")
        if self.model.training and inputs.get("num_items_in_batch") is not None:
            num_items_in_batch = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        completion_ids, kept = inputs["completion_ids"], inputs["completion_mask"]
        if "tool_mask" in inputs:
            kept = kept * inputs["tool_mask"]
        prompt_labels = torch.full_like(inputs["prompt_ids"], IGNORE_INDEX)
        batch = {
            "input_ids": torch.cat([inputs["prompt_ids"], completion_ids], dim=1),
            "attention_mask": torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1),
            "labels": torch.cat([prompt_labels, torch.where(kept.bool(), completion_ids, IGNORE_INDEX)], dim=1),
        }
        loss = self._kd_loss(model, batch, num_items_in_batch)
        return (loss, None) if return_outputs else loss
