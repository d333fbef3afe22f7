"""Offline distillation: dump a teacher's top-k log-probs over a dataset to safetensors shards, read them back.

:func:`dump_topk` runs a ``transformers`` causal LM on each batch and keeps, for every position ``i``, the ``k``
largest log-probs of its prediction of token ``i + 1`` (``log_softmax(logits / T)``, :func:`kdkernels.topk_teacher`
from the last hidden states a chunk of tokens at a time, so the full logits never exist) with their ids. Each batch
is written beside its own tokens, so reading gives the student exactly the tokens the teacher saw:

- ``{i}.input_ids`` ``(B, S)`` as given, ``{i}.attention_mask`` ``(B, S)`` when the batch has one,
- ``{i}.teacher_indices`` ``(B, S, k)`` int32 and ``{i}.teacher_logprobs`` ``(B, S, k)`` bfloat16 or float16,

for the batches ``i = 0, 1, ...`` of a shard ``topk-00000.safetensors``, ``topk-00001.safetensors``, ... in a
directory. Every shard's metadata records ``format`` (``kdkernels-topk/1``), ``k``, ``temperature``,
``vocab_size``, ``logprob_dtype`` and its ``batches``. :func:`read_topk` yields the batches in order as dicts with
those keys, ready for :func:`kdkernels.integrations.transformers.causal_lm_sparse_kd_loss`; tensors come back bit for
bit as written. A bfloat16 dump takes ``6 k`` bytes per token (``k = 64``: 384 B), against ``2 V`` for the dense
bfloat16 logits (256 KB at ``V = 128256``).

``safetensors`` and ``transformers`` are needed (``pip install 'kdkernels[transformers]'``), imported on first use.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch

from kdkernels.torch_ops import validate
from kdkernels.torch_ops.sparse import topk_teacher_from_hidden

FORMAT = "kdkernels-topk/1"
LOGPROB_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}
SHARD_PATTERN = "topk-{:05d}.safetensors"
TENSOR_KEYS = ("input_ids", "attention_mask", "teacher_indices", "teacher_logprobs")


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as err:
        raise ImportError("the top-k dump needs safetensors: pip install 'kdkernels[transformers]'") from err
    return safetensors.torch


@torch.no_grad()
def teacher_topk(teacher: torch.nn.Module, batch: Mapping[str, torch.Tensor], k: int, *, temperature: float = 1.0,
                 chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids (B, S, k) int64, log-probs (B, S, k) float32)`` of a causal LM on one batch, from its last hidden states
    through its output layer a chunk of tokens at a time (``kdkernels.topk_teacher_from_hidden``)."""
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
                                    chunk_size=chunk_size)


def dump_topk(teacher: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], directory: str | Path, k: int,
              *, temperature: float = 1.0, logprob_dtype: torch.dtype = torch.bfloat16, batches_per_shard: int = 64,
              chunk_size: int | None = None) -> list[Path]:
    """Write the teacher's top-``k`` log-probs of every batch (dicts with ``input_ids`` ``(B, S)``, optional
    ``attention_mask``) to safetensors shards in ``directory`` (created; existing shards are refused).

    ``temperature`` is the teacher's: the stored log-probs are those of ``softmax(logits / T)``, the target as the
    loss will take it. Returns the shard paths.
    """
    st = _safetensors()
    if logprob_dtype not in LOGPROB_DTYPES:
        raise TypeError(f"logprob_dtype must be torch.bfloat16 or torch.float16, got {logprob_dtype}")
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
        metadata = {"format": FORMAT, "k": str(k), "temperature": repr(temperature), "vocab_size": str(vocab),
                    "logprob_dtype": LOGPROB_DTYPES[logprob_dtype], "batches": str(count)}
        path = directory / SHARD_PATTERN.format(len(paths))
        st.save_file(shard, str(path), metadata=metadata)
        paths.append(path)
        shard.clear()

    count = 0
    for batch in batches:
        if "input_ids" not in batch:
            raise ValueError("each batch must contain 'input_ids'")
        ids, lp = teacher_topk(teacher, batch, k, temperature=temperature, chunk_size=chunk_size)
        tensors = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask"),
                   "teacher_indices": ids.to(torch.int32), "teacher_logprobs": lp.to(logprob_dtype)}
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
    dumped), ``teacher_indices`` (int32) and ``teacher_logprobs`` (as stored), on ``device``."""
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
