import re

from setuptools import setup

setup(
    name="splitmed",
    version=re.search(r'__version__ = "(.+)"', open("common.py").read()).group(1),
    description="Federated learning, split learning and SplitFed on DenseNet-121 for tuberculosis chest X-rays, "
                "with every byte and FLOP counted",
    py_modules=["common", "fedlearn", "splitlearn", "splitfed", "densenet_split", "data",  # the core, and beside it
                "standins", "labelprivate", "robust", "defenses", "attacks", "inversion", "privacy", "checkpoints",
                "resume", "wire", "distributed", "contact", "secure", "launch", "profiler", "estimates", "report",
                "bench"],  # the lab
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "torchvision>=0.21", "numpy", "pillow"],  # torch 2.6: CVE-2025-32434 fixed
    extras_require={"test": ["pytest", "scikit-learn", "opacus"], "plot": ["matplotlib"],
                    "dicom": ["pydicom>=3"], "secure": ["cryptography>=42"]},
)
