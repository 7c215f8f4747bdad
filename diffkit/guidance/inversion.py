"""Pipeline methods: invert (mixed into every diffkit pipeline)."""


class InversionMixin:
    pass
