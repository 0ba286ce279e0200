"""Kaiten's catalogs as data files: ``presets.yaml`` (models) and ``skus.yaml`` (GPU models, instance
types, quantization requirements). Loaded and validated by :mod:`shared.planning.catalog`."""
