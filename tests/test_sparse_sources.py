"""Top-k data from other tools (issue 19 item 2): ``write_topk`` and the converters of ``topk_sources``.

Each converter is fed data shaped like its source, built from a known float64 teacher so the expected top-k is
exact: vLLM's ``prompt_logprobs`` (Python objects and the server's JSON, the prompt token added beside the top-k at
its own rank, the dict in vLLM's order: that token first), TRL's ``get_sequence_logprobs`` lists (ragged, id-0 and
``-inf`` padding, NaN, a sampled token at rank K + 1 that repeats a top-k id or not), verl's rows (``pad_token_id``
rows with log-prob 0.0, a dummy last row, a real row holding ``pad_token_id`` once). The raw data gives NaN rows
(repeated ids) where the converted data gives the loss of the clean top-k. ``write_topk`` writes shards that
``read_topk`` reads back bit for bit, and refuses bad input naming the argument.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

import kdkernels as kd
from kdkernels.integrations.topk_sources import (
    from_trl_sequence_logprobs,
    from_verl_topk,
    from_vllm_prompt_logprobs,
    ranked_topk,
)
from kdkernels.torch_ops.sparse_reference import topk_teacher_reference

VOCAB = 50
K = 5
NEG_INF = float("-inf")


@dataclass
class Logprob:
    """Shaped like vLLM's ``vllm.sequence.Logprob``."""

    logprob: float
    rank: int
    decoded_token: str | None = None


def teacher(seq_len: int, seed: int = 0):
    """``(input_ids (S,), t (S, V) float64)``: ``t[i]`` is the teacher's prediction of token ``i + 1``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (seq_len,), generator=gen), 3 * torch.randn(seq_len, VOCAB, generator=gen,
                                                                                 dtype=torch.float64)


def vllm_prompt_logprobs(input_ids, t, k: int, server: bool):
    """vLLM's ``prompt_logprobs`` of a prompt: entry ``i`` scores token ``i`` from ``t[i - 1]``: the top ``k`` and the
    prompt token (first in the dict, at its own rank, possibly above ``k``); entry 0 is None."""
    out = [None]
    for i in range(1, len(input_ids)):
        lp = torch.log_softmax(t[i - 1], -1)
        order = torch.sort(lp, descending=True, stable=True).indices
        rank = {int(j): r + 1 for r, j in enumerate(order)}
        token = int(input_ids[i])
        chosen = [token] + [int(j) for j in order[:k] if int(j) != token]
        entry = {}
        for j in chosen:
            value = float(lp[j])
            entry[str(j) if server else j] = ({"logprob": value, "rank": rank[j], "decoded_token": f"w{j}"} if server
                                              else Logprob(value, rank[j], f"w{j}"))
        out.append(entry)
    return out


@pytest.mark.parametrize("server", [False, True])
def test_vllm_prompt_logprobs(server):
    input_ids, t = teacher(9)
    ids, lp = from_vllm_prompt_logprobs(vllm_prompt_logprobs(input_ids, t, K, server), K)
    ref_ids, ref_lp = topk_teacher_reference(t, K)
    assert ids.shape == (9, K) and ids.dtype == torch.int64 and lp.dtype == torch.float32
    assert torch.equal(ids[:-1], ref_ids[:-1]) and torch.allclose(lp[:-1].double(), ref_lp[:-1], atol=1e-6)
    assert (lp[-1] == NEG_INF).all()  # vLLM scores no token after the last
    assert any(int(input_ids[i + 1]) not in ids[i].tolist() for i in range(8))  # the extra token was dropped


def test_vllm_fewer_entries_than_k_are_padding():
    prompt = [None, {3: Logprob(-0.1, 1), 7: Logprob(-2.5, 2)}, None]
    ids, lp = from_vllm_prompt_logprobs(prompt, 4)
    assert ids[0].tolist() == [3, 7, 0, 0] and lp[0, 2:].tolist() == [NEG_INF, NEG_INF]
    assert (lp[1:] == NEG_INF).all()
    with pytest.raises(ValueError, match="k"):
        from_vllm_prompt_logprobs(prompt, 0)


def trl_output(sequences, prompt_lengths, ts, k: int):
    """TRL's ``get_sequence_logprobs`` result: per sequence ``(completion length, k)`` rank-ordered lists, entry ``j``
    scoring token ``prompt_length + j``; padded with id 0 / ``-inf`` past the ``k_b`` entries a position has."""
    out = {"logprob_token_ids": [], "logprobs": []}
    for seq, start, t in zip(sequences, prompt_lengths, ts):
        ids_b, lp_b = [], []
        for position in range(start, len(seq)):
            ref_ids, ref_lp = topk_teacher_reference(t[position - 1], k)
            ids_b.append(ref_ids.tolist())
            lp_b.append(ref_lp.tolist())
        out["logprob_token_ids"].append(ids_b)
        out["logprobs"].append(lp_b)
    return out


def test_trl_sequence_logprobs():
    (seq_a, t_a), (seq_b, t_b) = teacher(7, seed=1), teacher(9, seed=2)
    out = trl_output([seq_a, seq_b], [3, 5], [t_a, t_b], K)
    out["logprob_token_ids"][0][1][3:], out["logprobs"][0][1][3:] = [0, 0], [NEG_INF, NEG_INF]  # fewer than K
    out["logprobs"][1][0][4] = math.nan  # TRL maps NaN to -inf; either is padding
    ids, lp = from_trl_sequence_logprobs(out, [3, 5], 10)
    assert ids.shape == lp.shape == (2, 10, K)
    for b, (start, seq, t) in enumerate([(3, seq_a, t_a), (5, seq_b, t_b)]):
        rows = slice(start - 1, len(seq) - 1)  # row i predicts token i + 1
        ref_ids, ref_lp = topk_teacher_reference(t[rows], K)
        valid = lp[b, rows] != NEG_INF
        assert torch.equal(torch.where(valid, ids[b, rows], -1), torch.where(valid, ref_ids, -1))
        assert torch.allclose(lp[b, rows][valid].double(), ref_lp[valid], atol=1e-6)
        others = torch.ones(10, dtype=torch.bool)
        others[rows] = False
        assert (lp[b, others] == NEG_INF).all()
    assert valid.sum() == valid.numel() - 1 and (lp[0, 3, 3:] == NEG_INF).all()
    with pytest.raises(ValueError, match="prompt_lengths"):
        from_trl_sequence_logprobs(out, [3, 5], 7)


def test_ranked_lists_with_a_sampled_token_at_rank_k_plus_1():
    """K + 1 columns: the sampled token after the top K repeats a top-K id (row 0) or not (row 1); id 0 is a real
    entry in row 1 and padding after it. Raw, row 0 has a repeated id (NaN loss); converted, the repeat is padding
    (row 0 is its top K), row 1 keeps its distinct extra token, and ``k=K`` keeps the top K only."""
    _, t = teacher(2, seed=3)
    top_ids, top_lp = topk_teacher_reference(t, K + 3)
    full = torch.log_softmax(t, -1)
    ids = torch.cat([top_ids[:, :K], torch.tensor([[int(top_ids[0, 2])], [int(top_ids[1, K + 2])]])], 1)
    lp = torch.cat([top_lp[:, :K], full.gather(1, ids[:, K:])], 1)
    ids[1, 1], lp[1, 1] = 0, full[1, 0]  # a real id 0 ...
    ids[1, 3], lp[1, 3] = 0, NEG_INF  # ... and id-0 padding
    z = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(0))
    raw = kd.sparse_kd_loss(z, ids, lp.float(), "rkl", reduction="none")
    assert raw[0].isnan() and raw[1].isfinite()
    got_ids, got_lp = ranked_topk(ids.tolist(), lp.tolist())
    assert got_ids.shape == (2, K + 1)
    assert torch.equal(got_ids[0, :K], ids[0, :K]) and got_lp[0, K] == NEG_INF
    assert torch.equal(got_ids[1], torch.where(lp[1] == NEG_INF, 0, ids[1])) and torch.equal(got_lp[1], lp[1].float())
    loss = kd.sparse_kd_loss(z, got_ids, got_lp, "rkl", reduction="none")
    assert torch.isfinite(loss).all()
    assert loss[0] == kd.sparse_kd_loss(z[:1], ids[:1, :K], lp[:1, :K].float(), "rkl", reduction="none")[0]
    cut_ids, cut_lp = ranked_topk(ids, lp, k=K)
    assert cut_ids.shape == (2, K) and torch.equal(cut_lp[0], lp[0, :K].float())
    for bad, match in ((dict(k=0), "k"), (dict(logprobs=lp[:, :2]), "shape"), (dict(logprobs=lp.abs() * math.inf),
                                                                              "inf")):
        with pytest.raises(ValueError, match=match):
            ranked_topk(**{"token_ids": ids, "logprobs": lp, **bad})


def test_verl_rows():
    """verl's ``(B, L, K)`` rows: response positions with the teacher's top-k (one holding ``pad_token_id`` once, a
    real EOS), padding positions and the dummy last row with ``pad_token_id`` in every column and log-prob 0.0."""
    pad = 7
    _, t = teacher(6, seed=4)
    t[1, pad] = t[1].max() + 1  # row 1's top entry is the pad/EOS id itself
    ref_ids, ref_lp = topk_teacher_reference(t, K)
    ids, lp = ref_ids.clone(), ref_lp.float()
    ids[4:], lp[4:] = pad, 0.0  # padding rows and the dummy last row
    ids, lp = ids[None], lp[None]
    z = torch.randn(1, 6, VOCAB, generator=torch.Generator().manual_seed(1))
    raw = kd.sparse_kd_loss(z, ids, lp, "fkl", reduction="none")
    assert raw[0, 4:].isnan().all() and raw[0, :4].isfinite().all()
    got_ids, got_lp = from_verl_topk(ids, lp, pad)
    assert torch.equal(got_ids[0, :4], ref_ids[:4]) and int(ref_ids[1, 0]) == pad
    assert (got_lp[0, 4:] == NEG_INF).all() and torch.equal(got_lp[0, :4], lp[0, :4])
    labels = torch.tensor([[1, 2, 3, 4, -100, -100]])  # the padded positions are ignored
    loss = kd.sparse_kd_loss(z, got_ids, got_lp, "fkl", labels=labels, reduction="none")
    assert torch.isfinite(loss).all() and torch.equal(loss[0, :4], raw[0, :4])
    mask = torch.tensor([[True, True, False, True, True, True]])
    masked_ids, masked_lp = from_verl_topk(ids, lp, pad, mask=mask)
    assert (masked_lp[0, 2] == NEG_INF).all() and torch.equal(masked_lp[0, 3], lp[0, 3])
    with pytest.raises(ValueError, match="mask"):
        from_verl_topk(ids, lp, pad, mask=mask[:, :3])


pytest.importorskip("safetensors")
from kdkernels.integrations.topk_dump import read_topk, topk_metadata, write_topk  # noqa: E402


def shard_inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (2, 6), generator=gen)
    t = 2 * torch.randn(2, 6, VOCAB, generator=gen)
    ids, lp, rest = kd.topk_teacher(t, K, temperature=2.0, return_rest=True)
    lp[0, 1, 3:] = NEG_INF  # padding whose ids repeat a valid one: fine
    ids[0, 1, 3:] = ids[0, 1, 0]
    return input_ids, ids, lp, rest


def test_write_topk_round_trip(tmp_path):
    input_ids, ids, lp, rest = shard_inputs()
    mask = torch.ones_like(input_ids)
    first = write_topk(tmp_path, input_ids, ids, lp, temperature=2.0, vocab_size=VOCAB, teacher_rest_logprob=rest,
                       attention_mask=mask)
    second = write_topk(tmp_path, input_ids.flip(0), ids.flip(0), lp.flip(0), temperature=2.0, vocab_size=VOCAB,
                        logprob_dtype=torch.float16)
    assert [first.name, second.name] == ["topk-00000.safetensors", "topk-00001.safetensors"]
    meta = topk_metadata(tmp_path)
    assert (meta["k"], meta["temperature"], meta["vocab_size"], meta["batches"]) == (K, 2.0, VOCAB, 1)
    got_first, got_second = read_topk(tmp_path)
    assert torch.equal(got_first["input_ids"], input_ids) and torch.equal(got_first["attention_mask"], mask)
    assert got_first["teacher_indices"].dtype == torch.int32 and torch.equal(got_first["teacher_indices"], ids.int())
    assert torch.equal(got_first["teacher_logprobs"].view(torch.int16), lp.bfloat16().view(torch.int16))
    assert torch.equal(got_first["teacher_rest_logprob"], rest)
    assert "teacher_rest_logprob" not in got_second and "attention_mask" not in got_second
    assert torch.equal(got_second["teacher_logprobs"].view(torch.int16), lp.flip(0).half().view(torch.int16))


def test_write_topk_refuses_bad_input(tmp_path):
    input_ids, ids, lp, rest = shard_inputs()
    write_topk(tmp_path / "a", input_ids, ids, lp, temperature=2.0, vocab_size=VOCAB)
    repeated = ids.clone()
    repeated[1, 4, 2] = repeated[1, 4, 0]
    cases = [
        (dict(teacher_indices=repeated), ValueError, r"teacher_indices.*\(1, 4\)"),
        (dict(teacher_indices=ids + VOCAB), ValueError, "teacher_indices"),
        (dict(teacher_indices=ids.float()), TypeError, "teacher_indices"),
        (dict(teacher_indices=ids[..., 0]), ValueError, "teacher_indices"),
        (dict(teacher_logprobs=lp[..., :3]), ValueError, "teacher_logprobs"),
        (dict(input_ids=input_ids.float()), ValueError, "input_ids"),
        (dict(teacher_rest_logprob=rest[:, :2]), ValueError, "teacher_rest_logprob"),
        (dict(attention_mask=input_ids[:, :2]), ValueError, "attention_mask"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(vocab_size=0), ValueError, "vocab_size"),
        (dict(logprob_dtype=torch.float32), TypeError, "logprob_dtype"),
        (dict(temperature=1.0), ValueError, "temperature"),  # the directory's shards are at T = 2
    ]
    for change, error, match in cases:
        kwargs = dict(input_ids=input_ids, teacher_indices=ids, teacher_logprobs=lp, temperature=2.0,
                      vocab_size=VOCAB)
        kwargs.update(change)
        with pytest.raises(error, match=match):
            write_topk(tmp_path / "a", **kwargs)
    assert len(list((tmp_path / "a").iterdir())) == 1
