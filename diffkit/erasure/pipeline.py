"""Pipeline methods: load_erasure / unload_erasure (mixed into every diffkit pipeline)."""


class ErasureMixin:
    pass
