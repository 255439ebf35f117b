"""One exception type for bad user input, so the Dagster layer can show it as-is."""


class AtlasInputError(ValueError):
    """The configuration or data given to the pipeline cannot be used; the message says why."""
