"""clipjax + dallejax: CLIP and DALL-E in JAX/Flax, from a laptop CPU to TPU pods."""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    # The fixed stack. Lower bounds are what the tests run on (Python 3.11); newer releases
    # (jax >= 0.11 on Python 3.12, as TPU VMs have) are allowed: only current APIs are used.
    "jax>=0.10.2",
    "jaxlib>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "tensorflow-cpu>=2.21; platform_machine == 'x86_64'",
    "tensorflow>=2.21; platform_machine != 'x86_64'",
    "tensorflow-datasets>=4.9.10",
    "ml-collections>=1.0",
    "einops>=0.8",
    "chex>=0.1.90",
    "absl-py>=2.1",
    "numpy>=1.26",
    # What the features need.
    "tokenizers>=0.20",      # fast exact CLIP BPE
    "regex>=2023.0",         # the reference's \\p{L}/\\p{N} pre-tokenizer pattern
    "ftfy>=6.1",             # CLIP's reference text cleaning
    "pillow>=10",
    "scikit-learn>=1.4",     # built-in digits data, linear probe
    "safetensors>=0.4",      # weight import/export without torch
    "tqdm>=4.66",
    "tensorboard>=2.18",     # TensorBoard event files via tf.summary
]

EXTRAS = {
    "test": [
        "pytest>=8",
        "pytest-xdist>=3.5",
        "pytest-timeout>=2.3",
        "hypothesis>=6.100",
        "scikit-image>=0.22",   # real sample photos for preprocessing parity
        "usearch>=2.12",        # the approximate search path is tested too
    ],
    # Reference implementations for the parity tests and benchmarks. These exact torch versions
    # install from the local wheel cache on the development machines.
    "parity": [
        "torch==2.14.1",
        "torchvision==0.29.1",
        "open_clip_torch>=2.24",
        "dall-e>=0.1",
        "attrs",
    ],
    "tpu": ["jax[tpu]>=0.10.2"],
    "cuda": ["jax[cuda12]>=0.10.2"],
    "search": ["usearch>=2.12"],
}

setup(
    name="clipjax",
    version="0.1.0",
    description="CLIP and DALL-E (dVAE + transformer) in JAX/Flax for TPU pods, GPU clusters and laptops",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["clipjax", "clipjax.*", "dallejax", "dallejax.*"]),
    package_data={"clipjax": ["*.txt.gz", "evals/*.json", "evals/*.txt"]},
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "clipjax-train=clipjax.train:run",
            "clipjax-toy=clipjax.toy:run",
            "clipjax-evaluate=clipjax.evaluate:run",
            "clipjax-convert=clipjax.convert:run",
            "clipjax-shards=clipjax.data.shards:run",
            "clipjax-search=clipjax.search:run",
            "dallejax-train-dvae=dallejax.train_dvae:run",
            "dallejax-train=dallejax.train_dalle:run",
            "dallejax-generate=dallejax.generate:run",
            "dallejax-convert=dallejax.convert:run",
            "dallejax-encode-dataset=dallejax.encode_dataset:run",
        ]
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
