"""The study (issue 13): sweep files, the runner and the report (python -m ngram_jax.study)."""
