"""A Hugging Face ``transformers.Trainer`` that distils a teacher into the model it trains, through the fused loss.

:class:`KDTrainer` is a ``Trainer`` whose ``compute_loss`` is :func:`~kdkernels.integrations.transformers.
causal_lm_kd_loss`: the teacher's and the student's last hidden states go through their output layers a chunk of
tokens at a time, so no ``(B, S, V)`` logits exist. Everything else (optimizer, schedule, gradient accumulation,
DDP / FSDP under ``torchrun`` or ``accelerate launch``, evaluation, checkpoints) is the ``Trainer``'s.
Importing this module imports ``transformers`` (``pip install 'kdkernels[transformers]'``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

try:
    import transformers
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("kdkernels.integrations.trainer needs transformers: "
                      "pip install 'kdkernels[transformers]'") from err

from kdkernels.integrations.transformers import IGNORE_INDEX, _fused_options, causal_lm_kd_loss, shifted_labels
from kdkernels.torch_ops.options import OPTION_NAMES

# Loss keywords that KDTrainer takes beside the Trainer's own (ignore_index is fixed at -100 by the shifted labels).
LOSS_KEYWORDS = tuple(name for name in OPTION_NAMES if name not in ("divergence", "ignore_index"))


class KDTrainer(transformers.Trainer):
    """``transformers.Trainer`` training its model to match ``teacher`` under a kdkernels divergence.

    Args:
        teacher: a ``transformers`` causal LM over the student's vocabulary (any hidden size), moved to the
            training device, put in eval mode and frozen; it runs under ``torch.no_grad()`` and is never sharded.
        divergence: any kdkernels divergence (``"fkl"``, ``"rkl"``, ``"akl"``, ``"todi"``, ``"sfkl"``,
            ``"srkl"``, ``"jsd"``, ``"tvd"``).
        temperature, kd_weight, ce_weight, akl_alpha, todi_beta, skew_lambda, jsd_beta, reduction: the loss
            options (:class:`kdkernels.KDOptions`), by keyword: ``row = kd_weight * D(p_T || q_T) + ce_weight *
            CE(z, label)``, no ``T**2`` factor, CE at temperature 1. Checked here, when the trainer is built.
        backend, chunk_size, vocab_size: as in :func:`~kdkernels.integrations.transformers.causal_lm_kd_loss`
            (``vocab_size``: the first rows of heads padded to different sizes over one tokenizer).
        *args, **kwargs: the ``Trainer``'s (``model``, ``args``, ``train_dataset``, ``data_collator``, ...).

    Batches are dicts with ``input_ids`` ``(B, S)``, optional ``attention_mask`` and ``labels`` (``-100`` where
    unlabelled; ``input_ids`` when absent). Positions ``0 .. S-2`` predict the next token; those whose target is
    unlabelled or padding, or that are padding themselves, count 0. Reduction: with ``num_items_in_batch`` (the kept
    positions of all the micro-batches of one optimizer step, over all processes: see :meth:`get_batch_samples`),
    the loss is the sum over the micro-batch's kept positions divided by it, times the number of processes when
    ``args.average_tokens_across_devices`` (as ``Trainer.compute_loss`` does: DDP averages the gradients), so that
    accumulation and data parallelism give the step of one large batch; without it, the mean over the kept positions.
    ``compute_loss(..., return_outputs=True)`` returns ``(loss, {})`` (no logits exist), which ``evaluate`` accepts.
    """

    def __init__(self, *args, teacher: torch.nn.Module, divergence: str = "fkl", backend: str = "auto",
                 chunk_size: int | None = None, vocab_size: int | None = None, **kwargs):
        options = {name: kwargs.pop(name) for name in LOSS_KEYWORDS if name in kwargs}
        _fused_options(divergence, options, None)  # refuse bad options before the Trainer is built
        super().__init__(*args, **kwargs)
        self.teacher = teacher.to(self.args.device).eval().requires_grad_(False)
        self.divergence = divergence
        self.loss_options = dict(options, backend=backend, chunk_size=chunk_size, vocab_size=vocab_size)

    def get_batch_samples(self, *args, **kwargs):
        """The ``Trainer``'s micro-batches of one step, with ``num_items_in_batch`` counted as the loss counts.

        The ``Trainer`` counts ``labels[:, 1:] != -100``, which includes the position before the first token of a
        left-padded row; the loss ignores that position (its hidden state is padding's, see
        :func:`~kdkernels.integrations.transformers.shifted_labels`), so the count is redone with the loss's mask
        (summed over the processes, as the ``Trainer`` does, when ``args.average_tokens_across_devices``).
        """
        batch_samples, num_items_in_batch = super().get_batch_samples(*args, **kwargs)
        if num_items_in_batch is None:
            return batch_samples, None
        count = sum((shifted_labels(b["input_ids"], b.get("attention_mask"), b.get("labels")) != IGNORE_INDEX).sum()
                    for b in batch_samples)
        count = torch.as_tensor(count, device=self.args.device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count).sum()
        return batch_samples, count

    def compute_loss(self, model: torch.nn.Module, inputs: Mapping[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: int | torch.Tensor | None = None):
        """The distillation loss of ``model`` (as the ``Trainer`` wraps it) on ``inputs``; see the class."""
        loss = causal_lm_kd_loss(model, self.teacher, inputs, self.divergence, num_items_in_batch=num_items_in_batch,
                                 **self.loss_options)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes  # the processes' gradients are averaged
        return (loss, {}) if return_outputs else loss
