"""Pipeline methods: enable_deepcache / disable_deepcache (mixed into every diffkit pipeline)."""


class DeepCacheMixin:
    pass
