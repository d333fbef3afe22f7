"""Torch side of kdkernels: reference, validation, torch backend, registered ops, functional API, modules."""
