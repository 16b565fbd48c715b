"""Distillation methods. `get_method(config)` builds the `Method` named by `config.method`."""
