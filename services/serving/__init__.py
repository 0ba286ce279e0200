"""Serving: the Ray Serve application with /chat and the OpenAI API (issue 4).

Not built yet: this package only reserves its place in the layout.
"""
