"""Run configs and how they are read: the strict converter, the run's config classes, the one
cross-field :func:`~selfflow_core.config.validate.validate`, resolution from the command line, and
preset helpers."""
