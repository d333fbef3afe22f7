"""Codes and per-row statistics shared by the Triton and torch backends (no triton import here).

The forward of every backend returns ``stats``, a float32 ``(N, NUM_STATS)`` tensor: the few numbers
per row that the backward needs (and that the vocabulary-parallel path, ``vocab_parallel.py``, all-reduces between
passes). Columns:

- ``MAX_Z``, ``LOGS_Z``, ``MAX_T``, ``LOGS_T``: the row maximum of the raw logits and the
  log of ``sum exp((x - max) / T)``, kept apart so that ``log p = (x - max) / T - log s`` stays exact at any
  logit magnitude (an absolute float32 log-sum-exp of logits near 1e4 has lost the digits that matter)
- ``MASS_P``, ``MASS_Q``: ``P = sum_m p``, ``Q = sum_m q`` (1 when nothing is masked)
- ``FKL``, ``RKL``: the row's forward and reverse KL (when the divergence needs them)
- ``TODI_S``: ToDi's ``S_a - S_b``
- ``Q_G``: ``sum_m q g`` of the baselines (sfkl, srkl, jsd, tvd), ``g = dL/dq``: their gradient w.r.t. ``z_j`` is
  ``q_j (g_j - Q_G) / T`` (SPEC §2b)
- ``R_HEAD``, ``R_TAIL``: AKL weights
- ``MAX_CE``, ``LOGS_CE``, ``CE``: the same split for the raw ``z`` (temperature 1) and the cross-entropy, for
  the hard-label term
- ``FOUND_Z``, ``FOUND_T``: 1 where the row has an entry above ``-inf`` (its sum is not 0), else 0, so that a row
  (or a vocabulary slice of one) with nothing to sum is told from one whose maximum and log-sum are both 0 (a
  single entry 0); the vocabulary-parallel combine weighs each slice by them
"""

DIVERGENCE_CODES = {"fkl": 0, "rkl": 1, "akl": 2, "todi": 3, "sfkl": 4, "srkl": 5, "jsd": 6, "tvd": 7}

(MAX_Z, LOGS_Z, MAX_T, LOGS_T, MAX_CE, LOGS_CE, MASS_P, MASS_Q, FKL, RKL, TODI_S, R_HEAD, R_TAIL, CE, Q_G, FOUND_Z,
 FOUND_T) = range(17)
NUM_STATS = 17

# ----------------------------------- sparse (top-k) teachers (SPEC §7: ``sparse_ops.py``, ``kernels/sparse.py``)
# Columns of the streaming pass's output (kernels.sparse.sparse_stats, sparse_ops.torch_stats): over the entries
# outside K (bucket) or all entries, the maximum, ``log sum exp((z - max) / T)`` (-inf for none) and that sum at
# T = 1 (CE).
R_MAX, R_LOGS, R_LOGS_CE = range(3)
NUM_STREAM_STATS = 3
# Columns of the sparse op's per-row statistics: the student's row maximum and log-sum (at T) of the whole row and
# of the entries outside K (bucket), the whole row's log-sum at T = 1 (CE term; it shares the maximum), the rest
# category's gradient G_rest and S (see ``sparse_ops.py``'s docstring), the last two per unit row gradient.
S_MAX, S_LOGS, S_MAX_R, S_LOGS_R, S_LOGS_CE, S_G_REST, S_S = range(7)
NUM_SPARSE_STATS = 7
