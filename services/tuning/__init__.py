"""Tuning: the LoRA/QLoRA job entrypoint (issue 5).

Not built yet: this package only reserves its place in the layout.
"""
