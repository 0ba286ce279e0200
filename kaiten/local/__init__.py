"""Real components started locally, for `kaiten up` and the test suite (never fakes)."""
