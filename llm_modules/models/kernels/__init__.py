"""C sources built on first use (`llm_modules.models.small_m`)."""
