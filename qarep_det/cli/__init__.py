"""The command-line layer: one module per tool (its parser and ``main``), shared flags in ``common`` and the
``qarep-det`` console command in ``main``. ``tools/*.py`` are three-line scripts over the same modules."""
