"""nbqueue: a job runner for Jupyter notebooks, local-first (placeholder while the core is built)."""
