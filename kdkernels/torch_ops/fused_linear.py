"""Fused output layer + distillation loss: the ``(N, V)`` logits are made a chunk of tokens at a time.

For ``N`` token rows (leading dimensions flattened), student hidden states ``h`` ``(N, H_s)``, output
weight ``W`` ``(V, H_s)`` and optional bias ``b`` ``(V,)``, and a teacher given either as hidden states
``g`` ``(N, H_t)`` with ``U`` ``(V, H_t)``, ``c`` ``(V,)``, directly as logits ``t`` ``(N, V)``, or sparse (its top-k
ids and log-probs ``(N, K)``, SPEC §7, through the registered ``sparse_forward``/``sparse_backward`` ops of
``sparse_ops.py``)::

    z = h W^T + b,   t = g U^T + c                      (one chunk of rows at a time)
    row_i = kd_weight * D(z_i, t_i) + ce_weight * CE(z_i, label_i)     (SPEC §2-3; no T**2 factor)
    loss = mean over kept rows | sum | the rows themselves ("none")

Each chunk runs the registered ``kd_forward`` op and, when a gradient is needed, ``kd_backward`` with the
row's share ``s_i = d loss / d row_i`` (1 for ``"sum"``, ``1 / kept rows`` for ``"mean"``), giving
``dz``, then ``dL/dh = dz W``, ``dL/dW += dz^T h``, ``dL/db += sum_i dz_i``. The chunk's logits and
``dz`` are freed before the next chunk, so beyond the inputs and their gradients the memory is a few
``(chunk, V)`` buffers, whatever ``N``. As in Liger's fused linear losses the gradients are computed in the
forward and the backward only multiplies them by ``grad_output``, once: a second backward through the same
loss raises an error that says so. With ``reduction="none"`` each row has its own ``grad_output``, unknown in
the forward: then the forward keeps only its inputs and the backward recomputes every chunk (twice the matrix
products), so it can run again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdkernels.torch_ops import dtensor, validate
from kdkernels.torch_ops.op import kd_backward, kd_forward
from kdkernels.torch_ops.options import canonical, loss_options, op_args
from kdkernels.torch_ops.rows import flat_labels, reduce_rows
from kdkernels.torch_ops.sparse_ops import check_rest, check_sparse_teacher, check_tail, sparse_backward, sparse_forward

FUSED_BACKENDS = ("auto", "torch", "triton")
CHUNK_ELEMENTS = 1 << 24  # most logits entries of one chunk (64 MiB in float32)
MIN_CHUNK_ROWS = 256
VOCAB_HINT = "for heads padded to different sizes over one tokenizer, pass vocab_size= to use the first rows of each"
SECOND_BACKWARD = (
    "fused_linear_kd_loss computes its gradients during the forward and hands them to the first backward only, "
    "so a second backward through the same loss (retain_graph=True) is not supported: compute the loss again "
    "before each backward, or use reduction='none' (its backward recomputes the logits) and reduce the rows yourself"
)


def auto_chunk_size(vocab: int, hidden: int) -> int:
    """Rows per chunk: a power of two at most ``max(hidden, 256)`` and ``2**24 / V`` (at least 1).

    The first bound keeps a chunk's logits no larger than the output weight (``V x H``) once ``H >= 256``,
    the second caps them at 64 MiB in float32; 256 rows keep the matrix products efficient.
    """
    rows = max(1, min(max(hidden, MIN_CHUNK_ROWS), CHUNK_ELEMENTS // max(vocab, 1)))
    return 1 << (rows.bit_length() - 1)


def _sweep(student, teacher, labels, opts, row_grad, needs):
    """Row losses ``(N,)`` and, with ``row_grad`` ``(N,)``, the gradients ``(dh, dW, db)`` (``None`` if unneeded).

    ``student = (h, W, b)``; ``teacher = (g, U, c, t, ids, lp, rest)`` with either ``t``, ``g, U`` or ``ids, lp``
    (and optionally ``rest``) given.
    """
    h, weight, bias = student
    g, t_weight, t_bias, t_logits, t_ids, t_lp, t_rest = teacher
    n_rows = h.shape[0]
    rows = torch.zeros(n_rows, dtype=opts["result_dtype"], device=h.device)
    acc = torch.promote_types(weight.dtype, torch.float32)  # accumulate the weight/bias gradients in float32+
    want = [row_grad is not None and need for need in needs]
    dh = torch.zeros_like(h) if want[0] else None
    dw = torch.zeros(weight.shape, dtype=acc, device=h.device) if want[1] else None
    db = torch.zeros(bias.shape, dtype=acc, device=h.device) if want[2] else None
    flat_options = (*op_args(opts["loss"]), opts["backend"])
    sparse_options = (*flat_options[:-1], opts["tail"], opts["backend"])
    step = opts["chunk_size"]
    parallel = opts["parallel"]  # (KDOptions, Shard, GroupReducer) of vocabulary-parallel slices, or None
    if parallel is not None:
        from kdkernels.torch_ops import vocab_parallel  # loaded already: fused_linear_kd_loss made the Shard

        loss_opts, shard, reducer = parallel
    for lo in range(0, n_rows, step):
        part = slice(lo, lo + step)
        z = F.linear(h[part], weight, bias)
        lab = None if labels is None else labels[part]
        if t_ids is None:
            t = F.linear(g[part], t_weight, t_bias) if t_logits is None else t_logits[part]
            t = t if t.stride(-1) == 1 else t.contiguous()
            if parallel is None:
                rows[part], stats = kd_forward(z, t, lab, *flat_options)
            else:
                rows[part], stats = vocab_parallel.forward(z, t, lab, loss_opts, shard, reducer, opts["backend"])
        else:
            rest = None if t_rest is None else t_rest[part]
            rows[part], stats, grad_k = sparse_forward(z, t_ids[part], t_lp[part], rest, lab, *sparse_options)
        if row_grad is None:
            continue
        if parallel is not None:
            dz = vocab_parallel.backward(row_grad[part], z, t, lab, stats, loss_opts, shard, opts["backend"])
            del t
        elif t_ids is None:
            dz = kd_backward(row_grad[part], z, t, lab, stats, *flat_options)
            del t
        else:
            dz = sparse_backward(row_grad[part], z, t_ids[part], t_lp[part], lab, stats, grad_k, *sparse_options)
        del z, stats
        if dh is not None:
            dh[part] = dz @ weight
        if dw is not None:
            if dz.dtype == dw.dtype:
                dw.addmm_(dz.mT, h[part])
            else:
                dw += (dz.mT @ h[part]).to(dw.dtype)
        if db is not None:
            db += dz.sum(0, dtype=acc)
        del dz
    if dh is not None and parallel is not None:
        dh = reducer.sum(dh)  # each slice's part of the replicated hidden states' gradient
    grads = None
    if row_grad is not None:
        grads = (dh, None if dw is None else dw.to(weight.dtype), None if db is None else db.to(bias.dtype))
    return rows, grads


def _row_shares(n_rows: int, labels: torch.Tensor | None, ignore_index: int, reduction: str,
                device: torch.device) -> torch.Tensor:
    """``d loss / d row`` ``(N,)`` float32: 1 for ``"sum"``, 1 / (kept rows, at least 1) for ``"mean"``."""
    ones = torch.ones(n_rows, dtype=torch.float32, device=device)
    if reduction == "sum":
        return ones
    if labels is None:
        return ones / max(n_rows, 1)
    return ones / (labels != ignore_index).sum().clamp(min=1)


class _FusedLinearKD(torch.autograd.Function):
    """Inputs already flattened to rows; ``opts`` holds the options, ``needs`` which gradients to make."""

    @staticmethod
    def forward(ctx, h, weight, bias, g, t_weight, t_bias, t_logits, t_ids, t_lp, t_rest, labels, opts, needs):
        student, teacher = (h, weight, bias), (g, t_weight, t_bias, t_logits, t_ids, t_lp, t_rest)
        ctx.opts, ctx.needs = opts, needs
        reduction, ignore_index = opts["loss"].reduction, opts["loss"].ignore_index
        if reduction == "none":
            rows, _ = _sweep(student, teacher, labels, opts, None, needs)
            ctx.save_for_backward(h, weight, bias, g, t_weight, t_bias, t_logits, t_ids, t_lp, t_rest, labels)
            return rows
        shares = _row_shares(h.shape[0], labels, ignore_index, reduction, h.device) if any(needs) else None
        rows, ctx.grads = _sweep(student, teacher, labels, opts, shares, needs)
        return reduce_rows(rows, labels, ignore_index, reduction, rows.shape)

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.opts["loss"].reduction == "none":
            h, weight, bias, g, t_weight, t_bias, t_logits, t_ids, t_lp, t_rest, labels = ctx.saved_tensors
            _, grads = _sweep((h, weight, bias), (g, t_weight, t_bias, t_logits, t_ids, t_lp, t_rest), labels,
                              ctx.opts, grad_output.to(torch.float32), ctx.needs)
        else:
            # The gradients made in the forward are handed over once and scaled in place (no second copy of dW).
            if ctx.grads is None:
                raise RuntimeError(SECOND_BACKWARD)
            grads, ctx.grads = ctx.grads, None
            grads = tuple(None if x is None else x.mul_(grad_output.to(x.dtype)) for x in grads)
        return (*grads, None, None, None, None, None, None, None, None, None, None)


def _first_entries(vocab_size: object, w, b, u, c, t_logits) -> tuple:
    """The first ``vocab_size`` vocabulary entries of the weights, biases and teacher logits, as views."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an int or None, got {type(vocab_size).__name__}")
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    validate.check_weight("student_weight", w, "student_bias", b)
    if u is not None:
        validate.check_weight("teacher_weight", u, "teacher_bias", c)
    if t_logits is not None:
        validate.check_logits("teacher_logits", t_logits)
    for name, size in (("student_weight", w.shape[0]), ("teacher_weight", None if u is None else u.shape[0]),
                       ("teacher_logits", None if t_logits is None else t_logits.shape[-1])):
        if size is not None and size < vocab_size:
            raise ValueError(f"vocab_size={vocab_size} exceeds the {size} vocabulary entries of {name}")
    first = lambda x: None if x is None else x[:vocab_size]
    return first(w), first(b), first(u), first(c), None if t_logits is None else t_logits[..., :vocab_size]


def _check_inputs(h, w, b, g, u, c, t_logits, t_ids=None, t_lp=None, t_rest=None) -> torch.Tensor:
    """All shape/dtype/device checks; returns the tensor standing for the teacher in backend checks."""
    validate.check_weight("student_weight", w, "student_bias", b)
    validate.check_hidden("student_hidden", h, "student_weight", w)
    lead, vocab = tuple(h.shape[:-1]), w.shape[0]
    if t_ids is not None or t_lp is not None or t_rest is not None:
        if t_ids is None or t_lp is None or t_logits is not None or g is not None or u is not None or c is not None:
            raise ValueError("a sparse teacher is teacher_indices and teacher_logprobs together (and optionally "
                             "teacher_rest_logprob), with no other teacher argument")
        check_sparse_teacher(h, t_ids, t_lp)
        check_rest(h, t_rest)
        teacher = {}
    elif t_logits is not None:
        if g is not None or u is not None or c is not None:
            raise ValueError("pass either teacher_logits or teacher_hidden and teacher_weight (with teacher_bias), "
                             "not both")
        validate.check_logits("teacher_logits", t_logits)
        if tuple(t_logits.shape) != (*lead, vocab):
            raise ValueError(f"teacher_logits must have shape {(*lead, vocab)}, got {tuple(t_logits.shape)} "
                             f"({VOCAB_HINT})")
        teacher = {"teacher_logits": t_logits}
    else:
        if g is None or u is None:
            raise ValueError("the teacher needs teacher_hidden and teacher_weight, or teacher_logits")
        validate.check_weight("teacher_weight", u, "teacher_bias", c)
        validate.check_hidden("teacher_hidden", g, "teacher_weight", u)
        if u.shape[0] != vocab:
            raise ValueError(f"teacher_weight has vocabulary {u.shape[0]} but student_weight has {vocab}; "
                             f"the vocabularies must match ({VOCAB_HINT})")
        if tuple(g.shape[:-1]) != lead:
            raise ValueError(f"teacher_hidden leading shape {tuple(g.shape[:-1])} must match student_hidden's {lead}")
        teacher = {"teacher_hidden": g, "teacher_weight": u, "teacher_bias": c}
    for name, x in {"student_weight": w, "student_bias": b, **teacher}.items():
        if x is not None and x.device != h.device:
            raise ValueError(f"{name} is on {x.device} but student_hidden is on {h.device}")
    for name, x in teacher.items():
        if x is not None and x.requires_grad:
            raise ValueError(f"{name} requires grad; the teacher is a constant target: pass .detach()")
    return t_logits if t_logits is not None else (h if t_ids is not None else g)


def _unwrap(h, w, b, g, u, c, t_logits, process_group, vocab_range):
    """The local tensors of a DTensor ``student_weight`` ``w`` sharded on its rows and of the tensors placed alike,
    with the group and range of its mesh (see :func:`fused_linear_kd_loss`)."""
    dtensor.check_no_group(process_group, vocab_range, "student_weight")
    w_local, process_group, vocab_range = dtensor.vocab_split(w, "student_weight", 0)
    width = w_local.shape[0]
    b, u, c = (dtensor.same_split(x, w, name, "student_weight", 0, width)
               for x, name in ((b, "student_bias"), (u, "teacher_weight"), (c, "teacher_bias")))
    if dtensor.is_dtensor(t_logits):
        t_logits, _, t_range = dtensor.vocab_split(t_logits, "teacher_logits", -1)
        if t_range != vocab_range:
            raise ValueError(f"teacher_logits holds vocabulary range {t_range} but student_weight {vocab_range}")
    return h, w_local, b, g, u, c, t_logits, process_group, vocab_range


def _vocab_parallel(process_group, vocab_range, backend, h, vocab, hidden, chunk_size, hidden_grad, labels, loss_opts,
                    vocab_size, teacher_indices):
    """``(KDOptions, Shard, GroupReducer)`` of this rank's output rows (``process_group`` of
    :func:`fused_linear_kd_loss`), after checks that the ranks agree on the rows, hidden size, chunks and
    whether the hidden states take a gradient (their gradient is all-reduced)."""
    from kdkernels.torch_ops import vocab_parallel  # imported on first use, as the group's collectives

    if vocab_size is not None:
        raise ValueError("vocab_size does not combine with process_group: pass each rank's rows of the heads")
    if teacher_indices is not None:
        raise ValueError("process_group takes a dense teacher (teacher_hidden and teacher_weight, or teacher_logits)")
    rows = h.numel() // h.shape[-1]
    shard, reducer = vocab_parallel.layout_of(process_group, vocab_range, backend, rows, vocab, h.device,
                                              loss_opts.divergence, labels is not None, hidden_size=hidden,
                                              chunk_size=chunk_size or 0, student_hidden_requires_grad=hidden_grad)
    return canonical(loss_opts), shard, reducer


def fused_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    divergence: str = "fkl",
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    teacher_indices: torch.Tensor | None = None,
    teacher_logprobs: torch.Tensor | None = None,
    teacher_rest_logprob: torch.Tensor | None = None,
    tail: str = "bucket",
    labels: torch.Tensor | None = None,
    backend: str = "auto",
    chunk_size: int | None = None,
    vocab_size: int | None = None,
    process_group: object = None,
    vocab_range: tuple[int, int, int] | None = None,
    **options: object,
) -> torch.Tensor:
    """``kd_loss(student_hidden @ student_weight.T + student_bias, teacher logits, ...)`` without full logits.

    Args:
        student_hidden: ``(..., H_s)`` last hidden states; gradients flow to it, ``student_weight`` ``(V, H_s)``
            and ``student_bias`` ``(V,)`` (all of one float dtype).
        teacher_hidden, teacher_weight, teacher_bias: ``(..., H_t)``, ``(V, H_t)``, ``(V,)``; ``H_t`` may differ
            from ``H_s``, ``V`` may not. Or pass ``teacher_logits`` ``(..., V)`` instead. Teacher tensors are
            constants and must not require grad (``.detach()`` them).
        teacher_indices, teacher_logprobs, teacher_rest_logprob, tail: or a sparse teacher, ``(..., K)`` ids and
            log-probs and optionally the ``(...)`` log-mass outside them, as in :func:`kdkernels.sparse_kd_loss`
            (``tail``: ``"bucket"``, ``"renormalize"`` or ``"truncate"``).
        divergence, labels, **options: as in :func:`kdkernels.kd_loss` (the fields of
            :class:`~kdkernels.KDOptions`; the teacher is the target; no ``T**2`` factor; CE at T = 1).
            ``reduction="none"`` gives rows of shape ``(...)``; its backward recomputes the logits, so it costs
            twice the matrix products.
        backend: ``"auto"`` (Triton on CUDA, torch on CPU), ``"torch"`` or ``"triton"``.
        chunk_size: token rows per chunk; default :func:`auto_chunk_size` of ``V`` and the larger hidden size.
        vocab_size: use only the first ``vocab_size`` rows of both weights and biases (columns of
            ``teacher_logits``), as views, no copies: for heads padded to different sizes over one tokenizer
            (Qwen2.5: 151936 and 152064 rows). Labels must be below it. Default: all rows (they must match).
        process_group: ``None``, or a ``torch.distributed`` process group over whose ranks the output layers are
            split by vocabulary (SPEC §8, as Megatron's column-parallel output layer): ``student_weight``,
            ``student_bias``, ``teacher_weight``, ``teacher_bias`` are this rank's rows ``[offset_r, offset_r +
            V_r)`` (``teacher_logits`` its columns), in rank order, while ``student_hidden`` and
            ``teacher_hidden`` are the same on every rank (replicated); labels are global ids. Every rank returns
            the loss of the whole vocabulary and the gradients of its rows; the gradient of ``student_hidden`` is
            already **summed over the group** (one all-reduce of ``N x H_s`` numbers where the gradients are made),
            so pass the hidden states as they are, not through Megatron's ``copy_to_tensor_model_parallel_region``
            (whose backward sums them again). Dense teachers only; not with ``vocab_size``.
        vocab_range: with ``process_group``, this rank's rows ``(start, end, V)``, as in :func:`kdkernels.kd_loss`
            (no shape table, no host synchronisation; every rank must then pass the same ``chunk_size``).

    ``student_weight`` may be a ``DTensor`` sharded on the vocabulary (``Shard(0)`` on one mesh dimension, as a
    ``ColwiseParallel`` output layer's weight): the group and rows come from its mesh (``dtensor.py``);
    ``student_bias``, ``teacher_weight`` and ``teacher_bias`` are DTensors of the same placements or local rows,
    ``teacher_logits`` a DTensor sharded ``Shard(-1)`` alike or the local columns, the hidden states and labels
    plain or replicated DTensors. The weights' gradients are then DTensors of their placements.

    Returns the float32 loss. Memory beyond inputs and gradients is a few ``(chunk_size, V)`` buffers.
    The gradients are made during the forward and handed to the first backward; a second backward through
    the same loss (``retain_graph=True``) raises, except with ``reduction="none"``.

    Example::

        h = student.model(input_ids).last_hidden_state[:, :-1]
        with torch.no_grad():
            g = teacher.model(input_ids).last_hidden_state[:, :-1]
        loss = fused_linear_kd_loss(h, student.lm_head.weight, g, teacher.lm_head.weight.detach(), "todi",
                                    labels=input_ids[:, 1:], temperature=2.0, kd_weight=0.5, ce_weight=0.5)
    """
    h, w, b, g, u, c, t_logits = (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                                  teacher_bias, teacher_logits)
    if dtensor.is_dtensor(w):
        h, w, b, g, u, c, t_logits, process_group, vocab_range = _unwrap(h, w, b, g, u, c, t_logits, process_group,
                                                                          vocab_range)
    h, g, labels, teacher_indices, teacher_logprobs, teacher_rest_logprob = (
        dtensor.local(x, name) for x, name in ((h, "student_hidden"), (g, "teacher_hidden"), (labels, "labels"),
                                               (teacher_indices, "teacher_indices"),
                                               (teacher_logprobs, "teacher_logprobs"),
                                               (teacher_rest_logprob, "teacher_rest_logprob")))
    if vocab_size is not None:
        w, b, u, c, t_logits = _first_entries(vocab_size, w, b, u, c, t_logits)
    teacher_ref = _check_inputs(h, w, b, g, u, c, t_logits, teacher_indices, teacher_logprobs, teacher_rest_logprob)
    loss_opts = loss_options(divergence, **options)
    check_tail(tail, loss_opts.divergence)
    validate.check_labels(labels, h)
    validate.check_ce(loss_opts.ce_weight, labels)
    validate.check_choice("backend", backend, FUSED_BACKENDS)
    backend = validate.resolve_backend(backend, h, teacher_ref)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)):
        raise TypeError(f"chunk_size must be an int or None, got {type(chunk_size).__name__}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    vocab, lead = w.shape[0], h.shape[:-1]
    hidden = max(w.shape[1], 0 if u is None else u.shape[1])
    wide = torch.float64 in (h.dtype, teacher_ref.dtype)
    grad_on = torch.is_grad_enabled()
    needs = tuple(grad_on and x is not None and x.requires_grad for x in (h, w, b))
    parallel = None
    validate.check_vocab_range(vocab_range, process_group)
    if process_group is not None:
        parallel = _vocab_parallel(process_group, vocab_range, backend, h, vocab, hidden, chunk_size, needs[0], labels,
                                   loss_opts, vocab_size, teacher_indices)
        vocab = -(-parallel[1].vocab // parallel[1].world)  # the chunks are cut alike on every rank
    opts = {
        "loss": loss_opts,
        "backend": backend,
        "tail": tail,
        "chunk_size": chunk_size or auto_chunk_size(vocab, hidden),
        "result_dtype": torch.float64 if wide else torch.float32,
        "parallel": parallel,
    }
    flat = [None if x is None else x.reshape(-1, x.shape[-1]) for x in (h, g, t_logits)]
    t_ids, t_lp = [None if x is None else x.reshape(-1, x.shape[-1]).contiguous()
                   for x in (teacher_indices, teacher_logprobs)]
    t_ids = None if t_ids is None else t_ids.to(torch.int64)
    t_rest = None if teacher_rest_logprob is None or tail != "bucket" else teacher_rest_logprob.reshape(-1).contiguous()
    out = _FusedLinearKD.apply(flat[0], w, b, flat[1], u, c, flat[2], t_ids, t_lp, t_rest, flat_labels(labels), opts,
                               needs)
    return out.reshape(lead) if loss_opts.reduction == "none" else out


class FusedLinearKDLoss(torch.nn.Module):
    """``FusedLinearKDLoss("todi", temperature=2.0)(student_hidden, student_weight, teacher_hidden, teacher_weight)``.

    Holds the keywords of :func:`fused_linear_kd_loss` (checked once, here) and applies them on each call.
    """

    def __init__(
        self,
        divergence: str = "fkl",
        *,
        backend: str = "auto",
        chunk_size: int | None = None,
        vocab_size: int | None = None,
        tail: str = "bucket",
        process_group: object = None,
        vocab_range: tuple[int, int, int] | None = None,
        **options: object,
    ):
        super().__init__()
        opts = loss_options(divergence, **options)
        validate.check_choice("backend", backend, FUSED_BACKENDS)
        check_tail(tail, opts.divergence)
        self.divergence = divergence
        self.options = dict(opts._asdict(), backend=backend, chunk_size=chunk_size, vocab_size=vocab_size, tail=tail,
                            process_group=process_group, vocab_range=vocab_range)
        del self.options["divergence"]

    def forward(
        self,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_hidden: torch.Tensor | None = None,
        teacher_weight: torch.Tensor | None = None,
        *,
        student_bias: torch.Tensor | None = None,
        teacher_bias: torch.Tensor | None = None,
        teacher_logits: torch.Tensor | None = None,
        teacher_indices: torch.Tensor | None = None,
        teacher_logprobs: torch.Tensor | None = None,
        teacher_rest_logprob: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, self.divergence,
                                    student_bias=student_bias, teacher_bias=teacher_bias,
                                    teacher_logits=teacher_logits, teacher_indices=teacher_indices,
                                    teacher_logprobs=teacher_logprobs, teacher_rest_logprob=teacher_rest_logprob,
                                    labels=labels, **self.options)

    def extra_repr(self) -> str:
        return f"divergence={self.divergence!r}, " + ", ".join(f"{k}={v!r}" for k, v in self.options.items())
