"""Hugging Face ``transformers`` causal LMs: distillation loss from last hidden states, no full logits.

:func:`causal_lm_kd_loss` runs the teacher, then the student, each through its own ``forward`` on the batch's
model inputs, with the output layer (``model.get_output_embeddings()``: weight ``(V, H)``, bias if any)
replaced for that one call: the teacher's hands back its last hidden states, and the student's computes
:func:`kdkernels.fused_linear_kd_loss` from the student's and the teacher's hidden states after the causal
shift (position ``i`` predicts token ``i + 1``). Running the student's own ``forward``, through any
``DistributedDataParallel`` or ``FullyShardedDataParallel`` wrapper, keeps what the wrapper does there:
DDP's gradient synchronisation, FSDP's gathering of the sharded output weight around the loss.

This equals distilling ``model(...).logits`` only when the logits are exactly ``hidden @ weight.T + bias``;
models that change them afterwards (final logit soft-capping, a logit scale or multiplier) are refused with a
``ValueError`` instead of silently changing the objective. ``transformers`` is needed
(``pip install kdkernels[transformers]``) and imported on the first call.

:func:`causal_lm_sparse_kd_loss` is the same loss against a sparse teacher that the batch carries (its top-k ids
and log-probs, e.g. read back from a dump by ``topk_dump.read_topk``).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Mapping

import torch

from kdkernels.torch_ops.fused_linear import fused_linear_kd_loss
from kdkernels.torch_ops.options import loss_options

# Config fields with which a model's logits are not the plain output layer, and their neutral value.
LOGIT_TRANSFORMS = {
    "final_logit_softcapping": None,  # Gemma 2/3: cap * tanh(logits / cap)
    "logit_scale": 1.0,  # Cohere: logits * scale
    "logits_scaling": 1.0,  # Granite: logits / scaling
    "output_multiplier": 1.0,  # logits * multiplier
}
IGNORE_INDEX = -100  # the transformers convention for positions without a label
TOPK_KEYS = ("teacher_indices", "teacher_logprobs")  # a batch's sparse teacher (topk_dump.py), not a model input
REST_KEY = "teacher_rest_logprob"  # optional beside TOPK_KEYS: the log of the teacher's mass outside its top-k


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


def _unwrap(name: str, model: torch.nn.Module):
    """The ``PreTrainedModel`` inside DDP / FSDP (or DeepSpeed) wrappers, which hold it as ``.module``."""
    pretrained = _pretrained_model_class()
    inner = model
    while not isinstance(inner, pretrained) and isinstance(getattr(inner, "module", None), torch.nn.Module):
        if isinstance(inner, torch.nn.DataParallel):
            raise TypeError(f"{name}: torch.nn.DataParallel is not supported; use DistributedDataParallel "
                            "(one process per device, e.g. torchrun)")
        inner = inner.module
    if not isinstance(inner, pretrained):
        raise TypeError(f"{name} must be a transformers PreTrainedModel (or a DDP/FSDP wrapper of one), "
                        f"got {type(model).__name__}")
    _check_plain_logits(name, inner)
    return inner


def _output_layer(name: str, model) -> torch.nn.Linear:
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"{name}.get_output_embeddings() must be a torch.nn.Linear, got {type(head).__name__}")
    return head


def _check_unsharded(model: torch.nn.Module) -> None:
    """The teacher's output weight is read outside its forward, so it must be a whole, ordinary tensor."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    wrapped = any(isinstance(m, FullyShardedDataParallel) for m in model.modules())
    if wrapped or any(isinstance(p, DTensor) for p in model.parameters()):
        raise TypeError("teacher: sharded (FSDP or tensor-parallel) teachers are not supported; keep a full copy "
                        "of the teacher on each rank (only the student may be DDP- or FSDP-wrapped)")


def model_inputs(model: torch.nn.Module, batch: Mapping) -> dict:
    """The entries of ``batch`` that ``model.forward`` accepts, ``labels`` and a sparse teacher (``TOPK_KEYS``)
    excepted.

    A forward with ``**kwargs`` (every recent ``transformers`` causal LM) gets every entry, as from a
    ``Trainer``: ``position_ids`` and the flash-attention lengths of packed batches (``DataCollatorWithFlattening``)
    included. ``use_cache=False`` is added when the forward takes it.
    """
    params = inspect.signature(model.forward).parameters
    any_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    inputs = {key: value for key, value in batch.items()
              if key not in ("labels", *TOPK_KEYS, REST_KEY) and (any_keyword or key in params)}
    if "use_cache" in params:
        inputs["use_cache"] = False
    return inputs


@contextlib.contextmanager
def _output_layer_replaced(head: torch.nn.Module, forward: Callable[[torch.Tensor], torch.Tensor]):
    """Inside the block, calling ``head`` runs ``forward`` (the hooks around a module's forward still run)."""
    saved = head.__dict__.get("forward")
    head.forward = forward
    try:
        yield
    finally:
        if saved is None:
            del head.forward
        else:
            head.forward = saved


def shifted_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   labels: torch.Tensor | None = None) -> torch.Tensor:
    """Targets ``(B, S - 1)`` of positions ``0 .. S-2``: ``labels[:, 1:]`` (``input_ids`` if no labels).

    A position is ignored (``-100``) when its target label is ``-100`` or when it or its target is padding
    (``attention_mask`` 0): a padding position's hidden state has no context to predict from.
    """
    if labels is not None and labels.shape != input_ids.shape:
        raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got "
                         f"{tuple(labels.shape)}: labels align with input_ids (as for a transformers model's own "
                         f"loss) and are shifted here; do not pass them shifted")
    target = (input_ids if labels is None else labels)[:, 1:]
    keep = target != IGNORE_INDEX
    if attention_mask is not None:
        keep = keep & attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    return torch.where(keep, target, IGNORE_INDEX)


def _check_hidden(name: str, hidden: torch.Tensor, input_ids: torch.Tensor) -> None:
    if hidden.shape[:-1] != input_ids.shape:
        raise ValueError(f"{name}: the output layer received hidden states of shape {tuple(hidden.shape)}, not one "
                         f"per input position {tuple(input_ids.shape)}; do not pass logits_to_keep")


def _fused_options(divergence: str, options: dict, num_items_in_batch) -> dict:
    """The fused loss's keywords: checked options, ignore_index -100, a sum when ``num_items_in_batch`` divides it."""
    if "ignore_index" in options:
        raise TypeError("ignore_index: the causal LM losses mark unlabelled positions with -100 themselves")
    opts = loss_options(divergence, ignore_index=IGNORE_INDEX, **options)
    if num_items_in_batch is not None and opts.reduction != "mean":
        raise ValueError(f"num_items_in_batch divides the sum as the mean's count; reduction must be 'mean', "
                         f"got {opts.reduction!r}")
    fused_options = opts._asdict()
    del fused_options["divergence"]
    if num_items_in_batch is not None:
        fused_options["reduction"] = "sum"  # divided by num_items_in_batch
    return fused_options


def causal_lm_kd_loss(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    batch: Mapping[str, torch.Tensor],
    divergence: str = "fkl",
    *,
    backend: str = "auto",
    chunk_size: int | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    vocab_size: int | None = None,
    **options: object,
) -> torch.Tensor:
    """Distillation loss of two causal LMs on a batch, through the fused output layer.

    Args:
        student: a ``transformers`` causal LM, or a ``DistributedDataParallel`` / ``FullyShardedDataParallel``
            wrapper of one (as ``Trainer.compute_loss`` receives it): it runs through the wrapper's forward.
        teacher: a ``transformers`` causal LM over the same vocabulary (its hidden size may differ), unsharded;
            it runs under ``torch.no_grad()`` and its output weight is a constant.
        batch: mapping with ``input_ids`` ``(B, S)``, optional ``attention_mask`` ``(B, S)`` and ``labels``
            ``(B, S)`` (``-100`` where unlabelled; ``input_ids`` when absent), as a ``Trainer`` passes it. Every
            other entry the models' forwards accept goes to them too (see :func:`model_inputs`), e.g. the
            ``position_ids`` of packed sequences.
        divergence, backend, chunk_size and ``**options`` (the fields of :class:`~kdkernels.KDOptions` but
            ``ignore_index``, which the shifted labels fix at -100): as in :func:`kdkernels.fused_linear_kd_loss`;
            rows are the
            ``B * (S - 1)`` shifted positions, those whose target is ignored (see :func:`shifted_labels`)
            count 0 and get no gradient. ``ce_weight`` adds the usual next-token cross-entropy.
        num_items_in_batch: with ``reduction="mean"``, divide the sum over the kept positions by this count
            instead of by their number: ``Trainer`` passes the kept positions of all the micro-batches of a
            gradient-accumulation step, so that their sum is the mean over the whole step.
        vocab_size: use the first ``vocab_size`` rows of each output layer (views): for heads padded to
            different sizes over one tokenizer (Qwen2.5: 151936 and 152064). Default: the sizes must match.

    Returns the float32 loss (``(B, S - 1)`` for ``reduction="none"``); its gradient reaches every student
    parameter, the output layer included.

    Raises ``ValueError`` for models whose logits are not ``hidden @ weight.T + bias`` (soft-capping, logit
    scale) and for different vocabulary sizes without ``vocab_size``; ``TypeError`` for models without a
    linear output layer, ``DataParallel`` students and sharded teachers.
    """
    inner, t_model = _unwrap("student", student), _unwrap("teacher", teacher)
    s_head, t_head = _output_layer("student", inner), _output_layer("teacher", t_model)
    _check_unsharded(t_model)
    if "input_ids" not in batch:
        raise ValueError("batch must contain 'input_ids'")
    fused_options = _fused_options(divergence, options, num_items_in_batch)
    input_ids = batch["input_ids"]
    labels = shifted_labels(input_ids, batch.get("attention_mask"), batch.get("labels"))
    captured = []

    def keep_hidden(hidden: torch.Tensor) -> torch.Tensor:
        """The teacher's output layer for this call: its last hidden states pass through, recorded."""
        captured.append(hidden)
        return hidden

    with torch.no_grad(), _output_layer_replaced(t_head, keep_hidden):
        t_model(**model_inputs(t_model, batch))
    (teacher_hidden,) = captured
    _check_hidden("teacher", teacher_hidden, input_ids)

    def fused_loss(hidden: torch.Tensor) -> torch.Tensor:
        """The student's output layer for this call: reads its weight here, where FSDP has gathered it."""
        _check_hidden("student", hidden, input_ids)
        s_vocab, t_vocab = s_head.weight.shape[0], t_head.weight.shape[0]
        if vocab_size is None and s_vocab != t_vocab:
            raise ValueError(
                f"student vocabulary size {s_vocab} != teacher vocabulary size {t_vocab}: the fused loss compares "
                f"distributions over one vocabulary; if both heads are padded over one tokenizer, pass "
                f"vocab_size={min(s_vocab, t_vocab)} to use the first rows of each"
            )
        teacher_bias = None if t_head.bias is None else t_head.bias.detach()
        return fused_linear_kd_loss(
            hidden[:, :-1], s_head.weight, teacher_hidden[:, :-1], t_head.weight.detach(), divergence,
            student_bias=s_head.bias, teacher_bias=teacher_bias, labels=labels, backend=backend,
            chunk_size=chunk_size, vocab_size=vocab_size,
            **fused_options,
        )

    with _output_layer_replaced(s_head, fused_loss):
        loss = student(**model_inputs(inner, batch))[0]  # the "logits": what fused_loss returned
    return loss if num_items_in_batch is None else loss / num_items_in_batch


def causal_lm_sparse_kd_loss(
    student: torch.nn.Module,
    batch: Mapping[str, torch.Tensor],
    divergence: str = "fkl",
    *,
    tail: str = "bucket",
    backend: str = "auto",
    chunk_size: int | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    **options: object,
) -> torch.Tensor:
    """:func:`causal_lm_kd_loss` against a sparse teacher carried by the batch (offline distillation, SPEC §7).

    Args:
        student: as in :func:`causal_lm_kd_loss`.
        batch: ``input_ids`` ``(B, S)``, optional ``attention_mask`` and ``labels``, and the teacher's top-k at every
            position: ``teacher_indices`` ``(B, S, K)`` int32/int64 and ``teacher_logprobs`` ``(B, S, K)``, position
            ``i`` holding its prediction of token ``i + 1`` (as ``kdkernels.integrations.topk_dump.read_topk`` yields
            them; the last position is not used). The log-probs are the target as given. Optional
            ``teacher_rest_logprob`` ``(B, S)``: the log of the teacher's mass outside the top-k (``tail="bucket"``).
        divergence, tail: as in :func:`kdkernels.sparse_kd_loss` (``tail``: ``"bucket"``, ``"renormalize"``,
            ``"truncate"``); ``temperature`` divides the student's logits only.
        backend, chunk_size, num_items_in_batch, **options: as in :func:`causal_lm_kd_loss`.

    Returns the float32 loss (``(B, S - 1)`` for ``reduction="none"``), through the fused output layer.
    """
    inner = _unwrap("student", student)
    s_head = _output_layer("student", inner)
    missing = [key for key in ("input_ids", *TOPK_KEYS) if key not in batch]
    if missing:
        raise ValueError(f"batch must contain {missing} (a sparse teacher: see kdkernels.integrations.topk_dump)")
    fused_options = _fused_options(divergence, options, num_items_in_batch)
    input_ids = batch["input_ids"]
    labels = shifted_labels(input_ids, batch.get("attention_mask"), batch.get("labels"))
    teacher_indices, teacher_logprobs = (batch[key][:, :-1] for key in TOPK_KEYS)
    teacher_rest = batch[REST_KEY][:, :-1] if REST_KEY in batch else None

    def fused_loss(hidden: torch.Tensor) -> torch.Tensor:
        """The student's output layer for this call: reads its weight here, where FSDP has gathered it."""
        _check_hidden("student", hidden, input_ids)
        return fused_linear_kd_loss(
            hidden[:, :-1], s_head.weight, divergence=divergence, student_bias=s_head.bias,
            teacher_indices=teacher_indices, teacher_logprobs=teacher_logprobs, teacher_rest_logprob=teacher_rest,
            tail=tail, labels=labels,
            backend=backend, chunk_size=chunk_size, **fused_options,
        )

    with _output_layer_replaced(s_head, fused_loss):
        loss = student(**model_inputs(inner, batch))[0]  # the "logits": what fused_loss returned
    return loss if num_items_in_batch is None else loss / num_items_in_batch
