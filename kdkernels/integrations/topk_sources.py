"""Top-k teacher data from other tools, as the tensors :func:`kdkernels.sparse_kd_loss` and
:func:`kdkernels.integrations.topk_dump.write_topk` take: ids ``(..., K)`` int64 and log-probs ``(..., K)`` float32,
``-inf`` marking padding, the valid ids of a position distinct.

Each source pads and repeats in its own way; a repeated valid id makes the loss's row NaN (SPEC §7), so every
converter ends in :func:`ranked_topk`, which keeps the first (best-ranked) occurrence of an id and pads the rest:

- vLLM ``prompt_logprobs`` (``LLM.generate`` outputs, or ``choices[i]["prompt_logprobs"]`` of its OpenAI-compatible
  ``/v1/completions``): per position a dict ``{token id: Logprob(logprob, rank, ...)}`` (the server: ``{"logprob",
  "rank", "decoded_token"}``, ids as strings), holding the top-k **plus the prompt's own token** when it ranks below k;
  entry ``i`` scores token ``i`` (entry 0 is None). :func:`from_vllm_prompt_logprobs` keeps the k best ranks and
  shifts by one so that row ``i`` predicts token ``i + 1``, as the dump does.
- TRL's ``VLLMClient.get_sequence_logprobs``: per sequence ``(completion length, top_logprobs)`` lists
  ``logprob_token_ids`` / ``logprobs``, rank-ordered, padded with id 0 and ``-inf`` (NaN log-probs mapped to
  ``-inf``); entry ``j`` scores token ``prompt_length + j``. :func:`from_trl_sequence_logprobs` places them at rows
  ``prompt_length - 1 + j`` of a ``(B, S, K)`` batch.
- verl's teacher top-k rows ``(B, L, K)``: padding positions and a dummy last row carry ``pad_token_id`` in every
  column (log-prob 0.0), i.e. K repeats of one id. :func:`from_verl_topk` pads those rows and any repeated id.

Positions a source does not cover are all padding: the bucket tail then puts the whole teacher mass in the rest
category, so give those positions ``ignore_index`` labels (prompt tokens usually have them already).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

NEG_INF = float("-inf")


def ranked_topk(token_ids: object, logprobs: object, *, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids (..., K') int64, log-probs (..., K') float32)`` from rank-ordered per-position lists ``(..., K)``.

    An entry is padding when its log-prob is ``-inf`` or NaN, or when its id repeats one of a better-ranked valid
    entry of the same position (a token a source adds beside the top-k, or padding ids); padding entries get
    log-prob ``-inf`` and id 0. ``k``: keep only the first ``k`` columns (the ``k`` best ranks), ``K' = min(k, K)``;
    None keeps them all. Lists, NumPy arrays and tensors are taken; the log-probs are kept as given (float32).
    """
    ids = torch.as_tensor(token_ids).to(torch.int64)
    lp = torch.as_tensor(logprobs).to(torch.float32)
    if ids.shape != lp.shape or ids.dim() < 1:
        raise ValueError(f"token_ids shape {tuple(ids.shape)} and logprobs shape {tuple(lp.shape)} must be equal "
                         f"and (..., K)")
    if (lp == float("inf")).any():
        raise ValueError("logprobs holds +inf, which is no log-probability")
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int or None, got {k!r}")
        ids, lp = ids[..., :k], lp[..., :k]
    valid = ~(lp.isnan() | (lp == NEG_INF))
    width = ids.shape[-1]
    earlier = torch.ones(width, width, dtype=torch.bool).triu(diagonal=1)  # [i, j]: column i ranks before j
    same = (ids[..., :, None] == ids[..., None, :]) & valid[..., :, None] & earlier
    valid &= ~same.any(-2)
    return torch.where(valid, ids, 0), torch.where(valid, lp, NEG_INF)


def _field(entry: object, name: str) -> float:
    return entry[name] if isinstance(entry, Mapping) else getattr(entry, name)


def from_vllm_prompt_logprobs(prompt_logprobs: Sequence[Mapping | None], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids (S, k), log-probs (S, k))`` of one sequence of ``S`` tokens from vLLM's ``prompt_logprobs`` (length
    ``S``; entry ``i`` a dict of token id (int or str) to an object or dict with ``logprob`` and ``rank``, or None),
    requested with ``prompt_logprobs >= k``. Row ``i`` is entry ``i + 1`` (the prediction of token ``i + 1``); the
    last row, whose next token vLLM does not score, is padding. The entries of ranks above the ``k`` best (the prompt
    token vLLM adds when it is not among them) are dropped; fewer than ``k`` entries are padded.

    The log-probs are vLLM's: with its default ``logprobs_mode="raw_logprobs"`` those of the raw logits (T = 1)
    whatever the request's temperature; with ``"processed_logprobs"`` after the request's temperature.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    ids = [[0] * k for _ in prompt_logprobs]
    lp = [[NEG_INF] * k for _ in prompt_logprobs]
    for row, position in enumerate(prompt_logprobs[1:]):
        ranked = sorted((position or {}).items(), key=lambda item: _field(item[1], "rank"))[:k]
        for col, (token, entry) in enumerate(ranked):
            ids[row][col], lp[row][col] = int(token), float(_field(entry, "logprob"))
    return ranked_topk(ids, lp)


def from_trl_sequence_logprobs(output: Mapping[str, Sequence], prompt_lengths: Sequence[int], seq_len: int, *,
                               k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids (B, seq_len, K), log-probs (B, seq_len, K))`` from the dict TRL's
    ``VLLMClient.get_sequence_logprobs(sequences, prompt_lengths, top_logprobs=K)`` returns: its
    ``logprob_token_ids`` and ``logprobs``, per sequence ``(completion length, K)``, where entry ``j`` scores token
    ``prompt_lengths[b] + j``. That is row ``prompt_lengths[b] - 1 + j`` here (row ``i`` predicts token ``i + 1``,
    as in the dump, for ``input_ids`` ``(B, seq_len)`` holding the sequences left-aligned); the other rows are
    padding. ``k`` as in :func:`ranked_topk`.

    The log-probs are the server's at the ``temperature`` the client sent, when the server applies it (vLLM's
    ``logprobs_mode="processed_logprobs"``); vLLM's default raw mode gives T = 1 whatever was sent.
    """
    token_ids, logprobs = output["logprob_token_ids"], output["logprobs"]
    if not len(token_ids) == len(logprobs) == len(prompt_lengths):
        raise ValueError(f"output has {len(token_ids)} sequences of ids and {len(logprobs)} of log-probs for "
                         f"{len(prompt_lengths)} prompt_lengths")
    rows = []
    for seq_ids, seq_lp, start in zip(token_ids, logprobs, prompt_lengths):
        if start < 1 or start - 1 + len(seq_ids) > seq_len:
            raise ValueError(f"prompt_lengths entry {start} with {len(seq_ids)} completion positions does not fit "
                             f"seq_len={seq_len} (rows prompt_length - 1 ... must lie in [0, seq_len))")
        rows.append((start - 1, *ranked_topk(seq_ids, seq_lp, k=k)))
    width = max((ids.shape[-1] for _, ids, _ in rows), default=k or 1)
    ids = torch.zeros(len(rows), seq_len, width, dtype=torch.int64)
    lp = torch.full((len(rows), seq_len, width), NEG_INF)
    for b, (start, seq_ids, seq_lp) in enumerate(rows):
        ids[b, start:start + len(seq_ids), :seq_ids.shape[-1]] = seq_ids
        lp[b, start:start + len(seq_lp), :seq_lp.shape[-1]] = seq_lp
    return ids, lp


def from_verl_topk(teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor, pad_token_id: int, *,
                   mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids (..., K) int64, log-probs (..., K) float32)`` from verl's teacher top-k rows ``(..., K)``: a row whose
    K ids all equal ``pad_token_id`` (padding positions, the dummy last row; ``K >= 2``) is padding, as is every row
    where ``mask`` (``(...)``, e.g. the response mask) is false, and a repeated id within a row (:func:`ranked_topk`).
    A real row may hold ``pad_token_id`` once (an EOS used as padding): it is kept. With ``K = 1`` an all-padding row
    cannot be told from a real one: pass ``mask``.

    The log-probs are verl's teacher log-probs as computed (``log_softmax`` of the teacher's logits at the
    temperature verl applied to them); record that temperature when writing them.
    """
    ids = torch.as_tensor(teacher_ids).to(torch.int64)
    lp = torch.as_tensor(teacher_logprobs).to(torch.float32)
    if ids.shape != lp.shape or ids.dim() < 1:
        raise ValueError(f"teacher_ids shape {tuple(ids.shape)} and teacher_logprobs shape {tuple(lp.shape)} must be "
                         f"equal and (..., K)")
    dummy = (ids == pad_token_id).all(-1) & (ids.shape[-1] >= 2)
    if mask is not None:
        mask = torch.as_tensor(mask)
        if tuple(mask.shape) != tuple(ids.shape[:-1]):
            raise ValueError(f"mask must have shape {tuple(ids.shape[:-1])}, got {tuple(mask.shape)}")
        dummy |= ~mask.to(torch.bool)
    return ranked_topk(ids, torch.where(dummy[..., None], NEG_INF, lp))
