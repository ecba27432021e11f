"""distilabel steps over the library, and the distilabel plumbing the project's pipelines share.

distilabel is imported here and in ``magpie_teach.generation`` (which builds the pipelines from these
steps) and nowhere else: ruff's banned-api rule (``pyproject.toml``) enforces it, and
``tests/test_architecture.py`` checks the floors.
"""
