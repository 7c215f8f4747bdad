"""Pipeline methods: load_pruning (mixed into every diffkit pipeline)."""


class PruningMixin:
    pass
