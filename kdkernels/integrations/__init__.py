"""Adapters from model libraries to kdkernels; each imports its library only when called.

- :mod:`kdkernels.integrations.transformers`: :func:`causal_lm_kd_loss` for Hugging Face causal LMs.
"""
