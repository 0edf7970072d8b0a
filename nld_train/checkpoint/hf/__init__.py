"""Hugging Face conversion both ways (``nld-convert``): :mod:`.mapping` (the name/transform table),
:mod:`.export` (``to-hf``), :mod:`.importer` (``from-hf``), :mod:`.cli`. See docs/conversion.md.

Kept import-free: :mod:`nld_train.inference.loading` imports the mapping from here.
"""
