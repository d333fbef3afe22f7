"""Offline distillation: dump a teacher's top-k log-probs over a dataset to safetensors shards, read them back.

:func:`dump_topk` runs a ``transformers`` causal LM on each batch and keeps, for every position ``i``, the ``k``
largest log-probs of its prediction of token ``i + 1`` (``log_softmax(logits / T)``, :func:`kdkernels.topk_teacher`
from the last hidden states a chunk of tokens at a time, so the full logits never exist) with their ids, and the log
of the mass outside them. Each batch is written beside its own tokens, so reading gives the student exactly the
tokens the teacher saw:

- ``{i}.input_ids`` ``(B, S)`` as given, ``{i}.attention_mask`` ``(B, S)`` when the batch has one,
- ``{i}.teacher_indices`` ``(B, S, k)`` int32 and ``{i}.teacher_logprobs`` ``(B, S, k)`` bfloat16 or float16,
- ``{i}.teacher_rest_logprob`` ``(B, S)`` float32, ``log`` of the teacher's mass outside the k ids, computed from the
  full logits (exact where ``1 - sum`` of the stored log-probs is not); absent from shards written before it existed
  or by :func:`write_topk` without it (the loss then forms the rest from the log-probs),

for the batches ``i = 0, 1, ...`` of a shard ``topk-00000.safetensors``, ``topk-00001.safetensors``, ... in a
directory. Every shard's metadata records ``format`` (``kdkernels-topk/1``), ``k``, ``temperature``,
``vocab_size``, ``logprob_dtype`` and its ``batches``. :func:`read_topk` yields the batches in order as dicts with
those keys, ready for :func:`kdkernels.integrations.transformers.causal_lm_sparse_kd_loss`; tensors come back bit for
bit as written. A bfloat16 dump takes ``6 k + 4`` bytes per token (``k = 64``: 388 B), against ``2 V`` for the dense
bfloat16 logits (256 KB at ``V = 128256``).

:func:`write_topk` writes a shard from top-k computed elsewhere (a vLLM or TRL server, verl;
:mod:`kdkernels.integrations.topk_sources` converts their outputs).

``safetensors`` and ``transformers`` are needed (``pip install 'kdkernels[transformers]'``), imported on first use.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch

from kdkernels.torch_ops import validate
from kdkernels.torch_ops.sparse import topk_teacher_from_hidden
from kdkernels.torch_ops.sparse_ops import check_rest, check_sparse_teacher
from kdkernels.torch_ops.sparse_reference import invalid_rows

FORMAT = "kdkernels-topk/1"
LOGPROB_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}
SHARD_PATTERN = "topk-{:05d}.safetensors"
REST_KEY = "teacher_rest_logprob"
TENSOR_KEYS = ("input_ids", "attention_mask", "teacher_indices", "teacher_logprobs", REST_KEY)


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as err:
        raise ImportError("the top-k dump needs safetensors: pip install 'kdkernels[transformers]'") from err
    return safetensors.torch


@torch.no_grad()
def teacher_topk(teacher: torch.nn.Module, batch: Mapping[str, torch.Tensor], k: int, *, temperature: float = 1.0,
                 return_rest: bool = False, chunk_size: int | None = None) -> tuple[torch.Tensor, ...]:
    """``(ids (B, S, k) int64, log-probs (B, S, k) float32)`` of a causal LM on one batch, from its last hidden states
    through its output layer a chunk of tokens at a time (``kdkernels.topk_teacher_from_hidden``); with
    ``return_rest`` also the log of the mass outside the k ids, ``(B, S)`` float32."""
    from kdkernels.integrations.transformers import _output_layer, _output_layer_replaced, _unwrap, model_inputs

    model = _unwrap("teacher", teacher)
    head = _output_layer("teacher", model)
    captured = []

    def keep_hidden(hidden: torch.Tensor) -> torch.Tensor:
        captured.append(hidden)
        return hidden

    with _output_layer_replaced(head, keep_hidden):
        model(**model_inputs(model, batch))
    (hidden,) = captured
    return topk_teacher_from_hidden(hidden, head.weight, k, bias=head.bias, temperature=temperature,
                                    return_rest=return_rest, chunk_size=chunk_size)


def _metadata(k: int, temperature: float, vocab: int, logprob_dtype: torch.dtype, batches: int) -> dict[str, str]:
    return {"format": FORMAT, "k": str(k), "temperature": repr(temperature), "vocab_size": str(vocab),
            "logprob_dtype": LOGPROB_DTYPES[logprob_dtype], "batches": str(batches)}


def _check_logprob_dtype(logprob_dtype: object) -> None:
    if logprob_dtype not in LOGPROB_DTYPES:
        raise TypeError(f"logprob_dtype must be torch.bfloat16 or torch.float16, got {logprob_dtype}")


def dump_topk(teacher: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], directory: str | Path, k: int,
              *, temperature: float = 1.0, logprob_dtype: torch.dtype = torch.bfloat16, batches_per_shard: int = 64,
              chunk_size: int | None = None) -> list[Path]:
    """Write the teacher's top-``k`` log-probs of every batch (dicts with ``input_ids`` ``(B, S)``, optional
    ``attention_mask``) to safetensors shards in ``directory`` (created; existing shards are refused).

    ``temperature`` is the teacher's: the stored log-probs are those of ``softmax(logits / T)``, the target as the
    loss will take it. Returns the shard paths.
    """
    st = _safetensors()
    _check_logprob_dtype(logprob_dtype)
    if isinstance(batches_per_shard, bool) or not isinstance(batches_per_shard, int) or batches_per_shard < 1:
        raise ValueError(f"batches_per_shard must be a positive int, got {batches_per_shard!r}")
    temperature = validate.check_number("temperature", temperature, low=0.0)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if any(directory.glob("topk-*.safetensors")):
        raise ValueError(f"directory {directory} already holds top-k shards; use an empty directory")
    from kdkernels.integrations.transformers import _output_layer, _unwrap

    vocab = _output_layer("teacher", _unwrap("teacher", teacher)).weight.shape[0]
    paths: list[Path] = []
    shard: dict[str, torch.Tensor] = {}

    def flush(count: int) -> None:
        path = directory / SHARD_PATTERN.format(len(paths))
        st.save_file(shard, str(path), metadata=_metadata(k, temperature, vocab, logprob_dtype, count))
        paths.append(path)
        shard.clear()

    count = 0
    for batch in batches:
        if "input_ids" not in batch:
            raise ValueError("each batch must contain 'input_ids'")
        ids, lp, rest = teacher_topk(teacher, batch, k, temperature=temperature, return_rest=True,
                                     chunk_size=chunk_size)
        tensors = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask"),
                   "teacher_indices": ids.to(torch.int32), "teacher_logprobs": lp.to(logprob_dtype), REST_KEY: rest}
        for key, value in tensors.items():
            if value is not None:
                shard[f"{count}.{key}"] = value.detach().cpu().contiguous()
        count += 1
        if count == batches_per_shard:
            flush(count)
            count = 0
    if count:
        flush(count)
    return paths


def write_topk(directory: str | Path, input_ids: torch.Tensor, teacher_indices: torch.Tensor,
               teacher_logprobs: torch.Tensor, *, temperature: float, vocab_size: int,
               teacher_rest_logprob: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
               logprob_dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write one batch of top-k computed elsewhere as the next shard of ``directory`` (created if needed), in the
    format :func:`dump_topk` writes and :func:`read_topk` reads. Returns the shard's path.

    Args:
        input_ids: ``(B, S)`` integer tokens; ``attention_mask`` ``(B, S)`` optional, stored as given.
        teacher_indices: ``(B, S, K)`` int32/int64 and ``teacher_logprobs`` ``(B, S, K)`` float: at position ``i`` the
            teacher's prediction of token ``i + 1`` (``-inf``: padding, its id ignored). The valid ids of a position
            must be distinct and in ``[0, vocab_size)`` (checked: a ``ValueError`` names the first bad position;
            :mod:`kdkernels.integrations.topk_sources` cleans the outputs of vLLM, TRL and verl).
        temperature: the temperature the log-probs were computed at (recorded, not applied; the loss takes the
            log-probs as given); ``vocab_size``: the teacher's vocabulary size (recorded, and the bound of the ids).
        teacher_rest_logprob: ``(B, S)`` float, optional: the log of the teacher's mass outside the K ids, stored as
            float32 (use it when the source gives it or the full logits were at hand; else the loss forms
            ``1 - sum_K p``).
        logprob_dtype: ``torch.bfloat16`` (default) or ``torch.float16``, the stored log-probs' dtype.

    Shards already in ``directory`` must record the same ``temperature`` and ``vocab_size``.
    """
    st = _safetensors()
    _check_logprob_dtype(logprob_dtype)
    temperature = validate.check_number("temperature", temperature, low=0.0)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype.is_floating_point or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a (B, S) integer tensor, got {getattr(input_ids, 'shape', input_ids)!r}")
    for name, x in (("teacher_indices", teacher_indices), ("teacher_logprobs", teacher_logprobs)):
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            raise ValueError(f"{name} must be a (B, S, K) tensor, got {getattr(x, 'shape', x)!r}")
    input_ids, teacher_indices, teacher_logprobs, teacher_rest_logprob, attention_mask = (
        x.detach().cpu() if isinstance(x, torch.Tensor) else x
        for x in (input_ids, teacher_indices, teacher_logprobs, teacher_rest_logprob, attention_mask))
    check_sparse_teacher(input_ids[..., None].float(), teacher_indices, teacher_logprobs)
    check_rest(input_ids[..., None].float(), teacher_rest_logprob)
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                       or attention_mask.shape != input_ids.shape):
        raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}")
    k = teacher_indices.shape[-1]
    flat_ids, flat_lp = teacher_indices.reshape(-1, k), teacher_logprobs.reshape(-1, k)
    bad = invalid_rows(flat_ids, flat_lp != float("-inf"), vocab_size).nonzero()
    if len(bad):
        position = tuple(int(i) for i in torch.unravel_index(bad[0, 0], input_ids.shape))
        raise ValueError(f"teacher_indices has repeated ids or ids outside [0, {vocab_size}) among the valid entries "
                         f"at position {position}: {teacher_indices[position].tolist()}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    existing = sorted(directory.glob("topk-*.safetensors"))
    if existing:
        meta = topk_metadata(existing[0])
        if (meta["temperature"], meta["vocab_size"]) != (temperature, vocab_size):
            raise ValueError(f"directory {directory} holds shards of temperature {meta['temperature']} and vocab_size "
                             f"{meta['vocab_size']}, not {temperature} and {vocab_size}")
    tensors = {"input_ids": input_ids, "attention_mask": attention_mask,
               "teacher_indices": teacher_indices.to(torch.int32),
               "teacher_logprobs": teacher_logprobs.to(logprob_dtype),
               REST_KEY: None if teacher_rest_logprob is None else teacher_rest_logprob.to(torch.float32)}
    shard = {f"0.{key}": value.detach().contiguous() for key, value in tensors.items() if value is not None}
    path = directory / SHARD_PATTERN.format(len(existing))
    st.save_file(shard, str(path), metadata=_metadata(k, temperature, vocab_size, logprob_dtype, 1))
    return path


def topk_metadata(path: str | Path) -> dict:
    """The metadata of one shard (or of the first shard of a directory): ``k``, ``vocab_size`` and ``batches`` as
    ints, ``temperature`` as a float, ``format`` and ``logprob_dtype`` as strings."""
    _safetensors()  # a clear ImportError when missing
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = _shards(path)[0]

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a kdkernels top-k shard (format {meta.get('format')!r}, expected {FORMAT!r})")
    return dict(meta, k=int(meta["k"]), vocab_size=int(meta["vocab_size"]), batches=int(meta["batches"]),
                temperature=float(meta["temperature"]))


def _shards(directory: Path) -> list[Path]:
    paths = sorted(directory.glob("topk-*.safetensors"))
    if not paths:
        raise ValueError(f"no top-k shards (topk-*.safetensors) in {directory}")
    return paths


def read_topk(directory: str | Path, device: torch.device | str = "cpu") -> Iterator[dict[str, torch.Tensor]]:
    """The batches of a dump in the order they were written: dicts with ``input_ids``, ``attention_mask`` (when
    dumped), ``teacher_indices`` (int32), ``teacher_logprobs`` (as stored) and ``teacher_rest_logprob`` (float32,
    when stored: not in shards written before it existed), on ``device``."""
    st = _safetensors()
    for path in _shards(Path(directory)):
        meta = topk_metadata(path)
        tensors = st.load_file(str(path), device=str(device))
        for i in range(meta["batches"]):
            yield {key: tensors[f"{i}.{key}"] for key in TENSOR_KEYS if f"{i}.{key}" in tensors}


def describe(directory: str | Path) -> str:
    """A one-line JSON summary of a dump: its metadata, shards, batches and bytes on disk."""
    paths = _shards(Path(directory))
    meta = topk_metadata(paths[0])
    batches = sum(topk_metadata(p)["batches"] for p in paths)
    return json.dumps(dict(meta, shards=len(paths), batches=batches, bytes=sum(p.stat().st_size for p in paths)))
