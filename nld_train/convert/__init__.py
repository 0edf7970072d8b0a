"""Hugging Face conversion both ways (``nld-convert``): :mod:`.export` (``to-hf``), :mod:`.importer`
(``from-hf``), :mod:`.cli`. The families, config translation, weight names and HF-folder reading
they share with inference live in :mod:`nld_train.inference.hf_format`. See docs/conversion.md.
"""
