"""Use cases, each a short top-down list of steps: the main export job, and ``check``."""
