"""sagfast: Self-Attention Guidance for diffusers, fast enough to leave on.

Install with the project's constraints file (torch 2.13.0, triton 3.7.1):
    pip install -c constraints.txt -e ".[test]"
"""

from setuptools import find_packages, setup

setup(
    name="sagfast",
    version="0.1.0",
    description="Fast Self-Attention Guidance (SAG) for diffusers pipelines",
    python_requires=">=3.10",
    packages=find_packages(include=["sagfast", "sagfast.*"]) + ["sagfast.kernels"],
    # kernels/ holds Triton code only and is installed as sagfast.kernels: a top-level `kernels`
    # package would clash with the PyPI project of that name (and diffusers' use of it).
    package_dir={"sagfast.kernels": "kernels"},
    package_data={"sagfast": ["weights/*.safetensors", "weights/*.json"]},
    install_requires=[
        "torch>=2.4",
        "diffusers>=0.30",
        "transformers",
        "safetensors",
        "numpy",
        "pillow",
        "tqdm",
    ],
    extras_require={
        "triton": ["triton"],
        "test": ["pytest", "hypothesis", "pytest-benchmark", "triton", "mlxtend", "matplotlib"],
        "train": ["mlxtend"],
    },
    entry_points={"console_scripts": ["sagfast=sagfast.cli:main"]},
)
