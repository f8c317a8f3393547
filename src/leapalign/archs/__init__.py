"""Published architecture configs (no weights, no tokenizers) for offline, weight-free model planning.

Layout mirrors a diffusers pipeline folder: ``<owner>/<repo>/model_index.json`` and
``<owner>/<repo>/<component>/config.json`` (``scheduler/scheduler_config.json``), plus reward-model configs under
``rewards/``.  Where each number was checked is listed in ``SOURCES.md``.
"""
