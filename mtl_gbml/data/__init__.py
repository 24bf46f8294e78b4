"""Few-shot data: TFDS builders (prepared once, offline), a device-resident image pool and a jitted
episode sampler. See :func:`mtl_gbml.data.datasets.load_pool`.
"""
