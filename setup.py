"""mtl_gbml: multi-task learning and gradient-based meta-learning for few-shot learning in JAX.

The stack is pinned: neural-tangents 0.6.5 (its last release) works with jax/jaxlib up to 0.5.3
and fails from 0.6.0, and tf2jax 0.3.7+ needs a newer jax (see DESIGN notes in the README).
"""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax==0.5.3",
    "jaxlib==0.5.3",
    "flax==0.10.6",
    "optax==0.2.8",
    "orbax-checkpoint==0.11.23",  # 0.11.24 calls jax.monitoring.record_scalar (jax>0.5.3)
    "chex>=0.1.88",
    "ml-collections>=1.0",
    "neural-tangents==0.6.5",
    "tf2jax==0.3.6",
    "tensorflow>=2.16,<2.22",  # the package neural-tangents and tf2jax require: one install, capped
    "tensorflow-datasets>=4.9.7,<4.10",
    "importlib_resources",  # tensorflow-datasets imports it without declaring it
    "numpy>=1.26",
    "scipy>=1.11",
    "scikit-learn>=1.4",
    "pillow>=10",
    "tqdm>=4.66",
    "matplotlib>=3.8",
    "tensorboardX>=2.6",
]

setup(
    name="mtl_gbml",
    version="0.1.0",
    description="Bridging multi-task learning and meta-learning (Wang, Zhao, Li, ICML 2021) in JAX",
    python_requires=">=3.10,<3.14",  # jaxlib 0.5.3 (the pinned stack) has wheels for 3.10-3.13
    packages=find_packages(include=["mtl_gbml", "mtl_gbml.*", "theory", "theory.*"]),
    # the CIFAR-FS / FC100 split class lists (facts, never images)
    package_data={"mtl_gbml.data": ["splits/*/*.json", "splits/README.md"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "cuda12": ["jax[cuda12]==0.5.3"],
        "tpu": ["jax[tpu]==0.5.3"],
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "ruff==0.17.6",
            "nbformat>=5.9",
            "nbclient>=0.10",
            "ipykernel>=6.29",
        ],
    },
    entry_points={
        "console_scripts": [
            "mtl-gbml-train=mtl_gbml.train:main",
            "mtl-gbml-evaluate=mtl_gbml.evaluate:main",
        ]
    },
)
